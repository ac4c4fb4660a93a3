"""Checkpoints: atomic save, verified load, resume.

A checkpoint is a folder `<run>/<stage>/step_NNNNNN/` holding
  model.safetensors     fp32 weights
  meta.json             model + train config, step, metrics, sha256 of every other file
  optim.pt              optimizer states (identical on every rank, so written once)
  train_state.pt        each rank's loader state and RNG states, and the step's counters
It is written into a temp folder and renamed into place, so a half-written checkpoint never looks
like a checkpoint. Loading checks every file's hash and the config, naming the file or field at fault.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..common import atomic_dir
from ..runs import CheckpointError, list_checkpoints, sha256_file


def save_checkpoint(stage_dir: Path, step: int, model: torch.nn.Module, optimizers: list | None,
                    meta: dict, train_state: dict | None = None, keep_last: int = 2) -> Path:
    """Write step `step` atomically; keep only the newest `keep_last` checkpoints."""
    from safetensors.torch import save_file

    target = Path(stage_dir) / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if optimizers is not None:
            torch.save([opt.state_dict() for opt in optimizers], tmp / "optim.pt")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        full_meta = {**meta, "step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": files}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    for old in list_checkpoints(stage_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def check_compatible(meta: dict, expected: dict, where: Path) -> None:
    """Raise naming the first field whose value differs between a checkpoint and this run."""
    for key, want in expected.items():
        have = meta.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            for sub, w in want.items():
                if have.get(sub) != w:
                    raise CheckpointError(f"{where}: config mismatch in {key}.{sub}: checkpoint has "
                                          f"{have.get(sub)!r}, this run has {w!r}")
        elif have != want:
            raise CheckpointError(f"{where}: config mismatch in {key}: checkpoint has {have!r}, this run has {want!r}")


def load_training_state(path: Path, optimizers: list) -> dict:
    """Restore optimizer states; return the saved train state (loader/RNG/counters)."""
    path = Path(path)
    states = torch.load(path / "optim.pt", map_location="cpu", weights_only=False)
    if len(states) != len(optimizers):
        raise CheckpointError(f"{path / 'optim.pt'}: {len(states)} optimizers saved, {len(optimizers)} built")
    for opt, state in zip(optimizers, states):
        opt.load_state_dict(state)
    ts = path / "train_state.pt"
    return torch.load(ts, map_location="cpu", weights_only=False) if ts.exists() else {}
