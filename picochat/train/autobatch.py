"""Device-batch-size finder: the largest exact batch that fits, found from measured memory.

Owns `--device-batch-size auto`. The trainer hands over one real micro-step and gets back a device
batch size and a gradient-accumulation count with ``device_batch × grad_accum × world × T == total``.

Public API::

    find_device_batch_size(
        train_step,                 # (batch_size: int) -> None: one REAL micro-step on random tokens:
                                    #   forward (compiled where training is) + backward + opt.step + zero_grad
        *, model, optimizers,       # left exactly as found: weights, grads, optimizer state, RNG, train/eval
        seq_len, total_batch_tokens, world_size=1, device="cuda",
        cache_key=None,             # model config, dtype, compile mode...; world, GPU, torch are added here
        default=None,               # CPU/MPS (no probe given): validated and returned without probing
        probe=None,                 # MemoryProbe; None = CudaMemoryProbe(device) on CUDA
        headroom_bytes=None,        # budget = total − headroom; None = max(min(1 GiB, total/8), 5% total)
        max_batch_size=None, use_cache=True, cache_path=None, warmup_steps=1,
        accum_reserve_bytes=None,   # extra room when grad_accum > 1; None = the model's gradient bytes
        eager_probe=False,          # the one probe without torch.compile (see below)
    ) -> AutoBatchResult            # .device_batch_size (= .chosen), .grad_accum, .seconds, .compiles,
                                    # .probes, .fit_a/.fit_b, .predicted_peak, .measured_peak, .cache_hit,
                                    # .cache_key, .table(), .to_dict()
    mark_bad(cache_key, batch_size=None, path=None)   # the trainer (train/loop.py) calls this when
                                                      #   training runs out of memory at the chosen size
    candidate_batch_sizes(total_batch_tokens, seq_len, world_size) -> list[int]
    is_oom_error(exc) -> bool

How: candidates are the b with ``total % (b·T·W) == 0``. Probe the two smallest on the real step
(one warm-up call so optimizer state and compiled graphs exist, then one measured call), fit
``peak ≈ a + b·batch``, predict the largest candidate under ``total − headroom``, verify it on the real
step, and step down on failure (refitting when the failed step still produced a measurement). That is
2 probe shapes + 1 verify shape = 3 distinct shapes (one compile each under ``dynamic=False``) in the
normal case; ``compiles`` reports the distinct shapes run. On CUDA (a probe with ``current_bytes``)
one probe (at batch 4) does: the memory held just before the measured step (weights, optimizer state) is the
line's intercept, so the second probe shape (a whole cold compile) is saved: 1 probe + 1 verify, and a
second verify only when the line through the verified size says a larger one fits with 15% to spare
(`EXTRAPOLATION_SLACK`: with a 5% margin a doubling ran out of memory, through fragmentation).
With ``eager_probe=True`` (the trainer sets it for pretraining) that one probe runs with torch.compile
switched off (``torch.compiler.set_stance("force_eager")``): eager steps hold more activations than
compiled ones, so the line errs on the safe side, and the only shape compiled is the verified one,
which training then reuses: one cold compile in the common case. Every decision uses values all-reduced
over ranks (fits: MIN, peak: MAX, total memory: MIN), so all ranks take the same path and agree.

Budget: ``total − headroom``, where total = min(fraction × GPU memory, free + already reserved), so
``torch.cuda.set_per_process_memory_fraction`` is honoured. A candidate that needs gradient
accumulation must also leave room for one full set of gradients (``accum_reserve_bytes``): later
micro-steps run their forward with gradients already allocated, which a one-micro-step probe never sees.

Contract for ``train_step`` (the caller's side):
- the step training will run, at that batch: same compiled module, same call signature (kwargs such as
  ``loss_reduction`` or ``attn_mask`` are guarded on, so a different call compiles a different graph);
  with ``torch.compile(dynamic=False)`` each distinct batch is one compile, and the verified size is
  exactly the graph training then reuses; dynamo's recompile limit (8) is far above what we run;
- no collectives inside (wrap a DDP model's forward/backward in ``no_sync()``): if one rank ran out of
  memory mid-step while the others sat in a gradient all-reduce, they would wait forever. The finder's
  own all-reduces come after each probe, on every rank, OOM or not;
- it may change weights, grads, optimizer state and RNG freely: all are restored afterwards (weights
  and optimizer tensors in place from CPU copies; state a fresh optimizer lacked is dropped).

Memory is read through `MemoryProbe` so the very same code runs on CPU with a simulated budget.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..common import gpu_name, log
from .autobatch_cache import cache_key_hash, default_cache_path, load_cache, mark_bad, update_cache
from .snapshot import drop_grads, free_memory, restore_snapshot, take_snapshot

GiB = 1024**3
ONE_PROBE_BATCH = 4  # the size of the single probe, when the memory probe reports resting memory
# A second verify only if the line through the first verify's measurement puts the larger size under
# 85% of the budget. A 5% margin was not enough: on an H200 (d12, 139.2 GiB usable) the line through
# batch 64 put batch 128 at 122.9 and 127.7 GiB in two runs, and batch 128 ran out of memory both times
# (the caching allocator's fragmentation after the 64 verify: with expandable segments the same step
# peaked at 122.75 GiB, on the line); each such attempt cost a whole cold compile (~15-19 s) for nothing.
EXTRAPOLATION_SLACK = 0.85


class AutoBatchError(RuntimeError):
    """No valid device batch size (not divisible, or even the smallest does not fit)."""


class MemoryProbe(Protocol):
    """Where peak memory comes from: CUDA allocator stats for real, a simulation in tests."""

    def reset(self) -> None: ...  # start a new peak measurement
    def peak_bytes(self) -> int: ...  # peak allocated bytes since reset()
    def total_bytes(self) -> int: ...  # memory this process may use in all
    # Optional: `current_bytes() -> int`, memory held right now. With it the finder reads the
    # resting memory (weights, optimizer state) before a probe and fits from one probe, not two.
    # Optional: `reserved_peak_bytes() -> int`, the allocator's peak reservation since reset()
    # (allocated bytes plus what fragmentation costs); recorded with each probe, not fitted.


class CudaMemoryProbe:
    """Peak allocated bytes from the caching allocator; the total respects the per-process fraction."""

    def __init__(self, device: torch.device, memory_fraction: float | None = None):
        self.device = torch.device(device)
        self.memory_fraction = memory_fraction

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def current_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def reserved_peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))

    def total_bytes(self) -> int:
        frac = self.memory_fraction
        if frac is None:  # set_per_process_memory_fraction stands in for a smaller GPU: honour it
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            frac = float(getter(self.device)) if getter is not None else 1.0
        free, total = torch.cuda.mem_get_info(self.device)
        # Other processes and the CUDA context hold memory the allocator can never get: what we can
        # reach is what is free plus what our allocator already holds, capped by the fraction.
        reachable = free + torch.cuda.memory_reserved(self.device)
        return int(min(frac * total, reachable))

    def capacity_bytes(self) -> int:
        """The nominal size (fraction × GPU memory): stable across runs, so it keys the cache."""
        frac = self.memory_fraction
        if frac is None:
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            frac = float(getter(self.device)) if getter is not None else 1.0
        return int(frac * torch.cuda.get_device_properties(self.device).total_memory)

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)


@dataclass
class ProbeRecord:
    batch_size: int
    peak_bytes: int | None  # None when it ran out of memory
    fits: bool  # ran without OOM on every rank and peak ≤ budget
    oom: bool
    phase: str  # probe | eager-probe | verify | cache-verify
    rest_bytes: int | None = None  # memory held just before the measured step (weights, optimizer state)
    reserved_bytes: int | None = None  # the allocator's peak reservation in the measured step
    seconds: float = 0.0  # wall time of this probe (its warm-up call includes any compile)


@dataclass
class AutoBatchResult:
    device_batch_size: int
    grad_accum: int
    seconds: float = 0.0
    compiles: int = 0  # distinct batch shapes run (each may compile once)
    probes: list[ProbeRecord] = field(default_factory=list)
    fit_a: float | None = None  # peak ≈ fit_a + fit_b · batch (bytes)
    fit_b: float | None = None
    total_bytes: int | None = None
    budget_bytes: int | None = None  # total − headroom
    accum_reserve_bytes: int = 0  # further room kept when grad_accum > 1
    predicted_peak: int | None = None
    measured_peak: int | None = None
    cache_hit: bool = False
    cache_key: str | None = None
    candidates: list[int] = field(default_factory=list)
    skipped: str | None = None  # reason when no probing was done (CPU/MPS)

    @property
    def chosen(self) -> int:
        return self.device_batch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chosen"] = self.device_batch_size
        return d

    def table(self) -> str:
        def gib(x: float | None) -> str:
            return "-" if x is None else _fmt(x)

        rows = [("batch", "peak", "reserved", "result", "phase", "seconds")]
        rows += [(str(p.batch_size), gib(p.peak_bytes), gib(p.reserved_bytes),
                  "ok" if p.fits else ("oom" if p.oom else "over budget"), p.phase, f"{p.seconds:.1f}")
                 for p in self.probes]
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["autobatch probes:"] + ["  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        fit = "-" if self.fit_b is None else f"{gib(self.fit_a)} + {gib(self.fit_b)} × batch"
        lines += [
            f"  fit            {fit}",
            f"  budget         {gib(self.budget_bytes)} of {gib(self.total_bytes)}"
            + (f" (− {gib(self.accum_reserve_bytes)} for grads when accumulating)" if self.accum_reserve_bytes else ""),
            f"  chosen         {self.device_batch_size} (grad accum {self.grad_accum})",
            f"  peak           predicted {gib(self.predicted_peak)}, measured {gib(self.measured_peak)}",
            f"  time           {self.seconds:.1f} s, {self.compiles} shapes",
            f"  cache          {'hit' if self.cache_hit else 'miss'}" + (f" ({self.cache_key[:12]})" if self.cache_key else ""),
        ]
        if self.skipped:
            lines.append(f"  skipped        {self.skipped}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# candidates and error classification


def candidate_batch_sizes(total_batch_tokens: int, seq_len: int, world_size: int = 1) -> list[int]:
    """Every b with total % (b·T·W) == 0, ascending; an error when there is none."""
    if total_batch_tokens <= 0 or seq_len <= 0 or world_size <= 0:
        raise AutoBatchError(f"total_batch_tokens={total_batch_tokens}, seq_len={seq_len}, "
                             f"world_size={world_size} must all be positive")
    per_row = seq_len * world_size
    if total_batch_tokens % per_row:
        raise AutoBatchError(
            f"--total-batch-tokens {total_batch_tokens} is not divisible by seq_len × world_size = "
            f"{seq_len} × {world_size} = {per_row}, so no device batch keeps the total exact; "
            f"use a multiple of {per_row} (e.g. {max(1, total_batch_tokens // per_row) * per_row})")
    rows = total_batch_tokens // per_row  # device_batch × grad_accum
    return [b for b in range(1, rows + 1) if rows % b == 0]


def is_oom_error(exc: BaseException) -> bool:
    """Out-of-memory errors only; compiled code may wrap the original one as __cause__."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError):
            msg = str(e)
            # cuBLAS reports a failed workspace allocation under its own name; it is still an OOM.
            if "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg:
                return True
        e = e.__cause__ or getattr(e, "inner_exception", None)
        seen += 1
    return False


