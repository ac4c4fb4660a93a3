"""Faults of shared clusters, made real: signals sent to training processes (alone and under torchrun),
a full disk (RLIMIT_FSIZE on the training process), a data file damaged on disk mid-run, a damaged
cached shard. Every interrupted run is resumed and compared with an uninterrupted one."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picochat import runs
from picochat.train.preemption import EXIT_STOPPED
from test_train import WORKER, _free_port, _losses, _run_worker, _weights


def _copy_run(home: Path, name: str) -> None:
    shutil.copytree(home / "runs" / "tiny", home / "runs" / name)


def _assert_same_training(home: Path, a: str, b: str, steps: int) -> None:
    clean, other = _losses(home, a), _losses(home, b)
    assert sorted(other) == list(range(steps))
    for step in range(steps):
        assert other[step] == clean[step], f"step {step}: {other[step]} != {clean[step]}"
    wa, wb = _weights(home, a), _weights(home, b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _stage(home: Path, run: str) -> Path:
    return home / "runs" / run / "base"


def _leftovers(stage: Path) -> list[str]:
    """Anything in a stage folder that is not a finished checkpoint."""
    return sorted(p.name for p in stage.iterdir() if not runs.STEP_DIR.match(p.name))


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


# ---------------------------------------------------------------------------------------------------
# signals


def test_second_signal_exits_at_once_but_a_repeat_is_one_request(home, tiny_run):
    # a repeat within a second (as torchrun forwarding a signal the worker also got) is the same request
    repeat = _run_worker("--run-name", "tiny", "--steps", "12", "--signal-at-step", "3", "--which-signal", "SIGINT",
                         "--signal-again-after", "0", env_home=home, check=False)
    assert repeat.returncode == EXIT_STOPPED, repeat.stderr[-3000:]
    assert runs.latest_checkpoint(_stage(home, "tiny")).name == "step_000003"
    # a second signal later ends the process at once, by that signal, without a new checkpoint
    again = _run_worker("--run-name", "tiny", "--steps", "12", "--signal-at-step", "5", "--which-signal", "SIGINT",
                        "--signal-again-after", "1.5", "--resume", env_home=home, check=False)
    assert again.returncode == -signal.SIGINT, again.stderr[-3000:]
    assert "second SIGINT: exiting now" in again.stderr
    assert runs.latest_checkpoint(_stage(home, "tiny")).name == "step_000004"


def test_torchrun_signal_to_one_rank_stops_all_at_one_step(home, tiny_run):
    _copy_run(home, "ddp_ref")
    _copy_run(home, "ddp_stop")
    common = ["--steps", "10", "--save-every", "4"]
    _run_worker("--run-name", "ddp_ref", *common, env_home=home, launcher=_torchrun())
    stopped = _run_worker("--run-name", "ddp_stop", *common, "--signal-at-step", "5", "--which-signal", "SIGUSR1",
                          "--signal-rank", "1", env_home=home, launcher=_torchrun(), check=False)
    assert stopped.returncode != 0  # torchrun reports its workers' exit code 75 as a failure
    assert "picochat[rank 1]: SIGUSR1 received" in stopped.stderr
    assert "picochat[rank 0]" not in stopped.stderr  # rank 0 got no signal, yet stopped at the same step
    assert "stopped by SIGUSR1 after step 5 of 10" in stopped.stderr
    stage = _stage(home, "ddp_stop")
    assert [p.name for p in runs.list_checkpoints(stage)] == ["step_000004", "step_000005"]
    meta = runs.read_meta(runs.latest_checkpoint(stage))
    assert meta["step"] == 5 and meta["world_size"] == 2
    _run_worker("--run-name", "ddp_stop", *common, "--resume", env_home=home, launcher=_torchrun())
    _assert_same_training(home, "ddp_ref", "ddp_stop", 10)


def test_cli_exits_with_the_stop_code_on_an_outside_sigterm(home, tiny_run):
    """The real command line, signalled from outside while it trains."""
    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "picochat", "pretrain", "--run", "tiny", "--depth", "1", "--seq-len", "32",
           "--device-batch-size", "4", "--total-batch-tokens", "128", "--num-steps", "100000", "--eval-every", "0",
           "--sample-every", "0", "--save-every", "0", "--keep-last", "0", "--device", "cpu",
           "--embedded-docs", "2000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = home / "runs" / "tiny" / "logs" / "train_base.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err
    last = runs.latest_checkpoint(_stage(home, "tiny"))
    step = runs.read_meta(last)["step"]
    assert f"stopped by SIGTERM after step {step} of 100000" in err and "--resume" in err
    assert step == len(log.read_text().splitlines())  # the checkpoint is the last step it logged


# ---------------------------------------------------------------------------------------------------
# full disk


def _file_size_limit(limit: int):
    def apply() -> None:  # runs in the child before exec: every file it writes is capped at `limit` bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_sigterm_then_a_full_disk_then_resume_is_exact(home, tiny_run):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, exit code 75. The resumed run then
    meets a full disk (every file it writes capped below a checkpoint's size): the save fails cleanly
    and the stop checkpoint stays the one to resume from. Resumed again, the whole run's losses and
    weights equal an uninterrupted run's, bit for bit."""
    _copy_run(home, "stopped")
    _run_worker("--run-name", "tiny", "--steps", "12", env_home=home)
    stopped = _run_worker("--run-name", "stopped", "--steps", "12", "--signal-at-step", "5", env_home=home,
                          check=False)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "SIGTERM received: finishing this step" in stopped.stderr
    assert "stopped by SIGTERM after step 5 of 12" in stopped.stderr
    stage = _stage(home, "stopped")
    assert [p.name for p in runs.list_checkpoints(stage)] == ["step_000004", "step_000005"]
    assert runs.latest_checkpoint(stage).name == "step_000005"

    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, WORKER, "--run-name", "stopped", "--steps", "12", "--resume"], env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(100_000))
    assert full.returncode == 1, full.stderr[-3000:]
    assert f"could not write checkpoint step_000008 in {stage}: File too large" in full.stderr
    assert "A checkpoint needs about" in full.stderr and "step_000005 is intact" in full.stderr
    assert [p.name for p in runs.list_checkpoints(stage)] == ["step_000004", "step_000005"]
    assert _leftovers(stage) == []  # nothing half written is left, let alone taken for a checkpoint
    assert runs.latest_checkpoint(stage).name == "step_000005"

    resumed = _run_worker("--run-name", "stopped", "--steps", "12", "--resume", env_home=home)
    assert "5/12" in resumed.stderr  # the progress bar starts where the stop left off
    _assert_same_training(home, "tiny", "stopped", 12)
    assert [p.name for p in runs.list_checkpoints(stage)] == ["step_000008", "step_000012"]  # --keep-last 2


