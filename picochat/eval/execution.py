"""The sandbox that runs model-written programs (HumanEval): one fresh process per program.

What every run gets, whatever the mode:
- its own empty temporary directory as the working directory (deleted afterwards), a cleared
  environment, stdin closed, no inherited file descriptors, its own session;
- resource limits (set by `sandbox_launch.py` just before it execs): CPU seconds, address space
  (memory), open files, size of files it writes (stdout/stderr are files too, so endless printing
  stops), no core dumps, and a process count;
- a wall-clock limit, after which the whole process group is killed;
- when the evaluator runs as root: a dedicated unprivileged user id per concurrent slot (never root),
  so the process limit counts only that slot's processes, files outside its directory are not
  writable, other processes cannot be signalled, and after the run every process left with that
  user id is killed.

Modes (`isolation_mode()` probes once and picks the strongest that works here; `PICOCHAT_SANDBOX`
= bwrap | rlimits forces one):
- "bwrap": Debian's bubblewrap on top of the above: new user, pid, network, IPC and UTS namespaces
  (no network at all, loopback included: nothing outside is reachable), the whole file system
  mounted read-only except the program's directory and a private /tmp, /home and /root hidden,
  killed with its parent. Nothing it starts outlives it: the pid namespace dies with it.
- "rlimits": the limits and the separate user id only. The network is NOT isolated in this mode,
  and where the evaluator is not root, files writable by the user running it are writable by the
  program too. `picochat eval chat` states the mode it ran under in its results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .sandbox_launch import children

LAUNCHER = Path(__file__).with_name("sandbox_launch.py")
MODES = ("bwrap", "rlimits")
SANDBOX_UID_BASE = 61000  # slot k runs as uid/gid SANDBOX_UID_BASE + k when the evaluator is root
MAX_SLOTS = 64


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 16  # per sandbox slot (as root), or on top of the user's own processes
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_chars: int = 4000  # of stdout and of stderr kept in the result

    def __post_init__(self) -> None:
        for name, low in (("wall_s", 0.1), ("cpu_s", 1), ("memory_mb", 64), ("max_processes", 1),
                          ("max_file_mb", 1), ("max_open_files", 8), ("max_output_chars", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"SandboxLimits.{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class ExecutionResult:
    status: str  # "ok" (exit 0) | "error" (non-zero exit) | "timeout" (wall limit) | "killed" (a signal)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    mode: str
    uid: int | None = None  # the sandbox's own user id (root evaluators only)

    @property
    def passed(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------
# choosing the mode and the interpreter


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _interpreters() -> list[str]:
    """Python interpreters to try for the program (stdlib only: no site-packages are loaded)."""
    found = [os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable), shutil.which("python3"),
             "/usr/bin/python3", os.path.realpath(sys.executable)]
    out: list[str] = []
    for p in found:
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    return out


class _Config:
    """What the probe chose: the mode, the interpreter, and why stronger modes were not used."""

    def __init__(self, mode: str, python: str, notes: list[str]):
        self.mode, self.python, self.notes = mode, python, notes


_configs: dict[str | None, _Config] = {}  # by requested mode (None: the strongest that works)
_lock = threading.Lock()
_busy: set[int] = set()  # slots this process is using
_next_slot = 0
_slot_cond = threading.Condition()


def _probe(mode: str, python: str) -> str | None:
    """Run a tiny program in `mode`; None when it ran correctly, else why not."""
    token = "picochat-sandbox-probe"
    try:
        result = _run(f"print({token!r})", SandboxLimits(wall_s=20), mode, python)
    except OSError as e:
        return str(e)
    if result.passed and result.stdout.strip() == token:
        return None
    lines = (result.stderr + result.stdout).strip().splitlines()
    return lines[-1] if lines else f"{result.status} (exit {result.returncode})"


def _choose(mode: str | None = None) -> _Config:
    """The configuration for `mode` (default: $PICOCHAT_SANDBOX, else the strongest that works)."""
    mode = mode or os.environ.get("PICOCHAT_SANDBOX") or None
    if mode is not None and mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, got {mode!r} (PICOCHAT_SANDBOX?)")
    with _lock:
        if mode in _configs:
            return _configs[mode]
        notes = []
        for candidate in [mode] if mode else list(MODES):
            if candidate == "bwrap" and not shutil.which("bwrap"):
                notes.append("bwrap: not installed (Debian/Ubuntu: apt-get install bubblewrap)")
                continue
            for python in _interpreters():
                why = _probe(candidate, python)
                if why is None:
                    _configs[mode] = _Config(candidate, python, notes)
                    return _configs[mode]
                notes.append(f"{candidate} with {python}: {why}")
        raise RuntimeError(f"no sandbox mode{' ' + mode if mode else ''} works here: " + "; ".join(notes))


def available_modes() -> list[str]:
    """The modes that run a program correctly on this machine (probes each)."""
    out = []
    for mode in MODES:
        try:
            _choose(mode)
            out.append(mode)
        except RuntimeError:
            pass
    return out


def isolation_mode() -> str:
    """The mode programs run under here ("bwrap" or "rlimits"), probed once."""
    return _choose().mode


def describe_isolation() -> dict:
    """The mode, the interpreter and why stronger modes were not used: recorded with results."""
    cfg = _choose()
    contains = {"bwrap": "namespaces (no network, read-only file system but its own directory, own pid space), "
                         "rlimits, separate uid when root",
                "rlimits": "rlimits (cpu, memory, processes, file size), own session and directory, separate uid "
                           "when root; network NOT isolated"}[cfg.mode]
    return {"mode": cfg.mode, "python": cfg.python, "contains": contains, "root": _is_root(), "notes": cfg.notes}


# ---------------------------------------------------------------------------------------------------
# running one program


def run_program(code: str, limits: SandboxLimits | None = None, mode: str | None = None) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox and return how it ended (`mode`: see the module
    docstring; default the strongest that works here)."""
    cfg = _choose(mode)
    return _run(code, limits or SandboxLimits(), cfg.mode, cfg.python)


