"""Command-line options shared by every command, and options generated from the config dataclasses.

The bottom of the CLI: command modules in every room (`train/cli.py`, `data/cli.py`, ...) import it,
so it imports nothing from picochat but `config`. `picochat/cli.py` (the entry point, at the top)
only collects the commands.
"""

from __future__ import annotations

import argparse


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    """`--run NAME`: which run directory a stage reads and writes; and `--debug`."""
    # --run-name is the spelling to use under torchrun, whose own parser rejects "--run" as an
    # ambiguous abbreviation of its --run-path option
    parser.add_argument("--run", "--run-name", dest="run", default="default",
                        help="run name under $PICOCHAT_HOME/runs (default: default); under torchrun write --run-name")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
