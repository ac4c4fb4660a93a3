"""The batch API over the scheduler: `Engine(model, tokenizer).generate(prompts, ...)`.

`generate` submits one request per prompt (with `num_samples` samples each) to a `Scheduler` of its
own (`scheduler.py`, the one decode loop), drives it on the caller's thread and yields one `Step`
per decode step: the token each row appended (None when it appended nothing: it stopped, waits on
a tool, or has not started) and whether it has finished. `generate_batch` returns all rows' tokens.
Rows are prompt-major (row = prompt * num_samples + sample); every row samples independently from
its first token (the prompt is prefilled once).

Decode modes, selectable so the benchmark can compare them side by side:
- `naive`: no cache; every token recomputes the whole prefix (the seed's original generate);
- `eager`: static KV cache, one eager forward per token and one host sync per token;
- `fast` (default on CUDA): each one-token step replayed from a CUDA graph per batch bucket (1, 2,
  4, ...; the torch step, or hand-fused Triton kernels up to TRITON_MAX_ROWS rows with
  kernels="auto"), on a private bf16 copy of the model whose q/k/v projections are fused; the host
  reads tokens every `sync_every` steps while the device already runs the next chunk.

Tool use: `<|python_start|> expr <|python_end|>` runs `run_python_tool(expr)` on a worker thread;
that row pauses (other rows go on) and then has `<|output_start|> result <|output_end|>` forced in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .modelprep import KERNELS, prepare_model, resolve_dtype
from .request import FinishEvent, SamplingParams, TokenEvent
from .runners import bucket_size
from .scheduler import TRITON_MAX_ROWS, ContextOverflowError, Scheduler, SchedulerConfig

log = logging.getLogger("picochat")

MODES = ("naive", "eager", "fast")
__all__ = ["Engine", "Step", "ContextOverflowError", "MODES", "KERNELS", "TRITON_MAX_ROWS"]


class Step(NamedTuple):
    tokens: list[int | None]  # the token each row appended this step, None if it appended nothing
    finished: list[bool]  # True from the step a row stops on
    reasons: list[str | None]  # "stop" | "length" once finished


class Engine:
    """Batched generation over a GPT. See the module docstring for modes and semantics."""

    def __init__(self, model, tokenizer=None, *, mode: str | None = None, dtype: torch.dtype | None = None,
                 sync_every: int | None = None, compile: bool | str = False, max_context: int | None = None,
                 max_runners: int = 4, fuse: bool | None = None,
                 window_step: int | None = None, kernels: str = "auto"):
        """`compile`: torch.compile the decode step (True, or a torch.compile mode name such as
        "max-autotune-no-cudagraphs"); `fuse`: one q/k/v projection (default on in fast mode);
        `window_step`: granularity of the attention windows over the cache (see `CachedRunner`);
        `kernels` (fast mode): "triton" runs the step as hand-fused Triton kernels, "torch" as the
        model's forward (compiled if `compile`), "auto" Triton for batch buckets up to
        TRITON_MAX_ROWS where Triton and the model allow it, torch otherwise. `max_runners`:
        schedulers (one persistent cache each, sized by batch bucket) kept between calls."""
        device = next(model.parameters()).device
        self.device = device
        if mode is None:
            mode = "fast" if device.type == "cuda" else "eager"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; pick one of {MODES}")
        if mode == "fast" and device.type != "cuda":
            log.warning(f"fast decode needs CUDA; using eager on {device.type}")
            mode = "eager"
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; pick one of {KERNELS}")
        if kernels == "triton" and mode != "fast":
            raise ValueError(f"kernels='triton' needs mode 'fast' (CUDA); mode is {mode!r}")
        self.mode = mode
        dtype = resolve_dtype(dtype, device)
        if fuse is None:
            fuse = mode == "fast" and hasattr(model, "fuse_for_inference")
        self.model, self.dtype, self.fused = prepare_model(model, dtype, bool(fuse)), dtype, bool(fuse)
        self.tokenizer = tokenizer
        self.sync_every = sync_every or (16 if mode == "fast" else 1)
        self.compile: str | None = ("default" if compile is True else compile) or None
        # fast mode replays one captured graph per window, so finer windows cost only captures
        self.window_step = window_step or 64
        self.max_context = max_context or model.config.seq_len
        if self.max_context > model.rotary_len:
            raise ValueError(f"max_context {self.max_context} exceeds the model's {model.rotary_len} positions")
        self.kernels = kernels
        self._schedulers: dict[int, Scheduler] = {}  # by slot count, least recently used first
        self._max_schedulers = max_runners
        self._rng = random.Random()
        self.last_runner = None  # the runner of the largest bucket the last call used (tests, bench)

    # -- the scheduler behind a call ---------------------------------------------------------------
    def scheduler(self, rows: int = 1) -> Scheduler:
        """A scheduler with room for `rows` rows at once (built once per batch bucket, then kept)."""
        slots = bucket_size(rows)
        sched = self._schedulers.pop(slots, None)
        if sched is None:
            while len(self._schedulers) >= self._max_schedulers:
                del self._schedulers[next(iter(self._schedulers))]
            # a whole call is prefilled in its first step, as one static batch: steps stay aligned
            config = SchedulerConfig(slots=slots, max_context=self.max_context, max_queue=max(1024, slots),
                                     prefill_budget=slots * self.max_context, sync_every=self.sync_every,
                                     mode=self.mode, kernels=self.kernels, compile=self.compile or False,
                                     dtype=self.dtype, fuse=False, window_step=self.window_step)
            sched = Scheduler(self.model, self.tokenizer, config, tool_runner=lambda expr: _run_tool(expr))
        self._schedulers[slots] = sched
        return sched

    def kernels_for(self, bucket_rows: int) -> str:
        """"triton" or "torch": what a fast-mode bucket of this many rows steps with."""
        sched = next(iter(self._schedulers.values()), None)
        if sched is not None:
            return sched.kernels_for(bucket_rows)
        if self.mode != "fast":
            return "torch"
        from .modelprep import triton_unusable

        if self.kernels == "auto":
            return "torch" if triton_unusable(self.model) or bucket_rows > TRITON_MAX_ROWS else "triton"
        return self.kernels

    def _special(self, name: str) -> int | None:
        return self.tokenizer.special(name) if self.tokenizer is not None else None

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_context:
            raise ContextOverflowError(prompt_len, max_tokens, self.max_context)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_strings: Sequence[str] | None = None,
                 stop_tokens: Sequence[int] | None = None, tools: bool = True) -> Iterator[Step]:
        """Yield one `Step` per decode step for len(prompts) * num_samples rows (prompt-major:
        row = prompt * num_samples + sample). `stop_tokens` defaults to <|assistant_end|> and <|bos|>.
        `max_tokens` defaults to 256 or what fits in the context after the longest prompt, if less;
        an explicit value that does not fit raises `ContextOverflowError`."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        if max_tokens is None:
            max_tokens = max(1, min(256, self.max_context - max(len(p) for p in prompts)))
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_tokens >= 0 (got {num_samples}, {max_tokens})")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        for p in prompts:
            self.check_context(len(p), max_tokens)
        if max_tokens == 0:
            return
        base_seed = self._rng.getrandbits(62) if seed is None else seed
        params = [SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k or None,
                                 top_p=top_p, seed=base_seed * 1_000_003 + i, n=num_samples,
                                 stop=tuple(s for s in (stop_strings or ()) if s),
                                 stop_token_ids=None if stop_tokens is None else tuple(stop_tokens),
                                 tools=tools) for i in range(len(prompts))]
        sched = self.scheduler(len(prompts) * num_samples)
        handles = [sched.submit(p, q) for p, q in zip(prompts, params)]
        try:
            yield from self._steps(sched, handles, num_samples)
        finally:  # a caller that stops iterating early leaves no request behind in the scheduler
            for h in handles:
                h.cancel()
            sched.run_until_idle()
            top = max(sched.batch.runners, default=None)
            self.last_runner = sched.batch.runners.get(top) if top is not None else None

    def _steps(self, sched: Scheduler, handles: list, n: int) -> Iterator[Step]:
        """Drive the scheduler; after each of its steps, the tokens each row got, one Step apiece."""
        R = len(handles) * n
        finished: list[bool] = [False] * R
        reasons: list[str | None] = [None] * R
        done = 0
        while done < len(handles):
            sched.advance()
            new: list[list[int]] = [[] for _ in range(R)]
            ended_at: dict[int, int] = {}
            for i, h in enumerate(handles):
                while not h._queue.empty():
                    event = h._queue.get_nowait()
                    if isinstance(event, TokenEvent):
                        new[i * n + event.sample].append(event.token)
                    elif isinstance(event, FinishEvent):
                        r = i * n + event.sample
                        reasons[r], ended_at[r] = event.reason, len(new[r]) - 1
                    else:
                        done += 1
            for j in range(max((len(t) for t in new), default=0)):
                for r, at in ended_at.items():
                    finished[r] = finished[r] or j >= at
                yield Step([t[j] if j < len(t) else None for t in new], list(finished),
                           [reasons[r] if finished[r] else None for r in range(R)])
            for r in ended_at:
                finished[r] = True

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
