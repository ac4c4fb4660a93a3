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

import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import torch

from ..common import RunPaths, atomic_dir, log
from ..config import ModelConfig

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, or made with another config."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        full_meta = {**meta, "step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": files}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    for old in list_checkpoints(stage_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(stage_dir: Path) -> list[Path]:
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(stage_dir)):
        try:
            read_meta(path, verify=True)
            return path
        except CheckpointError as e:
            log.warning(f"skipping unusable checkpoint: {e}")
    return None


def read_meta(path: Path, verify: bool = True) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} is missing (incomplete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            f = Path(path) / name
            if not f.exists():
                raise CheckpointError(f"{f} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"{f} is corrupt (sha256 mismatch)")
    return meta


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


def load_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    try:
        state = load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{file} cannot be read: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


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


def serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_model(run: str, stage: str | None = None, device: torch.device | None = None, step: int | None = None):
    """The run's model for inference: the latest checkpoint of `stage` (default: sft, then mid,
    then base). Returns (model in eval mode, tokenizer, meta) where meta['stage'] says which."""
    from ..model.gpt import build_model
    from ..tokenizer import Tokenizer

    paths = RunPaths.for_run(run)
    device = device or torch.device("cpu")
    stages = [stage] if stage else ["sft", "mid", "base"]
    for s in stages:
        stage_dir = paths.stage(s)
        ckpt = stage_dir / f"step_{step:06d}" if step is not None else latest_checkpoint(stage_dir)
        if ckpt is None or not ckpt.exists():
            continue
        meta = read_meta(ckpt)
        model = build_model(ModelConfig.from_dict(meta["model"]), device)
        load_weights(ckpt, model)
        model.eval()
        meta["stage"], meta["path"] = s, str(ckpt)
        return model, Tokenizer.load(paths.tokenizer), meta
    raise FileNotFoundError(f"no checkpoint for run {run!r} in stage(s) {stages} under {paths.root} "
                            "(train one with `picochat pretrain` / `picochat sft`)")
