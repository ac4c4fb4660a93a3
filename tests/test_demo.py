"""`picochat demo --quick`: the whole pipeline (tokenizer → pretrain → mid → sft → eval → chat) end to
end, at toy sizes, through the real command."""

from __future__ import annotations

import os
import subprocess
import sys


def test_quick_demo_runs_every_stage(home):
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "picochat", "demo", "--quick", "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for banner in ("1/5  tokenizer", "2/5  pretraining", "3/5  midtraining", "4/5  accuracy", "5/5  chatting"):
        assert banner in out
    assert "sample batch row 0" in out and "<|bos|>" in out
    assert "| **mean** |" in out and out.count("you> ") == 4 and "demo finished" in out
    root = home / "runs" / "demo"
    for stage in ("base", "mid", "sft"):
        assert any((root / stage).glob("step_*/model.safetensors")), stage
