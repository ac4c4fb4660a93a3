"""`picochat data preview|download|stats`, and the source options other stages share.

Owns `add_source_args(parser)` / `data_config_from_args(args)` (the one way a command picks its text
source) and the `data` command. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import itertools
import time

from ..config import DataConfig, check_number
from ..options import add_config_options, add_debug_arg, config_from_args


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose the text source: embedded corpus (default), local files or shards."""
    # --source defaults to "files" when --paths is given, else "embedded" (see data_config_from_args)
    add_config_options(parser, DataConfig, title="text source", shown={"source": None})


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    paths = list(getattr(args, "paths", None) or [])
    source = getattr(args, "source", None) or ("files" if paths else DataConfig.source)
    return config_from_args(args, DataConfig, source=source, paths=paths)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at, download and count text sources")
    dsub = p.add_subparsers(dest="action", metavar="<action>", required=True)

    pv = dsub.add_parser("preview", help="print the first documents of the source")
    add_source_args(pv)
    pv.add_argument("-n", "--num-docs", type=int, default=3, help="documents to print (default: 3)")
    pv.add_argument("--split", choices=("train", "val"), default="train")
    pv.add_argument("--max-chars", type=int, default=1500, help="crop each printed document (default: 1500)")
    add_debug_arg(pv)
    pv.set_defaults(func=cmd_preview)

    dl = dsub.add_parser("download", help="download FineWeb-Edu shards (resumable)")
    add_config_options(dl, DataConfig, only=("num_shards", "shard_url"))
    dl.add_argument("--first", type=int, default=0, help="index of the first shard (default: 0)")
    add_debug_arg(dl)
    dl.set_defaults(func=cmd_download)

    st = dsub.add_parser("stats", help="count documents and characters of the source")
    add_source_args(st)
    st.add_argument("--split", choices=("train", "val", "both"), default="both")
    add_debug_arg(st)
    st.set_defaults(func=cmd_stats)


def cmd_preview(args: argparse.Namespace) -> int:
    from .sources import open_source

    check_number("num_docs", args.num_docs, lo=1, hi=10**9, flag="--num-docs")
    check_number("max_chars", args.max_chars, lo=1, hi=10**12, flag="--max-chars")
    src = open_source(data_config_from_args(args))
    print(f"source: {src.name}, {args.split} split: {src.num_chunks(args.split)} chunks")
    docs = list(itertools.islice(src.iter_documents(args.split), args.num_docs))
    for i, doc in enumerate(docs):
        shown = doc if len(doc) <= args.max_chars else doc[: args.max_chars] + " [...]"
        print(f"\n--- document {i} ({len(doc)} chars, {len(doc.split())} words) ---\n{shown}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..common import log
    from .download import download_shards

    check_number("first", args.first, lo=0, hi=100_000, flag="--first")
    cfg = config_from_args(args, DataConfig, source="shards")
    t0 = time.perf_counter()
    paths = download_shards(cfg, range(args.first, args.first + args.num_shards))
    size = sum(p.stat().st_size for p in paths)
    log.info(f"{len(paths)} shards ({size / 1e6:.1f} MB) ready in {paths[0].parent} "
             f"({time.perf_counter() - t0:.1f}s)")
    for p in paths:
        print(p)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .sources import open_source

    src = open_source(data_config_from_args(args))
    splits = ("train", "val") if args.split == "both" else (args.split,)
    print(f"source: {src.name}")
    print(f"{'split':<6} {'chunks':>8} {'docs':>10} {'chars':>14} {'words':>12} {'chars/doc':>10}")
    for split in splits:
        n_docs = n_chars = n_words = 0
        for doc in src.iter_documents(split):
            n_docs += 1
            n_chars += len(doc)
            n_words += len(doc.split())
        print(f"{split:<6} {src.num_chunks(split):>8} {n_docs:>10} {n_chars:>14,} {n_words:>12,} "
              f"{n_chars / max(n_docs, 1):>10.0f}")
    return 0