def test_keep_last_space_warning_and_unfinished_saves(home, tiny_run):
    stage = _stage(home, "tiny")
    stage.mkdir(parents=True)
    (stage / ".step_000002.tmp-abc").mkdir()  # a save killed half way
    (stage / ".step_000002.tmp-abc" / "model.safetensors").write_bytes(b"half")
    # keeping this many checkpoints needs more than any disk: warned before training starts
    run = _run_worker("--run-name", "tiny", "--steps", "6", "--save-every", "1", "--keep-last", "1000000000000",
                      env_home=home)
    assert "low disk space for checkpoints" in run.stderr and "lower --keep-last" in run.stderr
    assert _leftovers(stage) == []  # the unfinished save was cleared
    assert len(runs.list_checkpoints(stage)) == 6


# ---------------------------------------------------------------------------------------------------
# damaged data


def _parquet_files(folder: Path, n_files: int, docs_per_file: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    paths = []
    for f in range(n_files):
        texts = [f"Document {f}-{d}. " + "The little fox ran over the green hill and found a river. " * 5
                 for d in range(docs_per_file)]
        path = folder / f"part_{f:04d}.parquet"
        pq.write_table(pa.table({"text": texts}), path)
        paths.append(path)
    return paths


def test_file_damaged_mid_run_is_skipped_named_and_resume_is_exact(home, tiny_run, tmp_path):
    # Every document fills a row alone (each is longer than a row), so the loader's reach is known: it
    # pools 1000 documents (100 files), pulls one file per 10 rows (8 rows a step) and reads at most a
    # few files ahead. File 112 is read after step 1, when the hook damages it, and before step 24.
    files = _parquet_files(tmp_path / "data", 130, 10)
    victim = files[112]
    glob = str(tmp_path / "data" / "*.parquet")
    _copy_run(home, "damaged")
    common = ["--steps", "24", "--save-every", "8", "--paths", glob, "--corrupt-at-step", "1", "--corrupt",
              str(victim)]
    shutil.copy(files[112], tmp_path / "intact.parquet")
    first = _run_worker("--run-name", "tiny", *common, env_home=home)
    assert first.stderr.count(f"skipping damaged data: {victim} (row group 0)") == 1, first.stderr[-3000:]

    shutil.copy(tmp_path / "intact.parquet", victim)
    stopped = _run_worker("--run-name", "damaged", *common, "--signal-at-step", "10", env_home=home, check=False)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    resumed = _run_worker("--run-name", "damaged", *common[:-4], "--resume", env_home=home)
    assert f"skipping damaged data: {victim}" in stopped.stderr + resumed.stderr
    _assert_same_training(home, "tiny", "damaged", 24)

    # --strict-data: the same damage met mid-run is an error naming the file
    shutil.copy(tmp_path / "intact.parquet", victim)
    strict = _run_worker("--run-name", "damaged", *common, "--strict-data", env_home=home, check=False)
    assert strict.returncode == 1
    assert f"{victim} (row group 0) cannot be read" in strict.stderr and "--strict-data" in strict.stderr


def test_damaged_cached_shard_is_fetched_again_mid_read(home):
    from test_download import Served, make_handler, parquet_bytes  # the downloader tests' HTTP server
    from http.server import ThreadingHTTPServer
    import threading

    from picochat.config import DataConfig
    from picochat.data.sources import open_source

    state = Served()
    for i in range(2):
        state.files[f"/d/shard_{i:05d}.parquet"] = parquet_bytes(1000, seed=i)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        cfg = DataConfig(source="shards", shard_url=f"http://127.0.0.1:{httpd.server_address[1]}/d", num_shards=2)
        src = open_source(cfg)
        assert len(state.log) == 2
        shard = Path(src.paths[0])
        shard.write_bytes(b"\0" * shard.stat().st_size)  # damaged in the cache after the source opened it
        docs = src.read_chunk("train", 1)
        assert docs[0].startswith("document 0-500")
        assert [r[0] for r in state.log] == ["/d/shard_00000.parquet", "/d/shard_00001.parquet",
                                             "/d/shard_00000.parquet"]
        assert shard.read_bytes() == state.files["/d/shard_00000.parquet"]
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------------------------
# CUDA (run with `pytest -m gpu tests/test_faults.py`): the same stop on GPUs, compiled, NCCL across two


def _cuda_losses_close(home: Path, a: str, b: str, steps: int) -> None:
    clean, other = _losses(home, a), _losses(home, b)
    assert sorted(other) == list(range(steps))
    for step in range(steps):  # bf16 kernels need not be bit-reproducible run to run
        assert other[step] == pytest.approx(clean[step], rel=1e-2), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sigterm_then_resume(home, tiny_run):
    _copy_run(home, "stopped")
    common = ["--steps", "12", "--device", "auto"]
    _run_worker("--run-name", "tiny", *common, env_home=home)
    stopped = _run_worker("--run-name", "stopped", *common, "--signal-at-step", "5", env_home=home, check=False)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert runs.latest_checkpoint(_stage(home, "stopped")).name == "step_000005"
    _run_worker("--run-name", "stopped", *common, "--resume", env_home=home)
    _cuda_losses_close(home, "tiny", "stopped", 12)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_signal_to_one_rank_stops_all_at_one_step(home, tiny_run):
    _copy_run(home, "ddp_ref")
    _copy_run(home, "ddp_stop")
    common = ["--steps", "10", "--save-every", "4", "--device", "auto"]
    _run_worker("--run-name", "ddp_ref", *common, env_home=home, launcher=_torchrun())
    stopped = _run_worker("--run-name", "ddp_stop", *common, "--signal-at-step", "5", "--which-signal", "SIGUSR1",
                          "--signal-rank", "1", env_home=home, launcher=_torchrun(), check=False)
    assert "picochat[rank 1]: SIGUSR1 received" in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped by SIGUSR1 after step 5 of 10" in stopped.stderr
    stage = _stage(home, "ddp_stop")
    meta = runs.read_meta(runs.latest_checkpoint(stage))
    assert meta["step"] == 5 and meta["world_size"] == 2
    _run_worker("--run-name", "ddp_stop", *common, "--resume", env_home=home, launcher=_torchrun())
    _cuda_losses_close(home, "ddp_ref", "ddp_stop", 10)
