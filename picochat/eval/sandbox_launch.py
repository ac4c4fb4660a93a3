"""Launcher run by `execution.py` (as a script, with `python -I -S`): apply the sandbox's resource
limits, drop to the slot's user id when given one, then exec the program (or bwrap around it).

Doing this in a fresh interpreter rather than in a `preexec_fn` keeps the evaluator (which has
threads: torch, the tool pool) from forking into arbitrary Python code. Standard library only.

On Linux the launcher stays as a small parent (a "child subreaper") that waits for the program and
reaps whatever the program leaves behind: bwrap's own pid-1 process outlives bwrap by a moment,
and without a subreaper it becomes a zombie of the machine's init, which may reap it only seconds
later (the cleanup in `execution.py` waits for a uid's zombies: they count against its process
limit). Once the program has ended, the parent kills and reaps what it left (the evaluator's
cleanup killed those anyway). The parent keeps its own ids and no limits but the core size; the
program's exit status is passed on as it was (a signal that ended the program ends the launcher
the same way)."""

import json
import os
import resource
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
ORPHAN_GRACE_S = 1.0  # the most the parent spends killing and reaping what the program left (normally ms)


def become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exec_program(spec: dict) -> None:
    uid = spec.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
    # limits after the group change but before the uid change: a process limit is checked at fork
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if uid is not None:
        os.setuid(uid)
    argv = spec["argv"]
    os.execv(argv[0], argv)  # an absolute path: after setuid the evaluator's stdlib may be unreadable


def children(parent: int | None = None, live: bool = False) -> list[int]:
    """The children of `parent` (default: this process; with the subreaper flag, every orphan the
    program left), by the parent id in /proc/<pid>/stat; `live`: zombies left out."""
    parent_id, found = str(os.getpid() if parent is None else parent), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent_id and not (live and state == "Z"):
                found.append(int(name))
    return found


def wait_and_reap(pid: int) -> int:
    """Wait for the program; then kill and reap what it left (as the evaluator's cleanup would have
    killed it once the program ended) and return the program's wait status."""
    _, status = os.waitpid(pid, 0)
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # none left
        if done == 0:
            for child in children():
                try:
                    os.kill(child, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.002)
    return status


def main() -> None:
    spec = json.loads(sys.argv[1])
    if not become_subreaper():
        exec_program(spec)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    pid = os.fork()
    if pid == 0:
        try:
            exec_program(spec)
        except BaseException as e:  # noqa: BLE001 - the child must never return into the parent's code
            os.write(2, f"sandbox launcher: {type(e).__name__}: {e}\n".encode())
        os._exit(127)
    status = wait_and_reap(pid)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 1)


if __name__ == "__main__":
    main()
