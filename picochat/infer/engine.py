"""Inference engine: prefill, KV-cached decode, batched sampling, stop conditions and tool use.

`Engine(model, tokenizer).generate(prompts, ...)` prefills every prompt once (right-padded into one
batch; each row's cache position is then set to its true length), then decodes all rows together,
yielding one `Step` per decode step: the token each row appended (None once it stopped or while it
waits on a tool) and whether it has finished. `num_samples=n` prefills a prompt once, copies its
cache rows n times and samples every row independently from the first token on.

Three decode modes, selectable so the benchmark can compare them side by side:
- `naive`: no cache; every token recomputes the whole prefix (the seed's original generate);
- `eager`: static KV cache, one eager forward per token and one host sync per token;
- `fast` (default on CUDA): the one-token decode step runs on a static batch-size bucket
  (1, 2, 4, ...) and cache length, captured once in a CUDA graph (optionally torch.compiled first)
  and replayed per token, on a private bf16 copy of the model whose q/k/v projections are fused.
  The step itself computes the greedy token and feeds it back as the next input; a sampled token
  is fed back on the device too, and the host reads the new tokens once every `sync_every` steps.
  Rows that stopped or started a tool call in the middle of a chunk are rewound afterwards: the
  cache is indexed by position, so rewinding is setting `pos`.

Tool use: `<|python_start|> expr <|python_end|>` runs `run_python_tool(expr)` on a worker thread;
that row pauses (other rows go on) and then has `<|output_start|> result <|output_end|>` forced in,
each forced token fed through the model like a sampled one.
"""

from __future__ import annotations

import codecs
import copy
import logging
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..model.attention import KVCache

log = logging.getLogger("picochat")

MODES = ("naive", "eager", "fast")