def _take_slot() -> tuple[int, int | None]:
    """A free slot and, as root, an exclusive lock on its uid shared with every other process on the
    machine (several evaluations at once must never share a uid: cleanup kills by uid)."""
    global _next_slot
    while True:
        with _slot_cond:
            # round robin: a uid just used may still have dead children waiting for init to reap them,
            # and those count against its process limit
            order = [(_next_slot + j) % MAX_SLOTS for j in range(MAX_SLOTS)]
            for k in (k for k in order if k not in _busy):
                fd = _lock_uid(k) if _is_root() else None
                if fd is None and _is_root():
                    continue
                _busy.add(k)
                _next_slot = (k + 1) % MAX_SLOTS
                return k, fd
            _slot_cond.wait(timeout=0.05)


def _lock_uid(slot: int) -> int | None:
    import fcntl

    path = os.path.join(tempfile.gettempdir(), f"picochat-sandbox-{SANDBOX_UID_BASE + slot}.lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def _give_slot(slot: int, fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # releases the lock
    with _slot_cond:
        _busy.discard(slot)
        _slot_cond.notify()


def _user_process_count() -> int:
    try:
        return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and p.stat().st_uid == os.getuid())
    except OSError:
        return 256


def _rlimits(limits: SandboxLimits, as_root: bool) -> dict[str, list[int]]:
    # not root: the program shares the user's count, which includes the waiting launcher (sandbox_launch.py)
    nproc = limits.max_processes if as_root else _user_process_count() + 1 + limits.max_processes
    mb = 1 << 20
    return {"RLIMIT_CPU": [limits.cpu_s, limits.cpu_s + 1], "RLIMIT_AS": [limits.memory_mb * mb] * 2,
            "RLIMIT_NPROC": [nproc] * 2, "RLIMIT_FSIZE": [limits.max_file_mb * mb] * 2,
            "RLIMIT_NOFILE": [limits.max_open_files] * 2, "RLIMIT_CORE": [0, 0]}


