"""What every benchmark record carries (GPU, torch, date, commit, command), appending records to
docs/benchmarks/results.jsonl, and the JSON last line every benchmark prints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..common import cpu_description, git_commit


def device_name(device: torch.device) -> str:
    """A CPU by its model name, vector extension and core count (`common.cpu_description`); other
    devices by type."""
    return cpu_description() if device.type == "cpu" else device.type


def base_record(bench: str, device: torch.device, depth: int | None = None) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device_name(device)
    return {"bench": bench, "gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": git_commit(), "depth": depth, "command": "picochat " + " ".join(sys.argv[1:])}


def append_records(path: str | Path | None, records: list[dict]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def print_json_last(obj) -> None:
    """The machine-readable result: always the last line on stdout."""
    sys.stdout.flush()
    print(json.dumps(obj), flush=True)
