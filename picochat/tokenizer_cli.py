"""`picochat tokenizer train|encode|info`: the tokenizer stage's commands."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .config import MIN_VOCAB, ConfigError, DataConfig, TokenizerConfig
from .options import add_config_options, add_run_arg, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, inspect or use the BPE tokenizer")
    tsub = p.add_subparsers(dest="action", metavar="<action>", required=True)

    t = tsub.add_parser("train", help="train a byte-level BPE on the run's text source")
    add_run_arg(t)
    add_config_options(t, TokenizerConfig, title="tokenizer")
    from .data.cli import add_source_args

    add_source_args(t)
    t.set_defaults(func=cmd_train)

    e = tsub.add_parser("encode", help="print the token ids of a text (stdin if no text)")
    add_run_arg(e)
    e.add_argument("text", nargs="?")
    e.add_argument("--bos", action="store_true", help="prepend <|bos|>")
    e.set_defaults(func=cmd_encode)

    i = tsub.add_parser("info", help="vocabulary size and compression on held-out text")
    add_run_arg(i)
    from .data.cli import add_source_args as add_src

    add_src(i)
    i.set_defaults(func=cmd_info)


def train_tokenizer(run: str, data: DataConfig, cfg: TokenizerConfig) -> dict:
    """Train on the source's train split, save into the run, return timing figures."""
    from .common import log
    from .runs import RunPaths
    from .data.sources import iter_texts
    from .tokenizer import Tokenizer

    paths = RunPaths.for_run(run)
    n_chars = 0

    def counted():
        nonlocal n_chars
        for text in iter_texts(data, "train"):
            n_chars += min(len(text), cfg.doc_cap)
            yield text

    t0 = time.perf_counter()
    tok = Tokenizer.train(counted(), cfg.vocab_size, doc_cap=cfg.doc_cap, max_chars=cfg.max_chars)
    seconds = time.perf_counter() - t0
    if n_chars == 0:
        raise ConfigError("paths", "files with text in them (the train split has no characters)",
                          data.paths or data.source)
    if tok.vocab_size < cfg.vocab_size:  # BPE ran out of pairs seen twice: the text is too small or too uniform
        if tok.vocab_size <= MIN_VOCAB:
            raise ConfigError("vocab_size", f"at most {MIN_VOCAB} for this text ({n_chars:,} characters: no pair of "
                              "tokens repeats, so nothing can be merged)", cfg.vocab_size)
        log.warning(f"tokenizer: learned only {tok.vocab_size} of the {cfg.vocab_size} tokens asked for: "
                    f"{n_chars:,} characters of the {data.source} source hold no more repeated pairs "
                    "(more or more varied text would allow more)")
    tok.save(paths.tokenizer)
    stats = {"vocab_size": tok.vocab_size, "chars": n_chars, "seconds": round(seconds, 3),
             "mb_per_s": round(n_chars / 1e6 / max(seconds, 1e-9), 3), "path": str(paths.tokenizer)}
    log.info(f"tokenizer: {tok.vocab_size} tokens learned from {n_chars / 1e6:.1f}M chars in {seconds:.1f}s "
             f"({stats['mb_per_s']} MB/s) -> {paths.tokenizer}")
    return stats


def cmd_train(args: argparse.Namespace) -> int:
    from .data.cli import data_config_from_args

    cfg, data = config_from_args(args, TokenizerConfig), data_config_from_args(args)
    train_tokenizer(args.run, data, cfg)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .runs import load_tokenizer

    tok = load_tokenizer(args.run)
    text = args.text if args.text is not None else sys.stdin.read()
    print(json.dumps(tok.encode(text, prepend_bos=args.bos)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import itertools

    from .data.cli import data_config_from_args
    from .data.sources import iter_texts
    from .runs import load_tokenizer

    data = data_config_from_args(args)
    tok = load_tokenizer(args.run)
    sample = list(itertools.islice(iter_texts(data, "val"), 500))
    t0 = time.perf_counter()
    bpt = tok.bytes_per_token(sample) if sample else float("nan")
    seconds = time.perf_counter() - t0
    n_bytes = sum(len(t.encode()) for t in sample)
    print(f"vocab size:        {tok.vocab_size} ({tok.n_bpe} BPE + {tok.vocab_size - tok.n_bpe} special)")
    print(f"held-out sample:   {len(sample)} documents, {n_bytes / 1e6:.2f} MB")
    print(f"compression:       {bpt:.3f} bytes/token")
    print(f"encode speed:      {n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")
    return 0
