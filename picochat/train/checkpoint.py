"""Checkpoints: atomic save, verified load, resume, and what happens when the disk is full.

A checkpoint is a folder `<run>/<stage>/step_NNNNNN/` holding
  model.safetensors     fp32 weights
  meta.json             model + train config, step, metrics, sha256 of every other file
  optim.pt              optimizer states (identical on every rank, so written once)
  train_state.pt        each rank's loader state and RNG states, and the step's counters
It is written into a temp folder, fsynced and renamed into place, so a half-written checkpoint never
looks like a checkpoint; then it is read back and verified, and only then are old ones pruned
(`keep_last`). A write that fails (disk full, quota, file size limit) raises `CheckpointWriteError`
naming the folder and the bytes a checkpoint needs; the temp folder is removed and the previous
checkpoints are untouched. Loading checks every file's hash and the config, naming the file or field
at fault. Temp folders left by a process killed mid-save are cleared by `clear_stale_writes`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from ..common import atomic_dir, log
from ..runs import (CheckpointError, latest_checkpoint, list_checkpoints, load_weights, read_meta, sha256_file,
                    step_dir)

METADATA_SLACK = 1 << 16  # meta.json, pickling and zip headers, beyond the tensors themselves


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; nothing of it was left behind."""


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples (how big a state is on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizers: list | None, train_state: dict | None = None) -> int:
    """Bytes one checkpoint takes: fp32 weights, optimizer states, train state, metadata."""
    weights = sum(v.numel() * 4 for v in model.state_dict().values())
    optim = sum(tensor_bytes(opt.state_dict()) for opt in optimizers or [])
    if optimizers and optim == 0:  # states are created at the first step: assume two fp32 buffers a weight
        optim = 2 * weights
    return weights + optim + tensor_bytes(train_state) + METADATA_SLACK


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def checkpoints_bytes(stage_dir: Path) -> int:
    return sum(f.stat().st_size for p in list_checkpoints(stage_dir) for f in p.iterdir() if f.is_file())


def space_warning(stage_dir: Path, checkpoint_bytes: int, keep_last: int) -> str | None:
    """A warning when the disk cannot hold the checkpoints training will keep, else None.

    While a checkpoint is written the `keep_last` older ones still exist, so the peak is keep_last + 1
    checkpoints (with keep_last 0, every checkpoint is kept: at least two are counted)."""
    peak = checkpoint_bytes * (keep_last + 1 if keep_last > 0 else 2)
    more = peak - checkpoints_bytes(stage_dir)
    free = free_bytes(stage_dir)
    if more <= free:
        return None
    return (f"low disk space for checkpoints in {stage_dir}: {_size(free)} free, and keeping {keep_last or 'all'} "
            f"checkpoint(s) of {_size(checkpoint_bytes)} each needs {_size(more)} more; a save that does not fit "
            f"fails (the previous checkpoint stays usable). Free space or lower --keep-last")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def _os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed write. Writers wrap it: torch.save raises a
    RuntimeError whose context is the OSError, safetensors an error quoting "(os error N)"."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"os error (\d+)", str(exc))
    if m:
        return os.strerror(int(m.group(1)))
    return f"{type(exc).__name__}: {exc}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, step: int, model, optimizers, meta: dict, train_state) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    # Through an open file: a failed write then carries the OSError (torch.save to a path loses it).
    for name, obj in (("optim.pt", [opt.state_dict() for opt in optimizers] if optimizers is not None else None),
                      ("train_state.pt", train_state)):
        if obj is not None:
            with open(tmp / name, "wb") as f:
                torch.save(obj, f)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    full_meta = {**meta, "step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": files}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    for p in tmp.iterdir():  # on disk before the rename makes it a checkpoint
        _fsync_file(p)


