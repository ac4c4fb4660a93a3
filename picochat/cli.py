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


# OpenMP threads (torch's CPU ops, MKL) that wait for work sleep instead of spinning. Spinning saves a
# few microseconds per op on an idle machine; on a busy one (a laptop running anything else, CI running
# tests beside it) a spinning thread holds the core its partner needs, and a 2-thread CPU training step
# of the demo took 9-10 s instead of 1.3 s (measured, load 7 on 2 cores). Takes effect only because the
# CLI imports torch after this line; a value the user set wins.
CPU_WAIT_POLICY = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", CPU_WAIT_POLICY)
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
