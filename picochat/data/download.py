"""Robust file downloads: resumable, retried, locked, verified, atomic.

Owns `download(url, dest, ...)`, `validate_parquet(path)`, the shard layout (`shard_name`, `shard_dir`,
`shard_url`) and `download_shards(cfg, indices)`; `sources.py` reads the shards (one direction).
Standard library HTTP only (urllib), so a bare install can fetch shards.

How one download goes:
1. Take `dest.lock` (filelock): several processes or ranks asking for the same file queue up; the
   ones that wait find the finished file when they get the lock and return it after checking it.
2. If `dest` exists and passes the checks (size, sha256, validator), done; if not, it is deleted.
3. Bytes go to `dest.part`. A `.part` left by an interrupted attempt (or process) is resumed with an
   HTTP Range request; a server that ignores Range (200 instead of 206) restarts it from zero.
4. Connection errors, timeouts, 5xx/429 and truncated bodies are retried with exponential backoff;
   other 4xx fail at once. A finished `.part` that fails the checks is deleted and fetched again.
5. The checked `.part` is fsynced and renamed onto `dest` in one step, so `dest` is whole or absent.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from ..common import downloads_dir, log
from ..config import DataConfig

BLOCK = 1 << 20
USER_AGENT = "picochat-downloader/1"


class DownloadError(RuntimeError):
    """Raised when a download fails for good (retries exhausted or a non-retryable status)."""


class _Retry(Exception):
    """An attempt failed in a way worth retrying; carries a short description."""


def validate_parquet(path: Path) -> None:
    """Raise if `path` is not a complete, readable parquet file (footer and every row group)."""
    import pyarrow.parquet as pq

    # Page checksums are verified where the writer stored them; reading every row group decompresses
    # every page, so a damaged middle is caught too, not just a damaged footer.
    pf = pq.ParquetFile(path, page_checksum_verification=True)
    for i in range(pf.num_row_groups):
        pf.read_row_group(i)


def _problem(path: Path, expected_size: int | None, sha256: str | None,
             validate: Callable[[Path], object] | None) -> str | None:
    """Why `path` is not the wanted file, or None when it passes every check."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size {size} != expected {expected_size}"
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
        if h.hexdigest() != sha256.lower():
            return f"sha256 {h.hexdigest()} != expected {sha256}"
    if validate is not None:
        try:
            validate(path)
        except Exception as e:  # any failure of the validator means "not a good file"
            return f"validation failed: {type(e).__name__}: {e}"
    return None


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not (enabled and sys.stderr.isatty()), leave=False)


def _attempt(url: str, part: Path, timeout: float, progress: bool, name: str) -> None:
    """One HTTP request that extends `part` towards the full file; raises _Retry when worth retrying."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is already as long as (or longer than) the file
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416 on resume, restarting from zero") from e
        if e.code >= 500 or e.code in (408, 429):
            raise _Retry(f"HTTP {e.code}") from e
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retry(f"connection error: {e}") from e

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:  # a server answering another range than asked: do not trust it
                part.unlink(missing_ok=True)
                raise _Retry(f"server answered range start {start}, asked {offset}")
            mode, total = "ab", (offset + length if length is not None else None)
        elif status == 200:
            if offset:
                log.info(f"{name}: server ignored the Range request, restarting from zero")
            offset, mode, total = 0, "wb", length
        else:
            raise _Retry(f"unexpected HTTP {status}")
        written = offset
        with open(part, mode) as f, _progress_bar(total, offset, name, progress) as bar:
            try:
                while True:
                    block = response.read(BLOCK)
                    if not block:
                        break
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                # Bytes already written stay in .part; the next attempt resumes after them.
                raise _Retry(f"connection lost after {written} bytes: {type(e).__name__}") from e
            finally:
                f.flush()
                os.fsync(f.fileno())
        if total is not None and written != total:
            raise _Retry(f"truncated: got {written} of {total} bytes")


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200" -> 100
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def download(url: str, dest: Path, *, expected_size: int | None = None, sha256: str | None = None,
             retries: int = 5, backoff: float = 0.5, timeout: float = 30, progress: bool = True,
             validate: Callable[[Path], object] | None = None) -> Path:
    """Fetch `url` to `dest` (resumable, retried, locked, verified, atomic) and return `dest`.

    `retries` is the number of extra attempts after the first; the wait before retry k is
    `backoff * 2**k` seconds. `validate(path)` must raise when the file is bad.
    """
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            problem = _problem(dest, expected_size, sha256, validate)
            if problem is None:
                return dest
            log.warning(f"{dest} is corrupt ({problem}); fetching it again")
            dest.unlink()
        last = "no attempt made"
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.info(f"{dest.name}: {last}; retry {attempt}/{retries} in {delay:.2f}s")
                time.sleep(delay)
            try:
                _attempt(url, part, timeout, progress, dest.name)
            except _Retry as e:
                last = str(e)
                continue
            problem = _problem(part, expected_size, sha256, validate)
            if problem is not None:
                # A complete but wrong file cannot be resumed into a right one: start over.
                part.unlink(missing_ok=True)
                last = f"downloaded file is corrupt ({problem})"
                continue
            os.replace(part, dest)
            return dest
        raise DownloadError(f"download of {url} failed after {retries + 1} attempts; last error: {last}")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_dir() -> Path:
    """Where downloaded shards live (shared by every run)."""
    return downloads_dir() / "shards"


def shard_url(cfg: DataConfig, index: int) -> str:
    return f"{cfg.shard_url.rstrip('/')}/{shard_name(index)}"


def download_shards(cfg: DataConfig, indices: Iterable[int], progress: bool = True) -> list[Path]:
    """Download (or find already downloaded) FineWeb-Edu shards; returns their local paths in order."""
    paths = []
    for i in indices:
        dest = shard_dir() / shard_name(i)
        paths.append(download(shard_url(cfg, i), dest, validate=validate_parquet, progress=progress))
    return paths