def save_checkpoint(stage_dir: Path, step: int, model: torch.nn.Module, optimizers: list | None,
                    meta: dict, train_state: dict | None = None, keep_last: int = 2) -> Path:
    """Write step `step` atomically and verify it; then keep only the newest `keep_last` (0: all)."""
    stage_dir = Path(stage_dir)
    target = step_dir(stage_dir, step)
    try:
        with atomic_dir(target) as tmp:
            _write_files(tmp, step, model, optimizers, meta, train_state)
        _fsync_dir(stage_dir)  # the rename itself survives a power cut
    except Exception as e:  # any failed write: disk full, quota, file size limit, I/O error
        needed = estimate_checkpoint_bytes(model, optimizers, train_state)
        previous = list_checkpoints(stage_dir)
        kept = (f"the previous checkpoint {previous[-1].name} is intact (--resume uses it)" if previous
                else "there is no earlier checkpoint")
        raise CheckpointWriteError(
            f"could not write checkpoint {target.name} in {stage_dir}: {_os_reason(e)}. A checkpoint needs about "
            f"{_size(needed)} ({needed:,} bytes); {_size(free_bytes(stage_dir))} are free there. Nothing was "
            f"left behind; {kept}") from e
    try:
        read_meta(target, verify=True)
    except CheckpointError as e:
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointWriteError(f"checkpoint {target} did not verify after writing ({e}); removed it, "
                                   "older checkpoints are kept") from e
    if keep_last > 0:
        for old in list_checkpoints(stage_dir)[:-keep_last]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def save_from_ranks(stage_dir: Path, step: int, model: torch.nn.Module, optimizers: list | None, meta: dict,
                    local_state: dict, keep_last: int = 2) -> Path:
    """Every rank calls this at the same step: each rank's `local_state` (loader, RNG) is gathered,
    rank 0 writes the checkpoint, and every rank returns once it is written, or raises the same
    CheckpointWriteError when it could not be (no rank is left waiting in a collective)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    gathered = [local_state]
    if distributed:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local_state)
    target, error = step_dir(stage_dir, step), None
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            save_checkpoint(stage_dir, step, model, optimizers, meta, {"step": step, "ranks": gathered}, keep_last)
        except CheckpointWriteError as e:
            error = str(e)
    if distributed:  # also the barrier: every rank learns whether rank 0's save worked
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointWriteError(error)
    return target


def prepare_stage_dir(stage_dir: Path, model: torch.nn.Module, optimizers: list | None, keep_last: int) -> None:
    """Before training writes checkpoints (rank 0): clear unfinished saves, warn when space is short."""
    clear_stale_writes(stage_dir)
    warning = space_warning(stage_dir, estimate_checkpoint_bytes(model, optimizers), keep_last)
    if warning:
        log.warning(warning)


def clear_stale_writes(stage_dir: Path) -> None:
    """Remove temp folders of saves that never finished (a process killed mid-save). A checkpoint set
    aside while being replaced (`.step_N.old-PID`) is put back when its replacement never arrived."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return
    for p in stage_dir.iterdir():
        m = re.fullmatch(r"\.(step_\d+)\.(tmp|old)-.*", p.name)
        if not m or not p.is_dir():
            continue
        final = stage_dir / m.group(1)
        if m.group(2) == "old" and not final.exists():
            p.rename(final)
            log.warning(f"restored {final} (its replacement was never finished)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info(f"removed {p} (left by an unfinished save)")


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


def rng_state(device: torch.device) -> dict:
    """This process's random states (torch, python, and the device's on CUDA), for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_for_resume(stage_dir: Path, model: torch.nn.Module, optimizers: list, expected: dict) -> tuple[Path, dict] | None:
    """Load the stage's latest checkpoint into `model` and `optimizers` after checking that its meta
    matches `expected` (field -> value); return (its path, the saved train state), or None if there is none."""
    path = latest_checkpoint(stage_dir)
    if path is None:
        return None
    check_compatible(read_meta(path), expected, path)
    load_weights(path, model)
    return path, load_training_state(path, optimizers)
