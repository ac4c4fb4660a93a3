"""The downloader against a real HTTP server on 127.0.0.1 with Range support and injected faults."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.config import DataConfig
from picochat.data.download import DownloadError, download, download_shards, validate_parquet

REPO = Path(__file__).resolve().parents[1]


def parquet_bytes(n_rows: int = 3000, seed: int = 0) -> bytes:
    texts = [f"document {seed}-{i}: " + "lorem ipsum " * (i % 17) for i in range(n_rows)]
    buf = io.BytesIO()
    # Uncompressed so sizes are predictable (~100 bytes a row); checksums so damaged pages are caught.
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=500, compression="none",
                   write_page_checksum=True)
    return buf.getvalue()


@dataclass
class Served:
    """What the server knows: files, faults to apply to the next requests, and a request log."""

    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)  # path -> faults for successive GETs
    log: list[tuple[str, str | None, int, int]] = field(default_factory=list)  # path, range, status, sent
    delay_per_block: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, path: str) -> list[tuple[str, str | None, int, int]]:
        with self.lock:
            return [r for r in self.log if r[0] == path]


def make_handler(state: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _record(self, status: int, sent: int) -> None:
            with state.lock:
                state.log.append((self.path, self.headers.get("Range"), status, sent))

        def do_GET(self) -> None:
            data = state.files.get(self.path)
            with state.lock:
                queue = state.faults.get(self.path, [])
                fault = queue.pop(0) if queue else ""
            # Each response is logged before it is sent: the client may be done before we return.
            if data is None:
                self._record(404, 0)
                return self.send_error(404)
            if fault == "500":
                self._record(500, 0)
                return self.send_error(500)
            if fault == "corrupt-tail":  # same length, damaged footer
                data = data[:-8] + b"\0" * 8
            if fault == "corrupt-middle":  # same length, damaged pages
                mid = len(data) // 2
                data = data[:mid] + bytes(b ^ 0xFF for b in data[mid: mid + 64]) + data[mid + 64:]
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and fault != "ignore-range":
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self._record(416, 0)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    return self.end_headers()
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            limit = int(fault.split(":")[1]) if fault.startswith("cut:") else len(body)
            # Logged before the body goes out: the client may be done before this handler returns.
            self._record(status, limit)
            sent = 0
            try:
                while sent < limit:
                    block = body[sent: min(sent + 16384, limit)]
                    self.wfile.write(block)
                    sent += len(block)
                    if state.delay_per_block:
                        time.sleep(state.delay_per_block)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            # For a "cut" fault the handler stops early: HTTP/1.0 closes the connection, so the
            # client sees fewer bytes than Content-Length promised.

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    state = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))


FAST = dict(backoff=0.01, timeout=10, progress=False, validate=validate_parquet)


def test_plain_download(server, tmp_path):
    base, state = server
    state.files["/a.parquet"] = data = parquet_bytes()
    dest = download(f"{base}/a.parquet", tmp_path / "a.parquet", **FAST)
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.parquet.part").exists()
    # a second call finds the good file and makes no request
    download(f"{base}/a.parquet", dest, **FAST)
    assert len(state.requests("/a.parquet")) == 1


def test_interrupted_download_resumes_with_range(server, tmp_path):
    base, state = server
    state.files["/s.parquet"] = data = parquet_bytes()
    state.faults["/s.parquet"] = ["cut:100000", "cut:50000"]
    dest = download(f"{base}/s.parquet", tmp_path / "s.parquet", expected_size=len(data), **FAST)
    assert dest.read_bytes() == data
    reqs = state.requests("/s.parquet")
    assert [(r[1], r[2], r[3]) for r in reqs] == [
        (None, 200, 100000), ("bytes=100000-", 206, 50000), ("bytes=150000-", 206, len(data) - 150000)]


def test_leftover_part_resumes_and_server_ignoring_range_restarts(server, tmp_path):
    base, state = server
    state.files["/p.parquet"] = data = parquet_bytes()
    part = tmp_path / "p.parquet.part"
    part.write_bytes(data[:70000])  # left by a process that died
    download(f"{base}/p.parquet", tmp_path / "p.parquet", **FAST)
    assert (tmp_path / "p.parquet").read_bytes() == data
    assert state.requests("/p.parquet")[0][1:3] == ("bytes=70000-", 206)

    state.files["/q.parquet"] = data
    state.faults["/q.parquet"] = ["ignore-range"]
    (tmp_path / "q.parquet.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    download(f"{base}/q.parquet", tmp_path / "q.parquet", **FAST)
    assert (tmp_path / "q.parquet").read_bytes() == data
    assert [r[2] for r in state.requests("/q.parquet")] == [200]


def test_500_then_success_is_retried(server, tmp_path):
    base, state = server
    state.files["/r.parquet"] = data = parquet_bytes()
    state.faults["/r.parquet"] = ["500", "500"]
    dest = download(f"{base}/r.parquet", tmp_path / "r.parquet", **FAST)
    assert dest.read_bytes() == data
    assert [r[2] for r in state.requests("/r.parquet")] == [500, 500, 200]


def test_errors_are_clear(server, tmp_path):
    base, state = server
    state.files["/down.parquet"] = parquet_bytes()
    state.faults["/down.parquet"] = ["500"] * 10
    with pytest.raises(DownloadError, match=r"down\.parquet failed after 3 attempts.*HTTP 500"):
        download(f"{base}/down.parquet", tmp_path / "down.parquet", retries=2, **FAST)
    assert len(state.requests("/down.parquet")) == 3
    with pytest.raises(DownloadError, match=r"missing\.parquet failed: HTTP 404"):
        download(f"{base}/missing.parquet", tmp_path / "missing.parquet", **FAST)
    assert len(state.requests("/missing.parquet")) == 1  # 4xx is not retried
    assert not (tmp_path / "down.parquet").exists() and not (tmp_path / "missing.parquet").exists()


def test_corrupt_existing_file_is_fetched_again(server, tmp_path):
    base, state = server
    state.files["/c.parquet"] = data = parquet_bytes()
    dest = tmp_path / "c.parquet"
    dest.write_bytes(data[:-100])  # truncated file from some earlier mishap
    download(f"{base}/c.parquet", dest, **FAST)
    assert dest.read_bytes() == data
    assert len(state.requests("/c.parquet")) == 1


@pytest.mark.parametrize("fault", ["corrupt-tail", "corrupt-middle"])
def test_corrupt_bytes_served_once_are_detected(server, tmp_path, fault):
    base, state = server
    state.files["/x.parquet"] = data = parquet_bytes()
    state.faults["/x.parquet"] = [fault]
    dest = download(f"{base}/x.parquet", tmp_path / "x.parquet", **FAST)
    assert dest.read_bytes() == data
    assert [r[1:3] for r in state.requests("/x.parquet")] == [(None, 200), (None, 200)]  # refetched whole


def test_sha256_mismatch_is_detected(server, tmp_path):
    import hashlib

    base, state = server
    state.files["/h.bin"] = data = os.urandom(50000)
    state.faults["/h.bin"] = ["corrupt-middle"]
    digest = hashlib.sha256(data).hexdigest()
    dest = download(f"{base}/h.bin", tmp_path / "h.bin", sha256=digest, backoff=0.01, progress=False)
    assert dest.read_bytes() == data and len(state.requests("/h.bin")) == 2


_CHILD = """
import sys
from pathlib import Path
from picochat.data.download import download, validate_parquet
print("ready", flush=True)
sys.stdin.readline()
download(sys.argv[1], Path(sys.argv[2]), backoff=0.01, progress=False, validate=validate_parquet)
print("done", flush=True)
"""


def test_concurrent_downloaders_share_one_transfer(server, tmp_path):
    base, state = server
    state.files["/big.parquet"] = data = parquet_bytes(6000)
    state.delay_per_block = 0.02  # ~1 s transfer, so all downloaders overlap
    url, dest = f"{base}/big.parquet", tmp_path / "big.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(dest)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == "ready"  # imports done: it can start at once
        results: list[Path | BaseException] = []

        def worker() -> None:
            try:
                results.append(download(url, dest, **FAST))
            except BaseException as e:  # surfaced by the assertion below
                results.append(e)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        child.stdin.write("go\n")
        child.stdin.flush()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0 and "done" in out
    assert results == [dest] * 3
    assert dest.read_bytes() == data
    reqs = state.requests("/big.parquet")
    assert len(reqs) == 1 and reqs[0][3] == len(data)  # one full transfer, nobody else fetched
    assert not (tmp_path / "big.parquet.part").exists()


def test_download_shards_and_shard_source(server, tmp_path):
    from picochat.data.sources import open_source, shard_dir

    base, state = server
    for i in range(2):
        state.files[f"/data/shard_{i:05d}.parquet"] = parquet_bytes(1000, seed=i)
    cfg = DataConfig(source="shards", shard_url=f"{base}/data/", num_shards=2)
    paths = download_shards(cfg, range(2), progress=False)
    assert paths == [shard_dir() / "shard_00000.parquet", shard_dir() / "shard_00001.parquet"]
    src = open_source(cfg)  # finds the shards in place, no new requests
    assert len(state.log) == 2
    val = list(src.iter_documents("val"))
    assert len(val) == 1000 and val[0].startswith("document 1-0")
    assert next(src.iter_chunks("train"))[1][0].startswith("document 0-0")
