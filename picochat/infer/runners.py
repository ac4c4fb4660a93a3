"""Decode runners: one fixed set of rows, their prefill and their one-token decode step.

`NaiveRunner` recomputes the whole prefix per token (the baseline); `CachedRunner` keeps a static
KV cache and runs its step eagerly or replays it from CUDA graphs, optionally torch.compiled first.
All state (input ids, positions, the cache) lives on the device, so a step needs no host sync. The
engine (`engine.py`) owns everything above one step: sampling, stops, tools and chunking.
"""

from __future__ import annotations

import logging

import torch

from ..model.attention import KVCache

log = logging.getLogger("picochat")


def bucket_size(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def capture_graph(step, reset, device: torch.device, warmup: int = 3, pool=None):
    """Capture `step()` (no arguments; its outputs are returned with the graph) in a CUDA graph.
    Warm-up calls run first on a side stream, so lazy inits, cuBLAS workspaces, Triton and Inductor
    compilation stay out of the graph; `reset()` (e.g. rewinding positions) runs before every
    warm-up call and after the capture, since warm-up and capture both advance the state. `pool`:
    a memory pool shared with other graphs (`torch.cuda.graph_pool_handle()`); safe when they never
    run at once and each graph's outputs are read before another graph of the pool replays.

    The graph keeps `step` (and so every tensor it closes over) alive: a replay reads the addresses
    the capture saw, and a tensor made before the capture and then dropped (e.g. a `KVCache` view's
    row index, built for one graph and referenced only by its step) would go back to the caching
    allocator and be handed to the next eager tensor while the graph still indexes with it. That
    was the prefill graphs' device-side "index out of bounds" on the H200."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            reset()
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    graph.picochat_step = step  # see above: what the replay reads must outlive the capture
    reset()
    return graph, outputs


class Runner:
    """Decode state for `rows` rows: input ids `idx` (rows, 1) and positions `pos` (rows,)."""

    kernels = "torch"  # what a step runs as: the model's torch forward, or "triton" (CachedRunner)

    def __init__(self, model, rows: int, max_len: int, k_max: int, idx: torch.Tensor | None = None):
        p = next(model.parameters())
        self.model, self.rows, self.max_len, self.device = model, rows, max_len, p.device
        self.idx = torch.zeros(rows, 1, dtype=torch.long, device=self.device) if idx is None else idx
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


class NaiveRunner(Runner):
    """No cache: a token buffer, and every step is a full forward over the longest prefix."""

    def __init__(self, model, rows: int, max_len: int, k_max: int, seq: torch.Tensor | None = None,
                 pos: torch.Tensor | None = None, idx: torch.Tensor | None = None):
        """`seq`, `pos`, `idx`: run over these (views of the scheduler's buffers) instead."""
        super().__init__(model, rows, max_len, k_max, idx)
        self.seq = torch.zeros(rows, max_len, dtype=torch.long, device=self.device) if seq is None else seq
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device) if pos is None else pos
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
        return _with_greedy(self.model(self.seq[:, :self.hi], logits_at=self.pos - 1)[:, 0], self.idx)


def decode_step(model, idx: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row: (rows, 1) ids -> (rows, V) logits and the greedy token, which also
    becomes the next input (greedy decoding then needs nothing outside the graph but a copy out;
    a sampled or forced token overwrites `idx` after the step). Writes the cache, advances pos."""
    return _with_greedy(model(idx, kv_cache=cache)[:, -1], idx)


def _with_greedy(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy tokens), the greedy tokens written to `idx` as the next step's input."""
    greedy = logits.argmax(dim=-1)
    idx.copy_(greedy[:, None])
    return logits, greedy


_compiled_steps: dict[str, object] = {}


def compiled_step(mode: str = "default"):
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
            _compiled_steps[mode] = torch.compile(decode_step, dynamic=False,
                                                  options={"coordinate_descent_tuning": True})
        else:
            _compiled_steps[mode] = torch.compile(decode_step, dynamic=False, mode=mode)
    return _compiled_steps[mode]


class CachedRunner(Runner):
    """Static KV cache; the decode step is eager, or replayed from CUDA graphs when `graph`.

    `kernels="triton"` runs the step as hand-fused Triton kernels (`triton_decode.py`, CUDA and a
    fused model only) instead of the model's torch forward; each row then reads just its own part
    of the cache, so one graph over the whole cache serves every step (no windows, no compile).

    With graphs, one graph is captured per attention window (the first W cache slots, W a multiple
    of `window_step`): a step only reads the slots that can hold tokens yet, so early steps of a
    long cache do not pay for its empty end. The host knows which window suffices without a sync:
    an upper bound of every row's position (`hi`). A compiled step is compiled once per batch
    bucket: the window length is a dynamic dimension, and the cache has one spare slot so that every
    window is a strided slice (a window equal to the whole cache would be contiguous: a recompile)."""

    def __init__(self, model, rows: int, max_len: int, k_max: int, dtype: torch.dtype,
                 graph: bool = False, compile: str | None = None, window_step: int = 256,
                 kernels: str = "torch", cache: KVCache | None = None, idx: torch.Tensor | None = None,
                 graph_pool=None):
        """`cache` and `idx`: run over these (views of the scheduler's persistent cache and input
        ids; `cache` then has `max_len` slots, plus one when compiled) instead of allocating them.
        `graph_pool`: capture into this shared memory pool (see `capture_graph`)."""
        self._graph_pool = graph_pool
        super().__init__(model, rows, max_len, k_max, idx)
        c = model.config
        self.kernels = kernels
        if kernels == "triton":
            from .triton_decode import TritonDecoder

            compile, window_step = None, max_len
            self._fn = TritonDecoder(model, rows, max_len)
        else:
            self._fn = compiled_step(compile) if compile else decode_step
        slots = max_len + 1 if compile else max_len
        if cache is not None and kernels == "triton" and cache.max_len == max_len + 1:
            # the batch keeps a spare slot for its compiled torch buckets; Triton needs none
            cache = cache.view(length=max_len)
        if cache is None:
            cache = KVCache.allocate(c.n_layer, rows, c.n_kv_head, slots, c.head_dim, self.device, dtype)
        elif (cache.batch_size, cache.max_len) != (rows, slots):
            raise ValueError(f"cache of {cache.batch_size} rows x {cache.max_len} slots; the runner needs "
                             f"{rows} x {slots}")
        self.cache = cache
        self.pos = self.cache.pos
        self.hi = 0
        self.graph: torch.cuda.CUDAGraph | None = None  # the widest window's graph (None: eager)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.window_step = window_step
        self.windows = sorted(set(range(window_step, max_len, window_step)) | {max_len})
        self._views = {w: self.cache.view(length=w) for w in self.windows}
        if compile:
            from torch._dynamo import mark_dynamic  # (a plain `import torch._dynamo` would make torch local)

            for view in self._views.values():
                for t in (*view.k, *view.v):
                    mark_dynamic(t, 2)
        if graph:
            try:
                for w in self.windows:
                    self._graphs[w] = self._capture(self._views[w])
                self.graph = self._graphs[max_len][0]
            except Exception as e:  # a capture failure must cost speed, never the answer
                if kernels == "triton":  # its first (compiling) call failed: the engine falls back to torch
                    raise
                log.warning(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                self._graphs.clear()
                torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _capture(self, view: KVCache) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
        # Warm-up and capture write junk into slot 0 and advance pos: harmless, prefill rewrites
        # positions before anything reads them.
        return capture_graph(lambda: self._fn(self.model, self.idx, view), self.pos.zero_, self.device,
                             pool=self._graph_pool)

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
        w = min((self.hi // self.window_step + 1) * self.window_step, self.max_len)  # smallest window > hi
        self.hi = min(self.hi + 1, self.max_len - 1)
        if self._graphs:
            graph, outputs = self._graphs[w]
            graph.replay()
            return outputs
        return self._fn(self.model, self.idx, self._views[w])
