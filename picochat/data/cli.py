"""`picochat data preview|download|stats`, and the source options other stages share.

Owns `add_source_args(parser)` / `data_config_from_args(args)` (the one way a command picks its text
source) and the `data` command. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import itertools
import time

from ..config import DataConfig


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose the text source: embedded corpus (default), local files or shards."""
    d = DataConfig()
    g = parser.add_argument_group("text source")
    g.add_argument("--source", choices=("embedded", "files", "shards"), default=None,
                   help="where text comes from (default: embedded, or files when --paths is given)")
    g.add_argument("--paths", nargs="+", default=[], metavar="PATH",
                   help=".txt/.jsonl/.parquet files or globs (quote globs) for --source files")
    g.add_argument("--text-field", default=d.text_field, help="jsonl field / parquet column with the text")
    g.add_argument("--shard-url", default=d.shard_url, help="base URL of shard_NNNNN.parquet files")
    g.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="shards to use; with 2 or more the last one is the val split")
    g.add_argument("--embedded-docs", type=int, default=d.embedded_docs,
                   help="documents in the embedded corpus")
    g.add_argument("--embedded-seed", type=int, default=d.embedded_seed)
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--strict-data", action="store_true",
                   help="stop with an error on a damaged file met while reading (default: skip it with a warning)")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    d = DataConfig()
    paths = list(getattr(args, "paths", None) or [])
    source = getattr(args, "source", None) or ("files" if paths else d.source)
    if paths and source != "files":
        raise ValueError(f"--paths is only used with --source files (got --source {source})")
    return DataConfig(
        source=source, paths=paths,
        text_field=getattr(args, "text_field", d.text_field),
        shard_url=getattr(args, "shard_url", d.shard_url),
        num_shards=getattr(args, "num_shards", d.num_shards),
        embedded_docs=getattr(args, "embedded_docs", d.embedded_docs),
        embedded_seed=getattr(args, "embedded_seed", d.embedded_seed),
        val_fraction=getattr(args, "val_fraction", d.val_fraction),
        strict_data=getattr(args, "strict_data", d.strict_data),
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at, download and count text sources")
    dsub = p.add_subparsers(dest="action", metavar="<action>", required=True)

    pv = dsub.add_parser("preview", help="print the first documents of the source")
    add_source_args(pv)
    pv.add_argument("-n", "--num-docs", type=int, default=3)
    pv.add_argument("--split", choices=("train", "val"), default="train")
    pv.add_argument("--max-chars", type=int, default=1500, help="crop each printed document")
    pv.add_argument("--debug", action="store_true", help="show full tracebacks")
    pv.set_defaults(func=cmd_preview)

    dl = dsub.add_parser("download", help="download FineWeb-Edu shards (resumable)")
    dl.add_argument("--num-shards", type=int, default=DataConfig.num_shards)
    dl.add_argument("--first", type=int, default=0, help="index of the first shard")
    dl.add_argument("--shard-url", default=DataConfig.shard_url)
    dl.add_argument("--debug", action="store_true", help="show full tracebacks")
    dl.set_defaults(func=cmd_download)

    st = dsub.add_parser("stats", help="count documents and characters of the source")
    add_source_args(st)
    st.add_argument("--split", choices=("train", "val", "both"), default="both")
    st.add_argument("--debug", action="store_true", help="show full tracebacks")
    st.set_defaults(func=cmd_stats)


def cmd_preview(args: argparse.Namespace) -> int:
    from .sources import open_source

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

    cfg = DataConfig(source="shards", shard_url=args.shard_url, num_shards=args.num_shards)
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
