"""Data-pipeline benchmark (CPU): tokenizer training MB/s, batch encode MB/s and pretraining-loader
tokens/s at B=32, T=2048.

Two corpora, because compression changes tokens-per-byte and so the loader's token rate:
* `embedded`: the offline demo corpus (picochat/data/corpus.py), a small vocabulary of real words;
* `synthetic`: pseudo-random "web-like" text (invented words, capitals, digits, punctuation, some
  long documents) that compresses about as badly as real web text (~4 bytes per token).

The loader figure is end to end and steady state: source -> background tokenization -> best-fit
packing -> (inputs, targets) tensors, measured after a warm-up, over far more tokens than the
prefetch queue can hold, so tokenization is inside the measurement. "pack-only" replays
pre-computed encodings to show the packer's own speed (the headroom above the tokenizer).

    python -m picochat.bench.loader [--vocab-size 16384] [--batches 60] [--corpus embedded synthetic]

Prints a human table, then one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse

from ..options import float_in, int_at_least
import json
import os
import platform
import random
import time
from collections.abc import Iterator

import torch

from picochat.data.loader import PretrainLoader, measure_throughput
from picochat.tokenizer import Tokenizer


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Web-like text: ~50k invented words (Zipf-ish use), sentences, numbers, some long documents."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 0.5, 0.2, 0.2, 0.1]
    lexicon = ["".join(rng.choices(letters, weights, k=rng.randint(1, 11))) for _ in range(50000)]
    zipf = [1.0 / (i + 1) for i in range(len(lexicon))]
    docs = []
    for _ in range(n):
        n_words = int(rng.lognormvariate(5.5, 0.8)) + 5  # median ~250 words, a tail of long ones
        words = rng.choices(lexicon, zipf, k=n_words)
        out, start = [], True
        for w in words:
            if start:
                w = w.capitalize()
            r = rng.random()
            if r < 0.03:
                w = str(rng.randint(0, 100000))
            out.append(w)
            start = r > 0.93
            if start:
                out[-1] += rng.choice(".!?.")
            elif r < 0.10:
                out[-1] += ","
        docs.append(" ".join(out) + ".")
    return docs


class CorpusSource:
    """A TextSource over an in-memory document list, cycled forever in fixed chunks."""

    def __init__(self, name: str, docs: list[str], chunk_docs: int = 256):
        self.name, self.docs, self.chunk_docs = name, docs, chunk_docs
        self.n_chunks = max(1, len(docs) // chunk_docs)

    def iter_chunks(self, split: str, start: int = 0, epochs: int | None = None
                    ) -> Iterator[tuple[int, list[str]]]:
        index = start
        while epochs is None or index < epochs * self.n_chunks:
            c = index % self.n_chunks
            yield index, self.docs[c * self.chunk_docs:(c + 1) * self.chunk_docs]
            index += 1


class _PretokenizedTokenizer:
    """Replays encodings computed up front: isolates the packer's own speed from tokenization."""

    def __init__(self, tok: Tokenizer, docs: list[str], ids: list[list[int]]):
        self.bos_id = tok.bos_id
        self._ids = dict(zip(docs, ids))

    def encode_batch(self, texts: list[str], num_threads: int = 1, prepend_bos: bool = False
                     ) -> list[list[int]]:
        return [([self.bos_id] if prepend_bos else []) + self._ids[t] for t in texts]


