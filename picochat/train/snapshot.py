"""Snapshot and restore of training state: weights, buffers, gradients, optimizer state, module
train/eval modes and every RNG. Lets a probe (the batch-size finder) run real training steps and leave
no trace: weights and optimizer tensors are restored in place from CPU copies, and state that a fresh
optimizer lacked is dropped again."""

from __future__ import annotations

import contextlib
import copy
import gc
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn




@dataclass
class _Saved:
    live: torch.Tensor  # the optimizer's own tensor, restored in place
    value: torch.Tensor  # its CPU copy


@dataclass
class _Snapshot:
    params: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, CPU copy)
    grads: list[tuple[nn.Parameter, torch.Tensor | None]]
    opt_state: list[tuple[dict, dict]]  # per optimizer: (saved state by param, saved group hyperparams)
    modes: list[tuple[nn.Module, bool]]
    rng: dict[str, Any]


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def take_snapshot(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> _Snapshot:
    params = [(t, _cpu_copy(t)) for t in list(model.parameters()) + list(model.buffers())]
    grads = [(p, None if p.grad is None else _cpu_copy(p.grad)) for p in model.parameters()]
    opt_state = []
    for opt in optimizers:
        # Keep the live state tensors (restored in place, so anything holding them still sees them)
        # and CPU copies of their values; a fresh optimizer has no state and is restored to none.
        state = {p: {k: _Saved(v, _cpu_copy(v)) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                 for p, s in opt.state.items()}
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt_state.append((state, groups))
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        rng["numpy"] = np.random.get_state()
    return _Snapshot(params, grads, opt_state, [(m, m.training) for m in model.modules()], rng)


@torch.no_grad()
def restore_snapshot(snap: _Snapshot, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    for live, saved in snap.params:
        live.copy_(saved)
    for p, g in snap.grads:
        p.grad = None if g is None else g.to(p.device)
    for opt, (state, groups) in zip(optimizers, snap.opt_state):
        restored = {}
        for p, s in state.items():
            restored[p] = {}
            for k, v in s.items():
                if isinstance(v, _Saved):
                    v.live.copy_(v.value)
                    restored[p][k] = v.live
                else:
                    restored[p][k] = copy.deepcopy(v)
        opt.state.clear()  # drops state the probes created for params that had none
        opt.state.update(restored)
        for g, saved in zip(opt.param_groups, groups):
            for k in [k for k in g if k != "params" and k not in saved]:
                del g[k]
            g.update(copy.deepcopy(saved))
    for m, training in snap.modes:
        m.training = training
    random.setstate(snap.rng["python"])
    torch.set_rng_state(snap.rng["torch"])
    if "cuda" in snap.rng:
        torch.cuda.set_rng_state_all(snap.rng["cuda"])
    if "numpy" in snap.rng:
        import numpy as np

        np.random.set_state(snap.rng["numpy"])


def drop_grads(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    for p in model.parameters():
        p.grad = None
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def free_memory(device: torch.device | str | None = None) -> None:
    """Hand freed CUDA memory back (after collecting cycles that may hold tensors). For a device that
    is not CUDA there is no allocator cache to empty, and a full `gc.collect()` of a large process
    costs ~0.2-1 s: skipped."""
    if device is not None and torch.device(device).type != "cuda":
        return
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
