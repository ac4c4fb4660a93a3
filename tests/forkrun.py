"""Run a test worker script (tests/workers/*.py) in its own process without paying torch's import again.

The training tests start many short worker processes (a clean run, a killed one, a resumed one...);
each used to spend ~2.5 CPU-seconds importing torch, torch._dynamo (which torch.optim's step pulls
in) and picochat before a few milliseconds of training. Here a multiprocessing fork server imports
them once per test worker; every run is a fork of that server, a real separate process with its own
pid, environment, signal handlers and exit status (a SIGKILL is a real SIGKILL, a stop signal ends it
with the stop code), that then runs the script as `python script args` would (runpy, as __main__).
Nothing but imports ran in the server, so a run starts with no training state, as a fresh
interpreter does. Launches through torchrun, the CLI and resource limits stay real subprocesses, and
so do the Triton-interpreter workers (TRITON_INTERPRET must be set before triton's own kernels are
defined, and the server has imported them) and, on a machine with CUDA, every run.
Tests that start ranks with multiprocessing use `context()` (the same server) instead of "spawn"."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "torch._dynamo", "picochat.train.cli", "picochat.train.loop", "picochat.train.rl",
           "picochat.data.loader", "safetensors.torch"]
_ctx = None


def context():
    """The multiprocessing context whose processes are forks of the preloaded server."""
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _child(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    import runpy

    os.chdir(cwd)  # the caller's, as a subprocess would inherit it (the server keeps its own)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def run_script(script: str, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python script *args` with `env`, in a fork of the preloaded server: its exit code (negative: the
    signal that ended it), stdout and stderr, as subprocess.run(..., capture_output=True, text=True).
    Where CUDA is available it is a plain subprocess: a run that uses CUDA must not be a fork of a
    process whose imports may have touched the driver."""
    import torch

    if torch.cuda.is_available():
        return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp:
        out, err = str(Path(tmp) / "out"), str(Path(tmp) / "err")
        proc = context().Process(target=_child, args=(script, list(args), dict(env), os.getcwd(), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        return subprocess.CompletedProcess([script, *args], proc.exitcode, _read(out), _read(err))


def _read(path: str) -> str:
    """What the run wrote there ('' if it ended before opening it: the fork server printed why)."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
