"""Reading the rows of a real dataset: a local parquet/jsonl file (or folder of them), or a URL
fetched once with the resumable downloader into `$PICOCHAT_HOME/downloads/tasks/`.

Loaders call `read_records(source)` and get a list of plain dicts; tests write small fixture files
and go through exactly the same code path as a downloaded file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and urlparse(source).scheme in ("http", "https")


def fetch(url: str, dest_dir: Path | None = None) -> Path:
    """Download `url` once (resumable, atomic, via picochat.data.download) and return the local path."""
    from picochat.common import downloads_dir
    from picochat.data.download import download  # lazy: only needed when a URL is given

    parsed = urlparse(url)
    # keep the dataset's path in the file name so files of different datasets never collide
    name = "__".join(p for p in parsed.path.split("/") if p and p not in ("resolve", "main", "datasets"))
    dest = Path(dest_dir or downloads_dir() / "tasks") / name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        result = download(url, dest)
        if isinstance(result, (str, Path)) and Path(result).exists():
            dest = Path(result)
    return dest


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} files in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    return [path]


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        return rows
    raise ValueError(f"{path}: unsupported file type (want {', '.join(DATA_SUFFIXES)})")


def read_records(source: str | Path | list[str | Path]) -> list[dict[str, Any]]:
    """All rows of `source`: a URL, a file, a folder of files, or a list of any of these."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    rows: list[dict[str, Any]] = []
    for s in sources:
        path = fetch(s) if is_url(s) else Path(s).expanduser()
        for f in _files(path):
            rows.extend(_read_file(f))
    return rows


def source_or_default(task: str, split: str, source: str | Path | None, urls: dict[str, str]) -> str | Path:
    """The given source, else the split's default URL; a clear error names the splits there are."""
    if source is not None:
        return source
    if split not in urls:
        raise ValueError(f"{task} split must be one of {sorted(urls)}, got {split!r}")
    return urls[split]