# ---------------------------------------------------------------------------------------------------
# ranks


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Elementwise MAX over ranks (MIN is MAX of negatives); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# the finder


def find_device_batch_size(
    train_step: Callable[[int], None],
    *,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    seq_len: int,
    total_batch_tokens: int,
    world_size: int = 1,
    device: torch.device | str = "cuda",
    cache_key: Mapping[str, Any] | None = None,
    default: int | None = None,
    probe: MemoryProbe | None = None,
    headroom_bytes: int | None = None,
    max_batch_size: int | None = None,
    use_cache: bool = True,
    cache_path: Path | None = None,
    warmup_steps: int = 1,
    accum_reserve_bytes: int | None = None,
    eager_probe: bool = False,
) -> AutoBatchResult:
    """The largest exact device batch whose real step fits; see the module docstring.

    The steps: the candidates (exact sizes), the memory budget, the cache entry for everything that
    changes the answer, then a verified cache hit or a search, then the cache update."""
    t0 = time.perf_counter()
    device = torch.device(device)
    rows = total_batch_tokens // (seq_len * world_size) if seq_len * world_size else 0
    candidates = candidate_batch_sizes(total_batch_tokens, seq_len, world_size)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    if max_batch_size is not None:
        candidates = [b for b in candidates if b <= max_batch_size] or candidates[:1]
    if probe is None and device.type != "cuda":
        return _skip(device, default, candidates, rows, t0)
    probe = probe or CudaMemoryProbe(device)

    budget = _Budget.measure(probe, device, model, rows, headroom_bytes, accum_reserve_bytes)
    identity = {  # everything that changes the answer; free memory varies run to run, so not that
        "user": dict(cache_key or {}), "seq_len": seq_len, "total_batch_tokens": total_batch_tokens,
        "world_size": world_size, **_gpu_identity(probe, device, budget.total), "headroom": headroom_bytes,
        "accum_reserve": budget.accum_reserve, "max_batch_size": max_batch_size, "torch": torch.__version__,
    }
    key = cache_key_hash(identity)
    path = Path(cache_path) if cache_path else default_cache_path()
    entry = load_cache(path)["entries"].get(key, {}) if use_cache else {}
    candidates = _below_bad_sizes(entry, candidates, device, path, key)

    res = AutoBatchResult(device_batch_size=0, grad_accum=0, total_bytes=budget.total, budget_bytes=budget.budget,
                          accum_reserve_bytes=budget.accum_reserve,
                          cache_key=key if use_cache else None, candidates=list(candidates))
    prober = _Prober(train_step, model, optimizers, probe, device, budget, res, warmup_steps)
    prober.snapshot()
    try:
        chosen, candidates = _try_cached(prober, entry, candidates, use_cache, key, path, seq_len)
        if chosen is None:
            chosen = _search(prober.run, candidates, budget.limit, res, model, seq_len, budget.total,
                             one_probe=prober.has_rest, eager_probe=eager_probe)
    except BaseException:
        # Restore what we can, but never let a second failure (a sticky CUDA error) hide the first.
        with contextlib.suppress(Exception):
            prober.leave_no_trace()
        raise
    prober.leave_no_trace()

    b = int(-_max_over_ranks([-float(chosen.batch_size)], device)[0])  # identical by construction; be sure
    res.device_batch_size, res.grad_accum = b, rows // b
    res.measured_peak = chosen.peak_bytes
    res.compiles = len(prober.shapes)
    res.seconds = time.perf_counter() - t0
    if use_cache and not res.cache_hit:
        _remember(path, key, res, identity)
    log.info("%s", res.table())
    return res


