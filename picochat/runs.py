"""The run store: where a run's files live, the stage registry, and reading what stages wrote.

A run is `$PICOCHAT_HOME/runs/<name>/` holding `tokenizer/`, one checkpoint folder per training stage
(`base/`, `mid/`, `sft/`, `rl/`, each with `step_NNNNNN/` checkpoints), `logs/`, `results/` (one JSON
file per evaluation or stage summary, read by the report card and the server) and `report.md`.

Everything above the bottom layer (`train/`, `infer/`, `eval/`, `serve/`, `export/`, `report`) finds
checkpoints and loads models through this module, so the stage list and the "which stage starts from
which" rule are written once, here. Writing checkpoints belongs to `train/checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import atomic_write_bytes, log, picochat_home
from .config import RUN_NAME, ConfigError, ModelConfig

if TYPE_CHECKING:  # imported where used, so that the CLI starts without torch
    import torch


@dataclass(frozen=True)
class Stage:
    name: str  # folder name under the run
    starts_from: tuple[str, ...]  # stages whose latest checkpoint it starts from, in order of preference
    chat: bool  # trained on conversations (document-masked chat rows) rather than raw text


# The one stage registry, in pipeline order.
STAGES: dict[str, Stage] = {
    "base": Stage("base", (), chat=False),
    "mid": Stage("mid", ("base",), chat=True),
    "sft": Stage("sft", ("mid", "base"), chat=True),
    "rl": Stage("rl", ("sft",), chat=True),
}
# Which stage a chat consumer (chat CLI, server, chat eval, export) loads when none is named: the last one trained.
CHAT_STAGE_PREFERENCE: tuple[str, ...] = ("rl", "sft", "mid", "base")

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def stage_info(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]


@dataclass(frozen=True)
class RunPaths:
    """Where one run's stages read and write: `$PICOCHAT_HOME/runs/<name>/`."""

    root: Path

    @classmethod
    def for_run(cls, name: str) -> "RunPaths":
        if not RUN_NAME.fullmatch(name or ""):
            raise ConfigError("run", "letters, digits, '_', '-' or '.' (not starting with '.')", name)
        return cls(picochat_home() / "runs" / name)

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def stage(self, stage: str) -> Path:
        """Checkpoint folder of a training stage (see STAGES)."""
        return self.root / stage_info(stage).name


# ---------------------------------------------------------------------------------------------------
# checkpoints (read side)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, or made with another config."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir(stage_dir: Path, step: int) -> Path:
    """The folder of step `step`'s checkpoint (the name STEP_DIR reads back)."""
    return Path(stage_dir) / f"step_{step:06d}"


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
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f} is corrupt (sha256 mismatch)")
    return meta


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


def find_checkpoint(run: str, stage: str | None = None, step: int | None = None) -> tuple[str, Path]:
    """(stage, checkpoint folder) of the run's latest usable checkpoint of `stage` (default: the last
    stage trained, in CHAT_STAGE_PREFERENCE order)."""
    paths = RunPaths.for_run(run)
    stages = [stage_info(stage).name] if stage else list(CHAT_STAGE_PREFERENCE)
    for s in stages:
        stage_dir = paths.stage(s)
        ckpt = step_dir(stage_dir, step) if step is not None else latest_checkpoint(stage_dir)
        if ckpt is not None and ckpt.exists():
            return s, ckpt
    raise FileNotFoundError(f"no checkpoint for run {run!r} in stage(s) {stages} under {paths.root} "
                            "(train one with `picochat pretrain` / `picochat sft`)")


def load_tokenizer(run: str):
    """The run's tokenizer (trained by `picochat tokenizer train`)."""
    from .tokenizer import Tokenizer

    return Tokenizer.load(RunPaths.for_run(run).tokenizer)


def load_model(run: str, stage: str | None = None, device: torch.device | None = None, step: int | None = None):
    """The run's model for inference: the latest checkpoint of `stage` (default: rl, then sft, mid,
    base). Returns (model in eval mode, tokenizer, meta) where meta['stage'] says which."""
    import torch

    from .model.gpt import build_model

    s, ckpt = find_checkpoint(run, stage, step)
    meta = read_meta(ckpt)
    model = build_model(ModelConfig.from_dict(meta["model"]), device or torch.device("cpu"))
    load_weights(ckpt, model)
    model.eval()
    meta["stage"], meta["path"] = s, str(ckpt)
    return model, load_tokenizer(run), meta


# ---------------------------------------------------------------------------------------------------
# result files: what evaluations and stages report, read by the report card and the server


def write_result(run: str, name: str, result: dict) -> Path:
    """Write `results/<name>.json` atomically (e.g. name='eval_chat_sft', 'core_base', 'rl')."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"invalid result name {name!r}")
    path = RunPaths.for_run(run).results / f"{name}.json"
    atomic_write_bytes(path, json.dumps(result, indent=2, default=str).encode())
    return path


def read_results(run: str) -> dict[str, dict]:
    """Every result file of the run, by name; unreadable files are reported and skipped."""
    folder = RunPaths.for_run(run).results
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning(f"skipping unreadable result file {f}: {e}")
    return out