class ContextOverflowError(ValueError):
    """A prompt plus the tokens asked for do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = "
                         f"{prompt_tokens + max_tokens} tokens exceeds the model's context of {limit} tokens")


class Step(NamedTuple):
    tokens: list[int | None]  # the token each row appended this step, None if it appended nothing
    finished: list[bool]  # True from the step a row stops on
    reasons: list[str | None]  # "stop" | "length" once finished


# ---------------------------------------------------------------------------------------------------
# sampling


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(R, V) float logits -> (R,) token ids, each row independent. No host sync anywhere."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass strictly before it exceeds top_p; the top token always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # Exponential race (= Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p. Unlike
    # torch.multinomial it never syncs with the host, so it can sit between graph replays.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------
# streaming text


class StreamDecoder:
    """Token ids -> text as it becomes complete UTF-8: a character split across tokens is held back
    until its last byte arrives. Special tokens give "" unless `show_special`."""

    def __init__(self, tokenizer, show_special: bool = False):
        self.tokenizer, self.show_special = tokenizer, show_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.tokenizer.is_special(token_id) and not self.show_special:
            return ""
        return self._dec.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------------
# runners: one fixed set of rows, prefill + one decode step, all state on the device


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Runner:
    """Decode state for `rows` rows: input ids `idx` (rows, 1) and positions `pos` (rows,)."""

    def __init__(self, model, rows: int, max_len: int, k_max: int):
        p = next(model.parameters())
        self.model, self.rows, self.max_len, self.device = model, rows, max_len, p.device
        self.idx = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        # per chunk: tokens forced into rows (tool outputs) and the tokens each step appended
        self.fmask = torch.zeros(k_max, rows, dtype=torch.bool, device=self.device)
        self.ftok = torch.zeros(k_max, rows, dtype=torch.long, device=self.device)
        self.out = torch.zeros(k_max, rows, dtype=torch.long, device=self.device)
        # two host buffers: a chunk's tokens are copied out while the next chunk already runs
        pin = self.device.type == "cuda"
        self.host = [torch.zeros(k_max, rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._next_host = 0

    pos: torch.Tensor

    def read_out(self, k: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the first k rows of `out` to a host buffer; returns it and an event to wait on."""
        host = self.host[self._next_host][:k]
        self._next_host ^= 1
        if self.device.type != "cuda":
            host.copy_(self.out[:k])
            return host, None
        host.copy_(self.out[:k], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def prefill(self, prompts: list[list[int]], n: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `idx` at `pos`: (rows, V) logits, and the greedy tokens, already written to `idx`."""
        raise NotImplementedError

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return ids.to(self.device), lens.to(self.device)


class _NaiveRunner(_Runner):
    """No cache: a token buffer, and every step is a full forward over the longest prefix."""

    def __init__(self, model, rows: int, max_len: int, k_max: int):
        super().__init__(model, rows, max_len, k_max)
        self.seq = torch.zeros(rows, max_len, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.hi = 0  # host-side upper bound of every row's pos: how much of `seq` a step must read

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], n: int) -> torch.Tensor:
        ids, lens = self._padded(prompts)
        B, T = ids.shape
        self.seq[:B * n, :T] = ids.repeat_interleave(n, dim=0)
        self.pos[:B * n] = lens.repeat_interleave(n)
        self.hi = T
        return self.model(ids, logits_at=lens - 1)[:, 0].repeat_interleave(n, dim=0)

    @torch.no_grad()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.seq.scatter_(1, self.pos[:, None], self.idx)
        self.pos += 1
        self.hi = min(self.hi + 1, self.max_len)
        logits = self.model(self.seq[:, :self.hi], logits_at=self.pos - 1)[:, 0]
        greedy = logits.argmax(dim=-1)
        self.idx.copy_(greedy[:, None])
        return logits, greedy


def _decode_step(model, idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row: (rows, 1) ids -> (rows, V) logits and the greedy token, which also
    becomes the next input (greedy decoding then needs nothing outside the graph but a copy out;
    a sampled or forced token overwrites `idx` after the step). Writes the cache, advances pos."""
    logits = model(idx, kv_cache=cache)[:, -1]
    greedy = logits.argmax(dim=-1)
    idx.copy_(greedy[:, None])
    return logits, greedy


_compiled_steps: dict[str, object] = {}


def _compiled_step(mode: str = "default"):
    """One compiled wrapper per torch.compile mode for the process; each compiles once per batch
    bucket (and model). "max-autotune-no-cudagraphs" lets Inductor time Triton matmul templates
    against cuBLAS for the decode shapes (slower to compile, and measured no faster than the
    default here; graphs are ours, hence no-cudagraphs)."""
    if mode not in _compiled_steps:
        import torch._dynamo

        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < 32:  # one entry per bucket (1, 2, 4, ...): more than the default 8
            torch._dynamo.config.recompile_limit = 32
        if mode == "default":
            # Coordinate-descent tuning of Inductor's generated kernels: +14% tok/s at batch 1 on an
            # H100 (1,798 -> 2,046 at d12) for about a minute more of compilation; the decode
            # step's small reductions are far from their default launch configs' sweet spot.
            _compiled_steps[mode] = torch.compile(_decode_step, dynamic=False,
                                                  options={"coordinate_descent_tuning": True})
        else:
            _compiled_steps[mode] = torch.compile(_decode_step, dynamic=False, mode=mode)
    return _compiled_steps[mode]


class _CachedRunner(_Runner):
    """Static KV cache; the decode step is eager, or replayed from CUDA graphs when `graph`.

    With graphs, one graph is captured per attention window (the first W cache slots, W a multiple
    of `window_step`): a step only reads the slots that can hold tokens yet, so early steps of a
    long cache do not pay for its empty end. The host knows which window suffices without a sync:
    an upper bound of every row's position (`hi`). A compiled step is compiled once per batch
    bucket: the window length is a dynamic dimension, and the cache has one spare slot so that every
    window is a strided slice (a window equal to the whole cache would be contiguous: a recompile)."""

    def __init__(self, model, rows: int, max_len: int, k_max: int, dtype: torch.dtype,
                 graph: bool = False, compile: str | None = None, window_step: int = 256):
        super().__init__(model, rows, max_len, k_max)
        c = model.config
        slots = max_len + 1 if compile else max_len
        self.cache = KVCache.allocate(c.n_layer, rows, c.n_kv_head, slots, c.head_dim, self.device, dtype)
        self.pos = self.cache.pos
        self.hi = 0
        self._fn = _compiled_step(compile) if compile else _decode_step
        self.graph: torch.cuda.CUDAGraph | None = None  # the widest window's graph (None: eager)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.windows = sorted(set(range(window_step, max_len, window_step)) | {max_len})
        self._views = {w: self.cache.view(length=w) for w in self.windows}
        if compile:
            import torch._dynamo

            for view in self._views.values():
                for t in (*view.k, *view.v):
                    torch._dynamo.mark_dynamic(t, 2)
        if graph:
            try:
                for w in self.windows:
                    self._graphs[w] = self._capture(self._views[w])
                self.graph = self._graphs[max_len][0]
            except Exception as e:  # a capture failure must cost speed, never the answer
                log.warning(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                self._graphs.clear()
                self.windows = [max_len]
                torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _capture(self, view: KVCache) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
        # Warm up on a side stream (lazy inits, cuBLAS workspaces, compilation) so none of it lands
        # in the graph, then capture one step. Warm-up steps write junk into slots 0..2 and advance
        # pos: harmless, prefill rewrites positions before anything reads them.
        self.pos.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._fn(self.model, self.idx, view)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.pos.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._fn(self.model, self.idx, view)
        self.pos.zero_()
        return graph, outputs

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], n: int) -> torch.Tensor:
        ids, lens = self._padded(prompts)
        B, T = ids.shape
        # prefill into the first B rows (views: writes land in the static cache)
        self.cache.pos.zero_()  # also parks bucket rows beyond this call's, left over from the last one
        logits = self.model(ids, kv_cache=self.cache.view(rows=B), logits_at=lens - 1)[:, 0]
        self.cache.pos[:B] = lens
        self.hi = T  # the first decode step writes at each row's length, at most T
        if n > 1:  # copy each prompt's rows n times; the gather copies first, so overlap is safe
            src = torch.arange(B * n, device=self.device) // n
            for kv in (*self.cache.k, *self.cache.v):
                kv[:B * n, :, :T] = kv[src, :, :T]
            self.cache.pos[:B * n] = lens.repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
        return logits

    @torch.no_grad()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = next((w for w in self.windows if w > self.hi), self.max_len)
        self.hi = min(self.hi + 1, self.max_len - 1)
        if self._graphs:
            graph, outputs = self._graphs[w]
            graph.replay()
            return outputs
        return self._fn(self.model, self.idx, self._views[w])


# ---------------------------------------------------------------------------------------------------
# the engine


@dataclass
class _Row:
    pos: int  # where the row's pending token (last appended, not yet fed) will be written
    emitted: int = 0
    state: str = "text"  # text | python | waiting | forcing | done
    expr: list[int] = field(default_factory=list)
    future: Future | None = None
    forced: deque = field(default_factory=deque)
    last: int = 0  # the pending token
    tail: bytearray = field(default_factory=bytearray)  # recent generated bytes (stop strings)
    resync: bool = False  # device pos/idx must be reset to (pos, last) before the next chunk
    reason: str | None = None


class Engine:
    """Batched generation over a GPT. See the module docstring for modes and semantics."""

    def __init__(self, model, tokenizer=None, *, mode: str | None = None, dtype: torch.dtype | None = None,
                 sync_every: int | None = None, compile: bool | str = False, max_context: int | None = None,
                 max_runners: int = 4, fuse: bool | None = None,
                 window_step: int | None = None):
        """`compile`: torch.compile the decode step (True, or a torch.compile mode name such as
        "max-autotune-no-cudagraphs"); `fuse`: one q/k/v projection (default on in fast mode);
        `window_step`: granularity of the attention windows over the cache (see `_CachedRunner`)."""
        device = next(model.parameters()).device
        self.device = device
        if mode is None:
            mode = "fast" if device.type == "cuda" else "eager"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; pick one of {MODES}")
        if mode == "fast" and device.type != "cuda":
            log.warning(f"fast decode needs CUDA; using eager on {device.type}")
            mode = "eager"
        self.mode = mode
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if fuse is None:
            fuse = mode == "fast" and hasattr(model, "fuse_for_inference")
        if next(model.parameters()).dtype != dtype or fuse:
            # Inference reads every weight once per token: keeping them in bf16 halves the bytes and
            # avoids re-casting fp32 master weights every step (autocast would, inside the graph too).
            # Fusing q/k/v rewrites modules, so it happens on a copy: the caller's model stays trainable.
            model = copy.deepcopy(model).to(dtype)
            if fuse:
                model.fuse_for_inference()
        self.model, self.dtype = model.eval(), dtype
        self.tokenizer = tokenizer
        self.sync_every = sync_every or (16 if mode == "fast" else 1)
        self.compile: str | None = ("default" if compile is True else compile) or None
        # fast mode replays one captured graph per window, so finer windows cost only captures
        self.window_step = window_step or (64 if mode == "fast" else 256)
        self.max_context = max_context or model.config.seq_len
        if self.max_context > model.rotary_len:
            raise ValueError(f"max_context {self.max_context} exceeds the model's {model.rotary_len} positions")
        self._runners: OrderedDict[tuple[int, int], _Runner] = OrderedDict()
        self._max_runners = max_runners
        self._pool: ThreadPoolExecutor | None = None
        self.last_runner: _Runner | None = None

    # -- runners ---------------------------------------------------------------------------------
    def _runner(self, rows: int, need: int, k: int) -> _Runner:
        model = self.model
        if self.mode == "naive":
            return _NaiveRunner(model, rows, need + k - 1, k)
        if self.mode == "eager":
            return _CachedRunner(model, rows, need + k - 1, k, self.dtype, compile=self.compile,
                                 window_step=self.window_step)
        # fast: reuse a captured graph per (batch bucket, 256-slot length bucket); a bucket's cache
        # length is what every step reads, so it is kept close to what this call needs
        bucket_rows = _bucket(rows)
        length = min(-(-(need + k - 1) // 256) * 256, model.rotary_len)
        key = (bucket_rows, length)
        runner = self._runners.pop(key, None)
        if runner is None:
            while len(self._runners) >= self._max_runners:
                self._runners.popitem(last=False)
            runner = _CachedRunner(model, bucket_rows, length, self.sync_every, self.dtype, graph=True,
                                   compile=self.compile, window_step=self.window_step)
        self._runners[key] = runner
        return runner

    def _special(self, name: str) -> int | None:
        return self.tokenizer.special(name) if self.tokenizer is not None else None

    # -- generation ------------------------------------------------------------------------------
    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_context:
            raise ContextOverflowError(prompt_len, max_tokens, self.max_context)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_strings: Sequence[str] | None = None,
                 stop_tokens: Sequence[int] | None = None, tools: bool = True) -> Iterator[Step]:
        """Yield one `Step` per decode step for len(prompts) * num_samples rows (prompt-major:
        row = prompt * num_samples + sample). `stop_tokens` defaults to <|assistant_end|> and <|bos|>."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_tokens >= 0 (got {num_samples}, {max_tokens})")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        for p in prompts:
            self.check_context(len(p), max_tokens)
        if max_tokens == 0:
            return
        if stop_tokens is None:
            stop_tokens = [t for t in (self._special("<|assistant_end|>"), self._special("<|bos|>")) if t is not None]
        stops = set(stop_tokens)
        stop_strings = [s for s in (stop_strings or []) if s]
        tail_len = 4 * max((len(s) for s in stop_strings), default=0) + 8
        tools = tools and self.tokenizer is not None
        py_start, py_end = self._special("<|python_start|>"), self._special("<|python_end|>")

        R = len(prompts) * num_samples
        need = max(len(p) for p in prompts) + max_tokens
        k_max = max(1, min(self.sync_every, self.model.rotary_len - need + 1))
        runner = self._runner(R, need, k_max)
        self.last_runner = runner
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(logits, temperature, top_k, top_p, generator)

        rows = [_Row(pos=len(prompts[r // num_samples])) for r in range(R)]

        def accept(r: int, row: _Row, tok: int) -> int | None:
            """Host bookkeeping for one appended token; returns what to report for the row."""
            row.last, row.emitted = tok, row.emitted + 1
            forced = row.state == "forcing"
            if forced:
                row.forced.popleft()
                if not row.forced:
                    row.state = "text"
            elif tok in stops:
                row.state, row.reason = "done", "stop"
                return tok
            elif tools and tok == py_start and row.state == "text":
                row.state, row.expr = "python", []
            elif tools and tok == py_end and row.state == "python":
                expr = self.tokenizer.decode(row.expr)
                row.state, row.future, row.resync = "waiting", self._tool_pool().submit(_run_tool, expr), True
            elif row.state == "python":
                row.expr.append(tok)
            if stop_strings and not forced and self.tokenizer is not None and not self.tokenizer.is_special(tok):
                row.tail += self.tokenizer.token_bytes(tok)
                del row.tail[:-tail_len]
                text = row.tail.decode("utf-8", errors="ignore")
                if any(s in text for s in stop_strings):
                    row.state, row.reason = "done", "stop"
            if row.state != "done" and row.emitted >= max_tokens:
                row.state, row.reason = "done", "length"
            return tok

        # prefill once, sample every row's first token independently
        first = sample(runner.prefill(prompts, num_samples))
        runner.idx[:R, 0] = first
        tokens = [accept(r, rows[r], t) for r, t in enumerate(first.tolist())]
        yield Step(tokens, [row.state == "done" for row in rows], [row.reason for row in rows])

        def launch(k: int, forcing: bool, running: list[int]) -> tuple:
            for j in range(k):
                logits, tok = runner.step()  # tok: greedy, already the next step's input
                if temperature > 0:
                    tok = sample(logits)
                if forcing:
                    tok = torch.where(runner.fmask[j], runner.ftok[j], tok)
                if temperature > 0 or forcing:
                    runner.idx[:, 0].copy_(tok)  # the next step's input, without visiting the host
                runner.out[j].copy_(tok)
            return (k, running, *runner.read_out(k))

        pending = None  # a launched chunk whose tokens the host has not read yet
        while True:
            if pending is None:
                live = [r for r, row in enumerate(rows) if row.state != "done"]
                if not live:
                    break
                self._resolve_tools(rows)
                running = [r for r in live if rows[r].state != "waiting"]
                if not running:  # every live row waits on a tool: nothing to decode until one returns
                    wait_futures([rows[r].future for r in live], return_when="FIRST_COMPLETED")
                    continue
                k = min(k_max, max(max_tokens - rows[r].emitted for r in running))
                pending = launch(k, self._prepare_chunk(runner, rows, k, R), running)
            k, running, host, event = pending
            pending = None
            # While the host reads this chunk, the device runs the next one, launched on the guess
            # that no row needs the host in between (no tool call, forced tokens or rewind pending).
            # Rows that stop or call a tool during this chunk run on in the next one; their extra
            # tokens are discarded and their positions rewound before the chunk after it.
            if all(row.state in ("text", "python", "done") and not row.resync for row in rows):
                left = max((max_tokens - rows[r].emitted - k for r in running if rows[r].state != "done"), default=0)
                if left > 0:
                    pending = launch(min(k_max, left), False, running)
            if event is not None:
                event.synchronize()
            chunk = host.tolist()  # the one host sync of the chunk
            for j in range(k):
                tokens: list[int | None] = [None] * R
                for r in running:
                    row = rows[r]
                    if row.state in ("done", "waiting"):
                        continue  # stopped or paused earlier: the rest of its tokens are discarded
                    row.pos += 1  # the pending token was fed at row.pos during step j
                    tokens[r] = accept(r, row, chunk[j][r])
                    if row.state == "done" and (j < k - 1 or pending is not None):
                        row.resync = True  # it runs on speculatively; park it (see _prepare_chunk)
                yield Step(tokens, [row.state == "done" for row in rows], [row.reason for row in rows])

    def _tool_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="picochat-tool")
        return self._pool

    def _resolve_tools(self, rows: list[_Row]) -> None:
        """Rows whose tool call returned switch to forcing its output."""
        for row in rows:
            if row.state == "waiting" and row.future is not None and row.future.done():
                result = row.future.result()
                row.forced = deque([self._special("<|output_start|>"), *self.tokenizer.encode(result),
                                    self._special("<|output_end|>")])
                row.state, row.future, row.resync = "forcing", None, True

    def _prepare_chunk(self, runner: _Runner, rows: list[_Row], k: int, R: int) -> bool:
        """Rewind rows that diverged from the device, park finished rows, load forced tokens.
        Returns whether any token is forced in this chunk (so the common path skips the select)."""
        waiting = any(row.state == "waiting" for row in rows)
        fix_rows, fix_pos, fix_tok = [], [], []
        for r, row in enumerate(rows):
            if row.resync or row.state == "waiting":
                # a paused row steps along with the batch; its position is reset every chunk
                fix_rows.append(r)
                fix_pos.append(0 if row.state == "done" else row.pos)
                fix_tok.append(row.last)
                row.resync = False
            elif row.state == "done" and waiting:
                # while a row waits the loop may run past max_tokens steps: keep parked rows in range
                fix_rows.append(r), fix_pos.append(0), fix_tok.append(0)
        if waiting and runner.rows > R:
            pad = list(range(R, runner.rows))
            fix_rows += pad
            fix_pos += [0] * len(pad)
            fix_tok += [0] * len(pad)
        if fix_rows:
            index = torch.tensor(fix_rows, dtype=torch.long).to(runner.device)
            runner.pos[index] = torch.tensor(fix_pos, dtype=torch.long).to(runner.device)
            runner.idx[index, 0] = torch.tensor(fix_tok, dtype=torch.long).to(runner.device)
        forced = [(r, list(row.forced)[:k]) for r, row in enumerate(rows) if row.state == "forcing"]
        if not forced:
            return False
        fmask = torch.zeros(k, runner.rows, dtype=torch.bool)
        ftok = torch.zeros(k, runner.rows, dtype=torch.long)
        for r, toks in forced:
            fmask[:len(toks), r] = True
            ftok[:len(toks), r] = torch.tensor(toks, dtype=torch.long)
        runner.fmask[:k].copy_(fmask)
        runner.ftok[:k].copy_(ftok)
        return True

    def generate_batch(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
        """All rows' tokens (prompt-major, as `generate`), without the stop token that ended a row."""
        rows: list[list[int]] | None = None
        stop_tokens = kwargs.get("stop_tokens")
        for step in self.generate(prompts, **kwargs):
            if rows is None:
                rows = [[] for _ in step.tokens]
            for r, tok in enumerate(step.tokens):
                if tok is not None:
                    rows[r].append(tok)
        rows = rows or [[] for _ in range(len(prompts) * kwargs.get("num_samples", 1))]
        if stop_tokens is None:
            stop_tokens = [t for t in (self._special("<|assistant_end|>"), self._special("<|bos|>")) if t is not None]
        stops = set(stop_tokens)
        return [r[:-1] if r and r[-1] in stops else r for r in rows]


def _run_tool(expr: str) -> str:
    try:  # imported lazily: the engine works without the tool module present
        from .tools import run_python_tool

        return run_python_tool(expr)
    except Exception as e:  # the tool promises never to raise; stay safe if it does anyway
        return f"Error: {type(e).__name__}: {e}"
