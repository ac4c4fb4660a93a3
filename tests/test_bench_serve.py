"""`picochat bench serve` end to end on CPU at toy sizes: it starts real servers (continuous and
--serial) in subprocesses, drives them over HTTP and prints a table and a JSON last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_bench_serve_smoke(home, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "picochat", "bench", "serve", "--depth", "1", "--vocab-size", "300",
           "--max-context", "128", "--input-len", "16", "--output-len", "6", "--length-dist", "lognormal",
           "--concurrency", "3", "--num-prompts", "6", "--max-batch", "4", "--append", str(out),
           "--plot", str(tmp_path / "serve.png")]
    r = subprocess.run(cmd, env={**os.environ, "PICOCHAT_HOME": str(home)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["bench"] == "serve" and last["depth"] == 1
    records = last["records"]
    assert [(x["mode"], x["concurrency"]) for x in records] == [("continuous", 3), ("serial", 3)]
    for rec in records:
        assert rec["failed"] == 0 and rec["requests"] == 6 and rec["output_tokens"] > 0
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p99_ms", "tok_per_s_total"):
            assert rec[key] is not None and rec[key] > 0, key
    assert "continuous / serial tok/s" in r.stdout
    assert len(out.read_text().splitlines()) == 2 and (tmp_path / "serve.png").stat().st_size > 0
