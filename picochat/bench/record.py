"""What every benchmark record carries (GPU, torch, date, commit, command), appending records to
docs/benchmarks/results.jsonl, and the JSON last line every benchmark prints."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..common import git_commit


def device_name(device: torch.device) -> str:
    """A CPU by its model name and the vector extension torch dispatches to (which decides whether
    bfloat16 matrix products run natively or emulated); other devices by type."""
    if device.type != "cpu":
        return device.type
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model} ({isa}{', oneDNN ' + capped if capped else ''}, {os.cpu_count()} cores)"


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
