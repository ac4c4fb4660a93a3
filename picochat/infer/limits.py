"""What the scheduler accepts: its configuration and the checks a request passes at `submit`.

`SchedulerConfig` validates itself (a ValueError naming the field and the allowed range);
`check_request` refuses a request before it is queued: `RequestError` naming the field, and
`ContextOverflowError` (a `RequestError`) with the token counts when prompt + max_tokens cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modelprep import KERNELS
from .request import RequestError, SamplingParams

# Batch buckets up to this size use the Triton kernels when kernels="auto". Up to 8 rows they are
# matrix-vector products on CUDA cores; from 16 rows on the products run on tensor cores (tl.dot),
# and each row reads only its own cache positions: H200, d12, context ~400: 16 rows 389 us per step
# vs 934 for the graphed torch step, 32 rows 555 vs 1022, 64 rows 970 vs 1216 (bench tiles).
TRITON_MAX_ROWS = 64
DEFAULT_MAX_TOKENS = 256


class ContextOverflowError(RequestError):
    """A prompt plus the tokens asked for do not fit in the context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = "
                         f"{prompt_tokens + max_tokens} tokens exceeds the model's context of {limit} tokens",
                         param="max_tokens" if prompt_tokens < limit else "prompt")


@dataclass
class SchedulerConfig:
    slots: int | None = None  # rows of the persistent cache; None: from free memory on CUDA, 8 elsewhere
    max_context: int | None = None  # prompt + completion per row; None: the model's seq_len
    max_queue: int = 1024  # requests waiting for a slot before submit raises QueueFullError
    prefill_budget: int | None = None  # padded prompt tokens per prefill forward; None: 8192 on CUDA, 2048 else
    sync_every: int | None = None  # decode steps per chunk between host reads; None: 8 fast, 1 eager
    mode: str | None = None  # "fast" (CUDA graphs), "eager", or "naive" (no cache: a baseline); None: fast on CUDA
    kernels: str = "auto"  # fast mode's step: "triton", "torch", or auto (Triton up to triton_max_rows)
    triton_max_rows: int | None = None  # auto: the largest bucket stepped by Triton; None: TRITON_MAX_ROWS
    compile: bool | str = False  # torch.compile the torch step (True or a torch.compile mode)
    dtype: object = None  # "bfloat16" | "float32" | a torch.dtype; None: bf16 on CUDA, fp32 elsewhere
    fuse: bool | None = None  # one q/k/v projection (default: in fast mode)
    window_step: int | None = None  # attention window granularity (see runners.CachedRunner)
    memory_fraction: float = 0.5  # of free device memory the cache may take when `slots` is None
    max_slots: int = 256
    pipeline: bool | None = None  # launch the next chunk before reading one; None: in fast mode
    prefill_graphs: bool | None = None  # prompts' first chunks from CUDA graphs (prefill_graphs.py); None: in fast mode
    chunk_graphs: bool = True  # Triton buckets: a whole decode chunk as one CUDA graph (fast mode)
    compact: bool = True  # move running rows down into free slots when they would fit a smaller bucket
    prefill_stream: bool = False  # first-chunk replays on a second stream, beside the decode chunk (experimental)
    tool_workers: int = 4
    followup_wait: float = 0.001  # seconds the loop waits for follow-ups after a finish (Scheduler._await_followups)
    take_by_request: bool = True  # read a chunk's tokens request by request (False: the first per-step loop)

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"SchedulerConfig.{name} must be {allowed} (got {getattr(self, name)!r})")

        for name in ("slots", "max_context", "sync_every", "window_step", "prefill_budget", "triton_max_rows"):
            value = getattr(self, name)
            check(name, value is None or (isinstance(value, int) and value >= 1), "an integer >= 1 or None")
        for name in ("max_queue", "max_slots", "tool_workers"):
            check(name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        check("mode", self.mode in (None, "fast", "eager", "naive"), "'fast', 'eager', 'naive' or None")
        check("kernels", self.kernels in KERNELS, f"one of {KERNELS}")
        check("memory_fraction", 0 < self.memory_fraction <= 1, "in (0, 1]")
        check("followup_wait", isinstance(self.followup_wait, (int, float)) and 0 <= self.followup_wait <= 1,
              "a number of seconds in [0, 1]")


def check_request(prompt_tokens, params: SamplingParams, vocab: int, slots: int,
                  max_context: int) -> tuple[list[int], int]:
    """The prompt as ints and the max_tokens it will run with; raises RequestError."""
    if not isinstance(params, SamplingParams):
        raise RequestError("params must be a SamplingParams", param="params")
    try:
        prompt = [int(t) for t in prompt_tokens]
    except (TypeError, ValueError):
        raise RequestError("prompt must be a sequence of token ids", param="prompt") from None
    if not prompt:
        raise RequestError("prompt must hold at least one token", param="prompt")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
    if params.n > slots:
        raise RequestError(f"n must be at most {slots} (the scheduler's slots); got {params.n}", param="n")
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, max_context - len(prompt)))
    if len(prompt) + max_tokens > max_context:
        raise ContextOverflowError(len(prompt), max_tokens, max_context)
    return prompt, max_tokens
