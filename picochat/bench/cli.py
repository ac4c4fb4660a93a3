"""`picochat bench <what>`: benchmarks with baseline modes, a human table and a JSON last line."""

from __future__ import annotations

import argparse
import importlib

# subcommand providers: module -> function adding its parser(s) to the bench group
PROVIDERS = (
    ("picochat.bench.train", "add_train_parser"),
    ("picochat.bench.loader", "add_loader_parser"),
    ("picochat.bench.decode", "add_decode_parser"),
    ("picochat.bench.batch", "add_batch_parser"),
    ("picochat.bench.tiles", "add_tiles_parser"),
    ("picochat.bench.sft", "add_sft_parser"),
    ("picochat.bench.autobatch", "add_autobatch_parser"),
    ("picochat.bench.muon", "add_muon_parser"),
    ("picochat.bench.report", "add_report_parser"),
    ("picochat.bench.rl", "add_rl_parser"),
    ("picochat.bench.serve", "add_serve_parser"),
    ("picochat.bench.eval", "add_eval_parser"),
)


HELP = "measure training, SFT, autobatch and decode speed"


def register_stub(sub: argparse._SubParsersAction) -> None:
    """`bench` in the command list without its benchmarks: they import torch, which `picochat --help`
    and the other commands need not wait for (cli.py registers the full parser when `bench` runs)."""
    sub.add_parser("bench", help=HELP)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP)
    bsub = p.add_subparsers(dest="bench", metavar="<benchmark>", required=True)
    for module, func in PROVIDERS:
        try:
            getattr(importlib.import_module(module), func)(bsub)
        except (ImportError, AttributeError):  # a benchmark that is not built yet is simply absent
            continue
