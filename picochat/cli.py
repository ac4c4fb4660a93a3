"""The one entry point: `picochat <command> [options]`.

Each command lives beside the stage it drives: a module exposes `register(subparsers)` that adds its
parser and sets `func`. Modules are imported only when listed here, and heavy imports stay inside
the handlers, so `picochat --help` is quick and the server extras are never needed by the core.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError
from .options import add_run_arg  # noqa: F401  (where command modules used to find it)

# command name -> module that registers it (in pipeline order, which is also --help order)
COMMANDS: dict[str, str] = {
    "tokenizer": "picochat.tokenizer_cli",
    "data": "picochat.data.cli",
    "pretrain": "picochat.train.cli",
    "sft": "picochat.train.sft",  # registers both `midtrain` and `sft`
    "rl": "picochat.train.rl_cli",
    "eval": "picochat.eval.cli",
    "chat": "picochat.infer.chat_cli",
    "serve": "picochat.serve.cli",
    "export": "picochat.export",
    "report": "picochat.report",
    "run": "picochat.pipeline",
    "bench": "picochat.bench.cli",
    "demo": "picochat.demo",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: a command's usage lists dozens of options, which buries the
    message. Subcommand parsers are made with the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command tree; given the command line `argv`, commands other than the one it runs may
    register a stub (name and help only) where their full options are slow to import (`bench`)."""
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = Parser(
        prog="picochat",
        description="Train a small ChatGPT-style model end to end and talk to it.",
    )
    parser.add_argument("--version", action="version", version=f"picochat {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for command, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        stub = getattr(module, "register_stub", None)
        (stub if stub is not None and argv is not None and command != wanted else module.register)(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def busy_cores_now(seconds: float = 0.2) -> float | None:
    """How many cores the whole machine keeps busy right now (from /proc/stat over `seconds`; time the
    hypervisor stole counts as neither busy nor idle), or None where /proc/stat cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        fields += [0] * (8 - len(fields))
        return sum(fields) - fields[7], fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return None
    total = total1 - total0
    return (os.cpu_count() or 1) * (total - (idle1 - idle0)) / total if total > 0 else None


def cpu_wait_policy(load: float, cpus: int, busy_now=busy_cores_now) -> str | None:
    """OMP_WAIT_POLICY for this process: "PASSIVE" (threads waiting for work sleep) when the machine is
    already busy, else None (OpenMP's default: spin a while first).

    Spinning saves microseconds per op on an idle machine: the demo took 326 s spinning and 354 s
    passive with 2 cores to itself on a Xeon, 366 s and 481 s on a 2-core AMD EPYC (same CPU-seconds).
    On a busy one (a laptop running anything else, CI running tests beside it) a spinning thread holds
    the core its partner needs: the demo's 2-thread training step took 9-10 s spinning and 1.3 s passive
    at load 7 on 2 cores (docs/benchmarks.md). The 1-minute load average also remembers work that has
    just ended (`make demo` starts right after pip's install), so a high average is checked against a
    short sample of what the cores do now, and only work still running makes the threads sleep."""
    if load <= 0.5 * cpus:
        return None
    busy = busy_now()
    if busy is not None and busy <= 0.25 * cpus:
        return None
    return "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    if "OMP_WAIT_POLICY" not in os.environ:  # read once, when torch loads (after this line); the user's value wins
        policy = cpu_wait_policy(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1)
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy
    from .common import setup_logging
    from .train.preemption import TrainingStopped

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ConfigError as e:  # an option out of range (the configs' own validation): exit 2 like argparse
        if getattr(args, "debug", False):
            raise
        print(f"picochat {_command(args)}: error: {e.cli_message()}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a graceful stop on a signal: the loop logged where and how to resume
        return e.exit_code
    except (ValueError, OSError, RuntimeError) as e:  # OSError covers FileNotFoundError and a full disk
        if getattr(args, "debug", False):
            raise
        print(f"picochat {_command(args)}: error: {e}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> str:
    """The command as typed: `pretrain`, or `tokenizer train` for commands with actions."""
    action = getattr(args, "action", None) or getattr(args, "bench", None)
    return f"{args.command} {action}" if action else args.command


if __name__ == "__main__":
    raise SystemExit(main())
