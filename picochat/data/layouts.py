"""Remembered parquet layouts: how many row groups each file had when a source last opened it.

A file source numbers its chunks from file metadata (a parquet file's row groups), and a resumed run
must number them the same way, or the loader's saved position points at other data. When a parquet
file becomes unreadable between two runs (damaged on disk), its remembered row-group count keeps the
numbering exact, and its chunks are then skipped as damaged. Kept in
`$PICOCHAT_HOME/parquet_layouts.json`, keyed by absolute path, updated under a file lock (ranks on
one host share it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..common import atomic_write_bytes, picochat_home


def layouts_path() -> Path:
    return picochat_home() / "parquet_layouts.json"


def _load(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def known_row_groups(file: Path) -> int | None:
    """The row-group count `file` had when it was last read, or None."""
    return _load(layouts_path()).get(os.path.abspath(file))


def remember_row_groups(counts: dict[Path, int]) -> None:
    """Record row-group counts (written only when something changed)."""
    from filelock import FileLock

    path = layouts_path()
    new = {os.path.abspath(f): n for f, n in counts.items()}
    if all(_load(path).get(k) == v for k, v in new.items()):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        merged = {**_load(path), **new}
        atomic_write_bytes(path, json.dumps(merged, indent=0, sort_keys=True).encode())
