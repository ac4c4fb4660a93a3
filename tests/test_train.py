"""Training loop: exact resume after SIGKILL, corrupt/mismatched checkpoints, NaN stop, and
2-process DDP on gloo through real torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat import runs
from picochat.runs import RunPaths
from picochat.config import DataConfig, TrainConfig
from picochat.train import checkpoint as ckpt
from forkrun import run_script

WORKER = str(Path(__file__).parent / "workers" / "pretrain_worker.py")


def _run_worker(*args: str, env_home: Path, check=True, launcher=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_HOME": str(env_home), "OMP_NUM_THREADS": "1"}
    if launcher is None:  # one process: a fork of a server that has torch imported (tests/forkrun.py)
        proc = run_script(WORKER, list(args), env, timeout=300)
    else:
        proc = subprocess.run(launcher + [WORKER, *args], env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "step/s" not in ln and "Warning" not in ln]
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" + "\n".join(lines[-80:]))
    return proc


def _losses(home: Path, run: str) -> dict[int, float]:
    """Step -> loss from the run's JSONL log; a resumed step overwrites the crashed run's entry."""
    out = {}
    for line in (home / "runs" / run / "logs" / "train_base.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _weights(home: Path, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = runs.latest_checkpoint(home / "runs" / run / "base")
    return load_file(str(path / "model.safetensors"))


def test_exact_resume_after_sigkill(home, tiny_run):
    import shutil

    shutil.copytree(home / "runs" / "tiny", home / "runs" / "crash")
    _run_worker("--run-name", "tiny", "--steps", "12", env_home=home)
    killed = _run_worker("--run-name", "crash", "--steps", "12", "--kill-at-step", "10", env_home=home, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stage = home / "runs" / "crash" / "base"
    assert [p.name for p in runs.list_checkpoints(stage)] == ["step_000004", "step_000008"]
    _run_worker("--run-name", "crash", "--steps", "12", "--resume", env_home=home)

    clean, resumed = _losses(home, "tiny"), _losses(home, "crash")
    assert sorted(resumed) == list(range(12))
    for step in range(12):
        assert resumed[step] == clean[step], f"step {step}: {resumed[step]} != {clean[step]}"
    a, b = _weights(home, "tiny"), _weights(home, "crash")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_corrupt_checkpoint_and_config_mismatch(home, tiny_run):
    from picochat.train.cli import pretrain

    cfg = TrainConfig(run="tiny", depth=1, seq_len=32, device_batch_size=4, total_batch_tokens=256, num_steps=4,
                      eval_every=0, sample_every=0, save_every=2, device="cpu")
    pretrain(cfg, DataConfig(embedded_docs=2000))
    stage = RunPaths.for_run("tiny").stage("base")
    newest = runs.list_checkpoints(stage)[-1]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(runs.CheckpointError, match="model.safetensors is corrupt"):
        runs.read_meta(newest)
    assert runs.latest_checkpoint(stage).name == "step_000002"  # skips the broken one

    cfg.resume, cfg.depth = True, 2
    with pytest.raises(runs.CheckpointError, match=r"config mismatch in model\.n_layer"):
        pretrain(cfg, DataConfig(embedded_docs=2000))


def test_nan_loss_stops_with_message(home, tiny_run):
    from picochat.train.cli import pretrain
    from picochat.train.loop import TrainingDiverged

    def poison(stats, trainer):  # weights blow up after step 3 (as a too-high LR would)
        if stats.step == 3:
            with torch.no_grad():
                trainer.model.lm_head.weight.fill_(float("nan"))

    cfg = TrainConfig(run="tiny", depth=1, seq_len=32, device_batch_size=4, total_batch_tokens=128, num_steps=10,
                      eval_every=0, sample_every=0, save_every=2, device="cpu")
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4.*Last good checkpoint: .*step_000004"):
        pretrain(cfg, DataConfig(embedded_docs=2000), on_step=poison)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


@pytest.fixture(scope="module")
def _ddp_home(tmp_path_factory, _tiny_tokenizer_dir) -> Path:
    """Run 'ddp': 16 steps of 2-process gloo training under real torchrun, its checkpoint written at
    the end by 2 ranks and each rank's weight checksum in ddp.json. Shared by the DDP test and the
    world-size move test (one torchrun launch instead of two)."""
    home = tmp_path_factory.mktemp("ddphome")
    shutil.copytree(_tiny_tokenizer_dir, home / "runs" / "ddp" / "tokenizer")
    _run_worker("--run-name", "ddp", "--steps", "16", "--save-every", "0", "--out", str(home / "ddp.json"),
                env_home=home, launcher=_torchrun())
    return home


def test_ddp_two_gloo_processes_match_single(home, tiny_run, tmp_path, _ddp_home):
    ranks = json.loads((_ddp_home / "ddp.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "weights differ across ranks"
    assert ranks[0]["result"]["grad_accum"] == 1

    ddp_loss = _losses(_ddp_home, "ddp")
    assert ddp_loss[15] < ddp_loss[0] * 0.8

    # Same global batch, one process vs two: from the same initial weights, one optimizer step on the
    # same fixed 8 rows (uneven loss-token counts) must give the same weights.
    shutil.copytree(home / "runs" / "tiny", home / "runs" / "ddp")
    out2, out1 = tmp_path / "ddp0.json", tmp_path / "one0.json"
    _run_worker("--run-name", "ddp", "--steps", "0", "--save-every", "-1", "--out", str(out2), env_home=home,
                launcher=_torchrun())
    _run_worker("--run-name", "tiny", "--steps", "0", "--save-every", "-1", "--out", str(out1), env_home=home)
    two, one = json.loads(out2.read_text()), json.loads(out1.read_text())
    assert two[0]["checksum"] == two[1]["checksum"]
    assert two[0]["checksum"] == pytest.approx(one[0]["checksum"], rel=1e-6)


def test_checkpoint_moves_between_world_sizes(home, _ddp_home):
    """A 2-process run's checkpoint resumes in 1 process and back (weights and optimizer exactly; the
    data position continues from rank 0's), and chat fine-tuning runs under torchrun without hangs."""
    shutil.copytree(_ddp_home / "runs" / "ddp", home / "runs" / "ddp")  # 16 steps by 2 ranks
    one = _run_worker("--run-name", "ddp", "--steps", "20", "--save-every", "4", "--resume", env_home=home)
    assert "written by 2 rank(s), this run has 1" in one.stderr
    _run_worker("--run-name", "ddp", "--steps", "24", "--save-every", "4", "--resume", env_home=home,
                launcher=_torchrun())
    losses = _losses(home, "ddp")
    assert sorted(losses) == list(range(24))
    stage = home / "runs" / "ddp" / "base"
    meta = runs.read_meta(runs.latest_checkpoint(stage))
    assert meta["step"] == 24 and meta["world_size"] == 2

    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    for command in ("midtrain", "sft"):
        proc = subprocess.run(_torchrun() + ["-m", "picochat", command, "--run-name", "ddp", "--seq-len", "64",
                                             "--device-batch-size", "2", "--total-batch-tokens", "256",
                                             "--num-steps", "3", "--device", "cpu", "--eval-every", "0",
                                             "--synthetic-size", "200"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stage_name = "mid" if command == "midtrain" else "sft"
        assert runs.read_meta(runs.latest_checkpoint(home / "runs" / "ddp" / stage_name))["world_size"] == 2


def test_run_command_chains_every_stage_and_resumes(home):
    args = [sys.executable, "-m", "picochat", "run", "--run", "all", "--depth", "1", "--seq-len", "64",
            "--device-batch-size", "4", "--total-batch-tokens", "256", "--num-steps", "4", "--mid-steps", "2",
            "--sft-steps", "2", "--vocab-size", "300", "--embedded-docs", "500", "--eval-examples", "3",
            "--eval-every", "0", "--device", "cpu"]
    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| spelling |" in first.stdout
    root = home / "runs" / "all"
    for stage, step in (("base", 4), ("mid", 2), ("sft", 2)):
        assert runs.read_meta(runs.latest_checkpoint(root / stage))["step"] == step
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("resumed from") == 3  # each stage continued from its checkpoint
    assert "Chat evaluation" in (root / "report.md").read_text()


def test_eval_bpb_reproduces_training_validation(home, tiny_run):
    from picochat.cli import main
    from picochat.train.cli import pretrain

    cfg = TrainConfig(run="tiny", depth=1, seq_len=32, device_batch_size=4, total_batch_tokens=128, num_steps=3,
                      eval_every=3, eval_tokens=1024, sample_every=0, save_every=0, device="cpu")
    result = pretrain(cfg, DataConfig(embedded_docs=2000))
    assert main(["eval", "--run", "tiny", "--stage", "base", "--bpb", "--bpb-tokens", "1024", "--tasks", "",
                 "--embedded-docs", "2000", "--device", "cpu"]) == 0
    report = (home / "runs" / "tiny" / "report.md").read_text()
    assert "## Validation bits per byte (base)" in report
    assert f"{result['val_bpb']:.4f} bits/byte" in report
