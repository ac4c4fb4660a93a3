"""`picochat demo --quick`: the whole pipeline (tokenizer → pretrain → mid → sft → eval → chat) end to
end, at toy sizes, through the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_quick_demo_runs_every_stage(home):
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    record = home / "demo.jsonl"
    proc = subprocess.run([sys.executable, "-m", "picochat", "demo", "--quick", "--device", "cpu", "--append",
                           str(record)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for banner in ("1/5  tokenizer", "2/5  pretraining", "3/5  midtraining", "4/5  accuracy", "5/5  chatting"):
        assert banner in out
    assert "sample batch row 0" in out and "<|bos|>" in out
    assert "| **mean** |" in out and out.count("you> ") == 4 and "demo finished" in out
    assert "time per stage" in out
    rec = json.loads(record.read_text())  # the bench "demo" record: seconds per stage and accuracies
    assert rec["bench"] == "demo" and rec["depth"] == 2 and rec["gpu"] and rec["cpu_seconds"] > 0
    assert list(rec["stage_seconds"]) == ["tokenizer", "pretrain", "mid", "sft", "eval", "chat"]
    assert rec["seconds"] >= sum(rec["stage_seconds"].values()) - 1
    assert set(rec["accuracy"]) == set(rec["trivial"]) == {"spelling", "letter_count", "arithmetic", "identity", "facts"}
    root = home / "runs" / "demo"
    for stage in ("base", "mid", "sft"):
        assert any((root / stage).glob("step_*/model.safetensors")), stage
