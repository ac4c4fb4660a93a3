"""`picochat serve --run R` as a real subprocess: it binds, answers /health 503 then 200, serves
chat through the openai client, and stops cleanly; bad input gives one line and exit code 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serve_support import free_port, random_model  # noqa: E402


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "picochat", "serve", *args]


@pytest.fixture
def served_run(tiny_run, home):
    from picochat.runs import RunPaths
    from picochat.tokenizer import Tokenizer
    from picochat.train.checkpoint import save_checkpoint

    tok = Tokenizer.load(RunPaths.for_run(tiny_run).tokenizer)
    model = random_model(tok.vocab_size, seq_len=128)
    save_checkpoint(RunPaths.for_run(tiny_run).stage("sft"), 3, model, None, {"model": model.config.to_dict()})
    return tiny_run


def test_serve_subprocess_end_to_end(served_run, home):
    port = free_port()
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    proc = subprocess.Popen(serve_cmd("--run", served_run, "--port", str(port), "--max-batch", "4"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, seen = time.time() + 60, set()
        while time.time() < deadline:
            try:
                r = httpx.get(url + "/health", timeout=2)
                seen.add(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert 200 in seen and seen <= {200, 503}
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == f"picochat-{served_run}"
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://localhost:{port}/" in out


def test_serve_bad_input_is_one_line(home, tiny_run):
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    r = subprocess.run(serve_cmd("--run", "nope"), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no checkpoint for run 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(serve_cmd("--run", tiny_run, "--port", "70000"), env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "port must be in" in r.stderr and "Traceback" not in r.stderr
