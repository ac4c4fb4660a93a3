"""Graceful stops on SIGTERM, SIGINT and SIGUSR1: what schedulers send before they kill a job.

Owns `StopSignals` (the handlers and the once-per-step agreement between ranks), `TrainingStopped`
(what the loop raises after its stop checkpoint) and `EXIT_STOPPED`, the process exit code of a
graceful stop.

How a stop goes:
1. The first of these signals only sets a flag (and says so on stderr); training carries on.
2. After every optimizer step the ranks agree: one all-reduce (MAX) of each rank's signal number. So
   all ranks stop after the same step, whichever rank was signalled, and however many were.
3. The loop then writes one checkpoint (the same one a periodic save writes, so `--resume` continues
   exactly), logs where it stopped and raises `TrainingStopped`; the CLI exits with `EXIT_STOPPED`.
4. A second signal ends the process at once (the default action of that signal). Repeats within
   `REPEAT_WINDOW_S` of the first count as the same request: under `torchrun`, and under Slurm, one
   request often reaches a worker twice (once directly, once forwarded by torchrun).

A training loop of its own uses it as `Trainer.train` does:

    stop = StopSignals().install()
    try:
        while step < num_steps:
            ...one optimizer step...; step += 1
            signum = stop.agreed(device) if step < num_steps else 0
            if signum or <periodic save due>: checkpoint.save_from_ranks(...)
            if signum: raise TrainingStopped(stage, step, num_steps, signal_name(signum), <checkpoint>)
    finally:
        stop.restore()

Before the loop (set-up, compiling) the signals keep their default effect: nothing is lost there.

The handler does nothing but record: it runs between two bytecodes of the main thread, where
logging or printing could re-enter a stream that was being written (hence `os.write`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..common import log
from ..runs import step_dir

if TYPE_CHECKING:  # imported where used: the CLI imports this module before it knows the command
    import torch

# EX_TEMPFAIL from sysexits.h: "a temporary failure, the user is invited to retry". Distinct from
# errors (1), usage errors (2) and deaths by signal (128 + N); job scripts requeue on it.
EXIT_STOPPED = 75
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0


class TrainingStopped(Exception):
    """Training stopped early on request, after a checkpoint it can resume from. Not an error: not a
    RuntimeError, so callers that report errors do not mistake it for one."""

    exit_code = EXIT_STOPPED

    def __init__(self, stage: str, step: int, num_steps: int, signal_name: str, checkpoint: Path | None):
        self.stage, self.step, self.num_steps = stage, step, num_steps
        self.signal_name, self.checkpoint = signal_name, checkpoint
        where = (f"checkpoint {checkpoint}; continue with --resume" if checkpoint is not None
                 else "no checkpoint written (--save-every -1)")
        super().__init__(f"{stage}: stopped by {signal_name} after step {step} of {num_steps}: {where} "
                         f"(exit code {EXIT_STOPPED})")


def stopped_after_save(stage: str, stage_dir: Path, saved: bool, step: int, num_steps: int, signum: int,
                       is_main: bool) -> TrainingStopped:
    """The stop a training loop raises once it has saved step `step` (`saved` False: --save-every -1,
    nothing written), logged once, by the main rank."""
    stopped = TrainingStopped(stage, step, num_steps, signal_name(signum), step_dir(stage_dir, step) if saved else None)
    if is_main:
        log.warning(str(stopped))
    return stopped


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """While installed (or inside `with`), the stop signals request a graceful stop instead of killing.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the
    signals keep their usual effect and `agreed()` still works across ranks."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, repeat_window: float = REPEAT_WINDOW_S):
        self.signals, self.repeat_window = signals, repeat_window
        self.signum: int | None = None  # the first stop signal this process received
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            log.debug("not in the main thread: stop signals keep their default effect")
        return self

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            rank = os.environ.get("RANK")
            who = f"picochat[rank {rank}]" if rank is not None else "picochat"
            os.write(2, f"\n{who}: {signal_name(signum)} received: finishing this step, then saving a "
                        f"checkpoint and exiting (send it again to exit at once)\n".encode())
            return
        if now - self._first_at < self.repeat_window:
            return  # the same request delivered twice (directly and through torchrun)
        os.write(2, f"\npicochat: second {signal_name(signum)}: exiting now\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def agreed(self, device: torch.device) -> int:
        """The stop signal any rank received (0: none), the same on every rank. A collective: every
        rank must call it at the same step. Costs one tiny all-reduce."""
        import torch

        local = self.signum or 0
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
