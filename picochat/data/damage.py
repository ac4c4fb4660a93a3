"""Damaged data: what a text source does with a chunk it cannot read, and remembered parquet layouts.

`SkipDamaged` skips an unreadable chunk with a warning naming the file and the piece (an empty chunk
takes its place, so chunk numbering and the loader's resume position stay exact), or raises
`DataReadError` when strict (`--strict-data`), and fails when every chunk of a split fails in a row.

Remembered layouts: how many row groups each parquet file had when a source last opened it. A file
source numbers its chunks from file metadata (a parquet file's row groups), and a resumed run
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

from ..common import atomic_write_bytes, log, picochat_home


class DataReadError(ValueError):
    """A chunk of a source could not be read (a damaged or unreadable file)."""


class SkipDamaged:
    """One source's policy for unreadable chunks: skip with a warning, or raise when strict."""

    def __init__(self, source_name: str, strict: bool = False):
        self.source_name, self.strict = source_name, strict
        self._failed_in_a_row: dict[str, int] = {}

    def read_fine(self, split: str) -> None:
        self._failed_in_a_row[split] = 0

    def damaged(self, where: str, split: str, index: int, chunks_per_epoch: int, exc: Exception) -> list[str]:
        """The documents to use in place of the unreadable chunk `index`: none. Raises when strict, and
        when a whole epoch's worth of chunks failed in a row (skipping would loop over nothing forever)."""
        if self.strict:
            raise DataReadError(f"{where} cannot be read: {exc} (chunk {index} of the {split} split; "
                                "without --strict-data it would be skipped with a warning)") from exc
        failed = self._failed_in_a_row[split] = self._failed_in_a_row.get(split, 0) + 1
        if failed >= chunks_per_epoch:
            raise DataReadError(f"{self.source_name}: {failed} chunks in a row of the {split} split cannot be "
                                f"read, the last {where}: {exc}") from exc
        log.warning(f"skipping damaged data: {where}: {exc} (chunk {index} of the {split} split is left out; "
                    "--strict-data makes this an error)")
        return []


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
