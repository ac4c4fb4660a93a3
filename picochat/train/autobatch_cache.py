"""The batch-size finder's cache: a JSON file of found sizes keyed by everything that changes memory,
updated under a file lock (ranks on one host share it), with entries that later ran out of memory
marked bad."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..common import atomic_write_bytes, log, picochat_home




def default_cache_path() -> Path:
    return picochat_home() / "autobatch_cache.json"


def load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data.get("entries"), dict) else {"version": 1, "entries": {}}
    except (FileNotFoundError, ValueError, AttributeError):
        return {"version": 1, "entries": {}}


def update_cache(path: Path, key: str, update: Callable[[dict[str, Any]], None]) -> None:
    from filelock import FileLock  # read-modify-write under a lock: ranks on one host share the file

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=30):
        data = load_cache(path)
        entry = data["entries"].setdefault(key, {})
        update(entry)
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def cache_key_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def mark_bad(key: str, batch_size: int | None = None, path: Path | None = None) -> None:
    """Mark a cache entry bad (its size ran out of memory in training): it is no longer a hit, and
    later searches under this key only consider sizes below every size marked bad."""
    def upd(entry: dict[str, Any]) -> None:
        b = batch_size if batch_size is not None else entry.get("device_batch_size")
        entry["bad"] = True
        if b is not None and b not in entry.setdefault("bad_sizes", []):
            entry["bad_sizes"].append(int(b))

    update_cache(Path(path) if path else default_cache_path(), key, upd)
    log.warning("autobatch: cache entry %s marked bad (batch %s)", key[:12], batch_size)
