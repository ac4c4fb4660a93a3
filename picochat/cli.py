"""The one entry point: `picochat <command> [options]`.

Each command lives beside the stage it drives: a module exposes `register(subparsers)` that adds its
parser and sets `func`. Modules are imported only when listed here, and heavy imports stay inside
the handlers, so `picochat --help` is quick and the server extras are never needed by the core.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that registers it (in pipeline order, which is also --help order)
COMMANDS: dict[str, str] = {
    "tokenizer": "picochat.tokenizer_cli",
    "data": "picochat.data.cli",
    "pretrain": "picochat.train.cli",
    "sft": "picochat.train.sft",  # registers both `midtrain` and `sft`
    "eval": "picochat.eval.cli",
    "chat": "picochat.infer.chat_cli",
    "report": "picochat.report",
    "run": "picochat.pipeline",
    "bench": "picochat.bench.cli",
    "demo": "picochat.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picochat",
        description="Train a small ChatGPT-style model end to end and talk to it.",
    )
    parser.add_argument("--version", action="version", version=f"picochat {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from .common import setup_logging

    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"picochat {args.command}: error: {e}", file=sys.stderr)
        return 1


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    """`--run NAME`: which run directory a stage reads and writes."""
    # --run-name is the spelling to use under torchrun, whose own parser rejects "--run" as an
    # ambiguous abbreviation of its --run-path option
    parser.add_argument("--run", "--run-name", dest="run", default="default",
                        help="run name under $PICOCHAT_HOME/runs (default: default); under torchrun write --run-name")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


if __name__ == "__main__":
    raise SystemExit(main())