@dataclass
class _Budget:
    """What a probe may peak at: total − headroom, less one set of gradients when accumulating."""

    total: int
    budget: int
    accum_reserve: int
    rows: int

    @classmethod
    def measure(cls, probe: MemoryProbe, device: torch.device, model: nn.Module, rows: int,
                headroom_bytes: int | None, accum_reserve_bytes: int | None) -> "_Budget":
        total = int(-_max_over_ranks([-float(probe.total_bytes())], device)[0])  # the smallest GPU decides
        if headroom_bytes is None:
            headroom_bytes = int(max(min(GiB, total / 8), 0.05 * total))
        if accum_reserve_bytes is None:
            accum_reserve_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return cls(total, total - headroom_bytes, accum_reserve_bytes, rows)

    def limit(self, b: int) -> int:
        # The probe is one micro-step; with accumulation, later micro-steps run their forward with a
        # full set of gradients already allocated, which the probe never sees: keep room for them.
        return self.budget - (self.accum_reserve if self.rows // b > 1 else 0)


def _gpu_identity(probe: MemoryProbe, device: torch.device, total: int) -> dict[str, Any]:
    name_fn, cap_fn = getattr(probe, "name", None), getattr(probe, "capacity_bytes", None)
    return {"gpu": name_fn() if callable(name_fn) else gpu_name(device),
            "gpu_memory": int(cap_fn()) if callable(cap_fn) else total}


def _below_bad_sizes(entry: dict, candidates: list[int], device: torch.device, path: Path, key: str) -> list[int]:
    """A size that ran out of memory in training rules out it and anything larger (on any rank)."""
    min_bad = int(-_max_over_ranks([-float(min(entry.get("bad_sizes") or [2**52]))], device)[0])
    if min_bad >= 2**52:
        return candidates
    log.info("autobatch: cache marks batch %d bad for this setup; considering smaller sizes", min_bad)
    candidates = [b for b in candidates if b < min_bad]
    if not candidates:
        raise AutoBatchError(f"every candidate batch is marked bad in {path} (key {key[:12]}); "
                             f"delete that entry to search again")
    return candidates


class _Prober:
    """Runs the real step at a size on every rank and agrees on the outcome; restores the model after."""

    def __init__(self, train_step: Callable[[int], None], model: nn.Module, optimizers, probe: MemoryProbe,
                 device: torch.device, budget: _Budget, res: AutoBatchResult, warmup_steps: int):
        self.train_step, self.model, self.optimizers, self.probe = train_step, model, optimizers, probe
        self.device, self.budget, self.res, self.warmup_steps = device, budget, res, warmup_steps
        self.shapes: set[int] = set()
        self.snap = None
        self.has_rest = callable(getattr(probe, "current_bytes", None))
        self.has_reserved = callable(getattr(probe, "reserved_peak_bytes", None))

    def snapshot(self) -> None:
        self.snap = take_snapshot(self.model, self.optimizers)

    def run(self, b: int, phase: str, eager: bool = False) -> ProbeRecord:
        """Warm-up call(s), then one measured call at b; all ranks agree on fit / OOM / error.
        `eager`: with every torch.compile'd function run eagerly (no compile for this shape)."""
        if not eager:
            self.shapes.add(b)
        t0 = time.perf_counter()
        peak, rest, reserved, oom, err = 0, 0, 0, False, None
        drop_grads(self.model, self.optimizers)
        stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        try:
            with stance:
                rest, peak, reserved = self._measure(b)
        except Exception as e:  # noqa: BLE001 - classified right here; non-OOM re-raised below
            if is_oom_error(e):
                oom = True
            else:
                err = e
            del e  # the traceback pins activations: drop it before freeing
        if oom:
            drop_grads(self.model, self.optimizers)
            free_memory(self.device)
        not_fit, errored, peak_all, rest_all, reserved_all = _max_over_ranks(
            [float(oom), float(err is not None), float(peak), float(rest), float(reserved)], self.device)
        if err is not None:
            raise err
        if errored:
            raise RuntimeError("autobatch: another rank failed with a non-OOM error during the probe")
        oom_all = bool(not_fit)
        rec = ProbeRecord(b, None if oom_all else int(peak_all), not oom_all and peak_all <= self.budget.limit(b),
                          oom_all, phase, int(rest_all) if self.has_rest and not oom_all else None,
                          int(reserved_all) if self.has_reserved and not oom_all else None,
                          time.perf_counter() - t0)
        self.res.probes.append(rec)
        return rec

    def _measure(self, b: int) -> tuple[int, int, int]:
        """(memory at rest, peak, peak reserved) of one step at b, after warm-up so optimizer state,
        compiled graphs and autotuning exist."""
        for _ in range(self.warmup_steps):
            self.train_step(b)
        drop_grads(self.model, self.optimizers)
        if self.has_reserved and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # cached blocks of earlier sizes would count as this step's reservation
        self.probe.reset()
        rest = self.probe.current_bytes() if self.has_rest else 0
        self.train_step(b)
        return rest, self.probe.peak_bytes(), self.probe.reserved_peak_bytes() if self.has_reserved else 0

    def leave_no_trace(self) -> None:
        drop_grads(self.model, self.optimizers)
        if self.snap is not None:
            restore_snapshot(self.snap, self.optimizers)
        free_memory(self.device)
        self.probe.reset()  # the trainer's own peak-memory report starts from here


def _try_cached(prober: _Prober, entry: dict, candidates: list[int], use_cache: bool, key: str, path: Path,
                seq_len: int) -> tuple[ProbeRecord | None, list[int]]:
    """Verify a cached size that every rank holds; on failure mark it bad and search below it."""
    device, res = prober.device, prober.res
    cached = entry.get("device_batch_size") if (entry and not entry.get("bad")) else None
    miss, hi, neg_lo = _max_over_ranks([float(cached is None), float(cached or 0), -float(cached or 0)], device)
    if miss or hi != -neg_lo or int(hi) not in candidates:
        return None, candidates
    rec = prober.run(int(hi), "cache-verify")
    if rec.fits:
        res.cache_hit, res.predicted_peak = True, entry.get("measured_peak")
        return rec, candidates
    log.warning("autobatch: cached batch %d failed verification; searching again", int(hi))
    if use_cache:
        mark_bad(key, int(hi), path)
    candidates = [b for b in candidates if b < int(hi)]
    if not candidates:
        _too_big(rec, prober.budget.limit(rec.batch_size), prober.budget.total, prober.model, seq_len)
    return None, candidates


def _remember(path: Path, key: str, res: AutoBatchResult, identity: dict) -> None:
    def upd(e: dict[str, Any]) -> None:
        e.update(device_batch_size=res.device_batch_size, bad=False, measured_peak=res.measured_peak,
                 identity=identity, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    update_cache(path, key, upd)


def _search(run: Callable[..., ProbeRecord], candidates: list[int], limit: Callable[[int], int],
            res: AutoBatchResult, model: nn.Module, seq_len: int, total: int, one_probe: bool = False,
            eager_probe: bool = False) -> ProbeRecord:
    """Probe, fit a line, verify; step down (refitting on measurements) on failure.

    With `one_probe` (the probe reports resting memory) the line runs through (0, memory at rest) and
    one probe at batch 4 (run eagerly with `eager_probe`: eager steps keep more activations than
    compiled ones, so the line still errs high, and no shape is compiled before the verify). A line
    that errs high makes the verified size err small, so one more verify is allowed when the line
    through the verified size's own measurement says a larger size fits with 15% to spare.
    Otherwise two probes give the line."""
    if not candidates:
        raise AutoBatchError("no candidate batch size left to try")
    measured: dict[int, int] = {}
    first = None
    if one_probe and len(candidates) > 1:
        # batch 4 (or the largest size up to 4): per-step buffers spread over 4 rows overstate the
        # slope by a quarter of their size, not a half as at batch 2, and batch 4 fits nearly anywhere
        first = run([c for c in candidates if c <= ONE_PROBE_BATCH][-1], "eager-probe" if eager_probe else "probe",
                    eager=eager_probe)
        if first.fits and first.rest_bytes is not None:
            measured = {0: first.rest_bytes, first.batch_size: first.peak_bytes}
        else:
            first = None  # does not fit (or no reading): the two-probe path from the smallest size
    extend = first is not None
    if first is None:
        first = run(candidates[0], "probe")
        if not first.fits:
            _too_big(first, limit(first.batch_size), total, model, seq_len)
        measured = {first.batch_size: first.peak_bytes}
    best, upper = first, math.inf  # best: largest size known to fit; upper: smallest known not to
    if not extend and len(candidates) > 1:
        second = run(candidates[1], "probe")
        if second.peak_bytes is not None:
            measured[second.batch_size] = second.peak_bytes
        if second.fits:
            best = second
        else:
            upper = second.batch_size
    cap, slack = math.inf, 1.0  # cap: only used when there is no slope to go by
    while True:
        if len(measured) >= 2:  # fit through the two largest measurements: linear near the target
            (x0, y0), (x1, y1) = sorted(measured.items())[-2:]
            slope = (y1 - y0) / (x1 - x0)
            res.fit_b, res.fit_a = slope, y1 - slope * x1

        def predicted(c: int) -> float | None:
            return None if res.fit_b is None else res.fit_a + res.fit_b * c

        ok = [c for c in candidates if best.batch_size < c < upper and c <= cap
              and (predicted(c) is None or predicted(c) <= slack * limit(c))]
        if not ok and extend:  # the one-probe line errs high: the next size up may still fit, so try it
            ok = [c for c in candidates if best.batch_size < c < upper][:1]
        if not ok:
            p = predicted(best.batch_size)
            res.predicted_peak = int(p) if p is not None else best.peak_bytes
            return best
        target = ok[-1]
        p = predicted(target)
        res.predicted_peak = None if p is None else int(p)
        rec = run(target, "verify")
        if rec.fits and cap == math.inf and not extend:
            return rec
        if rec.fits:  # bisecting, or (one probe) checking whether the measured line allows more
            best = rec
            if extend:  # from now on the line runs through this real (compiled) measurement
                if eager_probe:  # an eager peak and a compiled one do not lie on one line
                    measured.pop(first.batch_size, None)
                measured[target] = rec.peak_bytes
                extend, slack = False, EXTRAPOLATION_SLACK
        else:
            upper = target  # step down; a measured (over-budget) peak sharpens the next prediction
            extend = False
            if rec.peak_bytes is not None:
                measured[target] = rec.peak_bytes
        if cap < math.inf or (rec.peak_bytes is None and (res.fit_b is None or res.fit_b <= 0)):
            # Peaks that do not grow, yet an OOM: the fit cannot guide us, so bisect what is left.
            inside = [c for c in candidates if best.batch_size < c < upper]
            cap = inside[(len(inside) - 1) // 2] if inside else 0


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.2f} MiB"


def _too_big(rec: ProbeRecord, budget: int, total: int, model: nn.Module, seq_len: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    need = "ran out of memory" if rec.peak_bytes is None else f"needs {_fmt(rec.peak_bytes)} at peak"
    raise AutoBatchError(
        f"device batch size {rec.batch_size} does not fit: one training step at batch {rec.batch_size} × "
        f"seq_len {seq_len} with a {n_params / 1e6:.1f}M-parameter model {need}, but the budget is "
        f"{_fmt(budget)} ({_fmt(total)} usable minus headroom). Levers: a shorter "
        f"--seq-len, a smaller --depth, or a --total-batch-tokens that allows smaller steps; "
        f"or free GPU memory held by other processes")


def _skip(device: torch.device, default: int | None, candidates: list[int], rows: int, t0: float) -> AutoBatchResult:
    """No memory probe on CPU/MPS: validate the configured default against the exact-total rule."""
    if default is None:
        raise AutoBatchError(f"automatic device batch size needs CUDA (device is {device.type}); "
                             f"pass --device-batch-size N")
    fitting = [b for b in candidates if b <= default]
    if not fitting:
        raise AutoBatchError(f"device batch size {default} is not positive")
    chosen = fitting[-1]
    reason = f"no memory probe on {device.type}: using the configured device batch size {default}"
    if chosen != default:
        reason += (f", which does not divide the total exactly; using {chosen} instead "
                   f"(largest valid size ≤ {default}; valid: {candidates})")
    (log.warning if chosen != default else log.info)("autobatch: %s", reason)
    return AutoBatchResult(device_batch_size=chosen, grad_accum=rows // chosen, candidates=candidates,
                           skipped=reason, seconds=time.perf_counter() - t0)