def _bwrap_argv(workdir: str, python: str) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for hidden in ("/home", "/root"):  # other users' files; kept where the interpreter lives there
        if os.path.isdir(hidden) and not python.startswith(hidden + "/"):
            argv += ["--tmpfs", hidden]
    return argv + ["--bind", workdir, workdir, "--chdir", workdir, "--unshare-all", "--die-with-parent",
                   "--new-session", "--clearenv", "--setenv", "HOME", workdir, "--setenv", "PATH", "/usr/bin:/bin"]


def _run(code: str, limits: SandboxLimits, mode: str, python: str) -> ExecutionResult:
    as_root = _is_root()
    slot, lock = _take_slot()
    uid = SANDBOX_UID_BASE + slot if as_root else None
    outdir = tempfile.mkdtemp(prefix="picochat-sandbox-out-")
    workdir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    try:
        Path(workdir, "program.py").write_text(code)
        if uid is not None:
            for p in (workdir, os.path.join(workdir, "program.py")):
                os.chown(p, uid, uid)
        target = [python, "-I", "-S", "-B", "program.py"]
        if mode == "bwrap":
            target = _bwrap_argv(workdir, python) + target
        spec = {"rlimits": _rlimits(limits, as_root), "uid": uid, "argv": target}
        with open(os.path.join(outdir, "out"), "wb") as out, open(os.path.join(outdir, "err"), "wb") as err:
            return _supervise(spec, workdir, out, err, outdir, limits, mode, uid)
    finally:
        if uid is not None:
            _kill_user(uid)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)
        _give_slot(slot, lock)


def _supervise(spec: dict, workdir: str, out, err, outdir: str, limits: SandboxLimits, mode: str,
               uid: int | None) -> ExecutionResult:
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                            start_new_session=True)
    try:
        proc.wait(timeout=limits.wall_s)
        status = None
    except subprocess.TimeoutExpired:
        status = "timeout"
        # kill what the launcher started, not the launcher: it reaps them (it is their subreaper), so
        # no zombie is left for init to reap late (cleanup would wait for it; see sandbox_launch.py)
        _kill_children(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    _kill_group(proc.pid)
    proc.wait()
    if uid is not None:
        _kill_user(uid)
    seconds = time.perf_counter() - start
    rc = proc.returncode
    if status is None:
        status = "ok" if rc == 0 else ("killed" if rc < 0 or rc > 128 else "error")

    def read(name: str) -> str:
        with open(os.path.join(outdir, name), "rb") as f:
            return f.read(limits.max_output_chars * 4).decode("utf-8", errors="replace")[:limits.max_output_chars]

    return ExecutionResult(status, rc, read("out"), read("err"), seconds, mode, uid)


def _kill_children(pid: int) -> None:
    """SIGKILL the live children of `pid`."""
    for child in children(pid, live=True):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user(uid: int, patience_s: float = 2.0) -> None:
    """SIGKILL every process of the sandbox's own uid until none is left (a fork bomb races us), then
    wait a little for the dead ones to be reaped: they count against the uid's process limit."""
    deadline = time.monotonic() + patience_s
    while True:
        live = dead = 0
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:  # the real uid from status: /proc/<pid> itself may be owned by root (non-dumpable)
                status = (p / "status").read_text()
                if int(status.split("\nUid:")[1].split()[0]) != uid:
                    continue
                if status.split("\nState:")[1].split()[0] == "Z":
                    dead += 1
                else:
                    live += 1
                    os.kill(int(p.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
        if not live and not dead or time.monotonic() > deadline:
            return
        time.sleep(0.01)
