"""Launcher run by `execution.py` (as a script, with `python -I -S`): apply the sandbox's resource
limits, drop to the slot's user id when given one, then exec the program (or bwrap around it).

Doing this in a fresh interpreter rather than in a `preexec_fn` keeps the evaluator (which has
threads: torch, the tool pool) from forking into arbitrary Python code. Standard library only."""

import json
import os
import resource
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
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


if __name__ == "__main__":
    main()