def _mb(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def bench_corpus(name: str, docs: list[str], vocab_size: int, train_mb: float, batch_size: int,
                 seq_len: int, batches: int, num_threads: int) -> dict:
    # Tokenizer training on a prefix of about train_mb megabytes.
    train_docs, seen = [], 0.0
    for d in docs:
        train_docs.append(d)
        seen += len(d.encode()) / 1e6
        if seen >= train_mb:
            break
    t0 = time.perf_counter()
    tok = Tokenizer.train(train_docs, vocab_size)
    train_s = time.perf_counter() - t0
    result = {"corpus": name, "vocab_size": tok.vocab_size, "train_mb": round(seen, 2),
              "train_mb_per_s": round(seen / train_s, 2)}

    # Batch encoding, 1 thread and `num_threads` threads, on the whole corpus.
    mb = _mb(docs)
    for threads in sorted({1, num_threads}):
        t0 = time.perf_counter()
        ids = tok.encode_batch(docs, num_threads=threads)
        dt = time.perf_counter() - t0
        result[f"encode_mb_per_s_{threads}t"] = round(mb / dt, 2)
        result[f"encode_tok_per_s_{threads}t"] = round(sum(map(len, ids)) / dt)
    result["bytes_per_token"] = round(mb * 1e6 / sum(map(len, ids)), 2)

    # The loader, end to end.
    loader = PretrainLoader(CorpusSource(name, docs), tok, batch_size, seq_len, num_threads=num_threads,
                            log_every=0)
    try:
        result["loader_tok_per_s"] = round(measure_throughput(loader, batches, warmup=3))
        stats = loader.stats
    finally:
        loader.close()
    result["crop_frac"] = round(stats["crop_frac"], 4)
    # Packing alone (documents already tokenized): the headroom above the tokenizer's rate.
    loader = PretrainLoader(CorpusSource(name, docs), _PretokenizedTokenizer(tok, docs, ids), batch_size,
                            seq_len, log_every=0)
    try:
        result["pack_only_tok_per_s"] = round(measure_throughput(loader, batches, warmup=3))
    finally:
        loader.close()
    result["loader_tokens_measured"] = batches * batch_size * seq_len
    return result


def run_loader_bench(corpora: tuple[str, ...] = ("embedded", "synthetic"), vocab_size: int = 16384,
                     train_mb: float = 8.0, n_docs: int = 12000, batch_size: int = 32,
                     seq_len: int = 2048, batches: int = 60, num_threads: int = 2) -> dict:
    """Measure every figure on each corpus; returns the JSON-able record."""
    rows = []
    load_before = os.getloadavg()[0]  # the box may be shared: say how busy it was
    for name in corpora:
        if name == "embedded":
            from picochat.data.corpus import generate_documents

            docs = generate_documents(n_docs, 1234)
        elif name == "synthetic":
            docs = synthetic_documents(n_docs)
        else:
            raise ValueError(f"unknown corpus {name!r}")
        rows.append(bench_corpus(name, docs, vocab_size, train_mb, batch_size, seq_len, batches, num_threads))
    return {"bench": "loader", "device": "cpu", "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "batch_size": batch_size, "seq_len": seq_len, "num_threads": num_threads,
            "date": time.strftime("%Y-%m-%d"), "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2), "results": rows}


def print_table(record: dict) -> None:
    cols = [("corpus", "corpus"), ("vocab", "vocab_size"), ("bytes/tok", "bytes_per_token"),
            ("train MB/s", "train_mb_per_s"), ("encode MB/s 1t", "encode_mb_per_s_1t"),
            (f"encode MB/s {record['num_threads']}t", f"encode_mb_per_s_{record['num_threads']}t"),
            ("loader tok/s", "loader_tok_per_s"), ("pack-only tok/s", "pack_only_tok_per_s"),
            ("crop %", "crop_frac")]
    print(f"data pipeline on {record['cpu_count']} CPU cores, torch {record['torch']}, "
          f"B={record['batch_size']} T={record['seq_len']}, {record['num_threads']} encode threads")
    print(" | ".join(f"{h:>14}" for h, _ in cols))
    for r in record["results"]:
        cells = []
        for _, key in cols:
            v = r.get(key, "")
            if key == "crop_frac":
                v = f"{100 * v:.2f}"
            elif key in ("loader_tok_per_s", "pack_only_tok_per_s"):
                v = f"{v / 1e6:.2f}M"
            cells.append(f"{v:>14}")
        print(" | ".join(cells))


def add_loader_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="tokenizer training/encoding MB/s and loader tokens/s on this CPU")
    p.add_argument("--corpus", nargs="+", default=["embedded", "synthetic"])
    p.add_argument("--vocab-size", type=int_at_least(1), default=16384)
    p.add_argument("--train-mb", type=float_in(0.0, lo_open=True), default=8.0)
    p.add_argument("--docs", type=int_at_least(1), default=12000)
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--seq-len", type=int_at_least(1), default=2048)
    p.add_argument("--batches", type=int_at_least(1), default=60)
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.set_defaults(func=cmd_loader_bench)


def cmd_loader_bench(a: argparse.Namespace) -> int:
    record = run_loader_bench(tuple(a.corpus), a.vocab_size, a.train_mb, a.docs, a.batch_size, a.seq_len,
                              a.batches, a.threads)
    print_table(record)
    print(json.dumps(record))
    return 0

