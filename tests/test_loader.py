"""Tests of the pretraining loader: packing rules, crop accounting, determinism, exact resume, rank
sharding, error propagation and the val helper. Uses an in-test source (same protocol as
picochat/data/sources.py) and a tiny BPE tokenizer trained in a fixture, so everything is fast."""

from __future__ import annotations

import io
import random
import re
import threading
import traceback
from collections.abc import Iterator

import pytest
import torch

from picochat.data.loader import PretrainLoader, val_batches
from picochat.tokenizer import Tokenizer

WORDS = ("the cat dog sat ran on a mat red blue big small fox jumped over lazy river tree bird sang "
         "and then it was happy sad one two three four five").split()


class ListSource:
    """A deterministic in-memory source: chunk c of a split holds docs c*per_chunk ... (c+1)*per_chunk-1.

    Every document starts with a unique marker "D<id>|" so tests can tell which document a row holds.
    Chunk indices keep increasing across epochs; `start` skips without generating anything."""

    name = "list"

    def __init__(self, n_chunks: int = 40, per_chunk: int = 12, seed: int = 0, max_words: int = 60,
                 fail_at: int | None = None):
        self.n_chunks, self.per_chunk, self.fail_at = n_chunks, per_chunk, fail_at
        rng = random.Random(seed)
        self.docs = {split: [self._doc(i, rng, max_words) for i in range(n_chunks * per_chunk)]
                     for split in ("train", "val")}

    @staticmethod
    def _doc(i: int, rng: random.Random, max_words: int) -> str:
        # Mostly short documents, some longer than a test row (exercise the long-document crop).
        n = rng.randint(1, max_words) if rng.random() < 0.9 else rng.randint(max_words, 4 * max_words)
        return f"D{i}|" + " ".join(rng.choice(WORDS) for _ in range(n))

    def iter_chunks(self, split: str, start: int = 0, epochs: int | None = None
                    ) -> Iterator[tuple[int, list[str]]]:
        index = start
        while epochs is None or index < epochs * self.n_chunks:
            if self.fail_at is not None and index >= self.fail_at:
                raise_from_source(index)
            c = index % self.n_chunks
            yield index, self.docs[split][c * self.per_chunk:(c + 1) * self.per_chunk]
            index += 1


def raise_from_source(index: int) -> None:
    raise ValueError(f"broken chunk {index}")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    src = ListSource()
    return Tokenizer.train(src.docs["train"], vocab_size=400)


def take(loader: PretrainLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def doc_ids(tok: Tokenizer, inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Ids of the documents whose full marker is visible in the batch's rows."""
    rows = torch.cat([inputs, targets[:, -1:]], dim=1)
    ids = []
    for row in rows.tolist():
        for seg in split_bos(row, tok.bos_id):
            m = re.match(r"D(\d+)\|", tok.decode(seg))
            if m:
                ids.append(int(m.group(1)))
    return ids


def split_bos(row: list[int], bos: int) -> list[list[int]]:
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[s + 1:e] for s, e in zip(starts, starts[1:] + [len(row)])]


def test_shapes_bos_and_shift(tok: Tokenizer) -> None:
    loader = PretrainLoader(ListSource(), tok, batch_size=4, seq_len=64, pool_docs=30)
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tok.bos_id).all(), "every row must start with <|bos|>"
        assert torch.equal(x[:, 1:], y[:, :-1])
    loader.close()


def test_rows_hold_whole_documents_except_the_last(tok: Tokenizer) -> None:
    """Between BOS tokens a row holds a complete document; only the row's last one may be cropped."""
    src = ListSource()
    encoded = {i: tok.encode(d) for i, d in enumerate(src.docs["train"])}
    loader = PretrainLoader(src, tok, batch_size=4, seq_len=64, pool_docs=30)
    seen: set[int] = set()
    for x, y in take(loader, 10):
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            segs = split_bos(row, tok.bos_id)
            for j, seg in enumerate(segs):
                doc_id = int(re.match(r"D(\d+)\|", tok.decode(seg)).group(1)) if j < len(segs) - 1 else None
                if doc_id is not None:
                    assert seg == encoded[doc_id], "a document was split in the middle of a row"
                    assert doc_id not in seen, "a document was emitted twice in one epoch"
                    seen.add(doc_id)
    loader.close()


class CharTokenizer:
    """Stub tokenizer: one token per character, so document lengths are exact and chosen by tests."""

    bos_id = 0

    def encode_batch(self, texts: list[str], num_threads: int = 4, prepend_bos: bool = False
                     ) -> list[list[int]]:
        return [([0] if prepend_bos else []) + [ord(c) for c in t] for t in texts]


class FixedSource:
    name = "fixed"

    def __init__(self, chunks: list[list[str]]):
        self.chunks = chunks

    def iter_chunks(self, split: str, start: int = 0, epochs: int | None = None):
        for i in range(start, len(self.chunks)):
            yield i, self.chunks[i]


def test_best_fit_packing_exact() -> None:
    # Lengths with BOS: a=6, b=5, c=4, d=3, e=2; rows of 10 tokens.
    docs = ["aaaaa", "bbbb", "ccc", "dd", "e"]
    loader = PretrainLoader(FixedSource([docs]), CharTokenizer(), batch_size=1, seq_len=9, pool_docs=100)
    (x1, y1), = take(loader, 1)
    row1 = "".join(chr(t) if t else "|" for t in torch.cat([x1[0], y1[0, -1:]]).tolist())
    assert row1 == "|aaaaa|ccc"  # largest fitting (6), then the largest that fits the 4 left (4)
    (x2, y2), = take(loader, 1)
    row2 = "".join(chr(t) if t else "|" for t in torch.cat([x2[0], y2[0, -1:]]).tolist())
    assert row2 == "|bbbb|dd|e"  # 5 + 3 + 2 = 10 exactly
    with pytest.raises(StopIteration):
        next(loader)
    assert loader.stats["tokens_cropped"] == 0


def test_crop_shortest_when_nothing_fits_and_long_docs() -> None:
    # Row of 8. Pool: 7-token doc, two 4-token docs, one 20-token doc (cropped to 8 on arrival).
    docs = ["x" * 6, "y" * 3, "z" * 3, "w" * 19]
    loader = PretrainLoader(FixedSource([docs]), CharTokenizer(), batch_size=2, seq_len=7, pool_docs=100)
    x, y = next(loader)
    rows = ["".join(chr(t) if t else "|" for t in r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    # Row 1 takes the (cropped) 8-token doc whole; row 2 the 7-token one plus 1 token of the oldest
    # shortest doc; the next batch would start with the last 4-token doc and then run dry.
    assert rows[0] == "|" + "w" * 7
    assert rows[1] == "|xxxxxx|"
    with pytest.raises(StopIteration):
        next(loader)
    s = loader.stats
    assert s["tokens_cropped"] == (20 - 8) + 3
    assert s["tokens_dropped"] == 4 and s["tokens_pooled"] == 0
    assert s["tokens_in"] == s["tokens_emitted"] + s["tokens_cropped"] + s["tokens_dropped"] + s["tokens_pooled"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_crop_accounting_is_exact(tok: Tokenizer, world_size: int) -> None:
    src = ListSource()
    rank = world_size - 1
    loader = PretrainLoader(src, tok, batch_size=3, seq_len=48, pool_docs=25, rank=rank, world_size=world_size)
    take(loader, 8)
    s, state = loader.stats, loader.state_dict()
    loader.close()
    assert s["tokens_emitted"] == 8 * 3 * 49
    assert s["tokens_in"] == s["tokens_emitted"] + s["tokens_cropped"] + s["tokens_dropped"] + s["tokens_pooled"]
    # Independently: the pool took in exactly this rank's chunks below next_chunk, BOS included.
    expected = sum(len(tok.encode(d)) + 1
                   for c in range(state["next_chunk"]) if c % world_size == rank
                   for d in src.docs["train"][c * src.per_chunk:(c + 1) * src.per_chunk])
    assert s["tokens_in"] == expected
    assert s["tokens_pooled"] == int(state["pool_lengths"].sum())
    assert 0.0 <= s["crop_frac"] < 1.0


def test_deterministic(tok: Tokenizer) -> None:
    a = take(PretrainLoader(ListSource(), tok, 4, 64, pool_docs=30, num_threads=1), 12)
    b = take(PretrainLoader(ListSource(), tok, 4, 64, pool_docs=30, num_threads=2, prefetch_chunks=1), 12)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("k,world_size", [(0, 1), (3, 1), (7, 1), (4, 2)])
def test_exact_resume(tok: Tokenizer, k: int, world_size: int) -> None:
    rank = world_size - 1
    args = dict(batch_size=4, seq_len=64, pool_docs=30, rank=rank, world_size=world_size)
    reference = take(PretrainLoader(ListSource(), tok, **args), k + 6)
    first = PretrainLoader(ListSource(), tok, **args, prefetch_chunks=8)
    take(first, k)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the state must survive a real checkpoint round trip
    first.close()
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = PretrainLoader(ListSource(), tok, **args)
    resumed.load_state_dict(state)
    for (xr, yr), (x, y) in zip(reference[k:], take(resumed, 6)):
        assert torch.equal(xr, x) and torch.equal(yr, y)
    # Loading into a loader that already ran ahead also rewinds it exactly.
    busy = PretrainLoader(ListSource(), tok, **args)
    take(busy, k + 2)
    busy.load_state_dict(state)
    assert torch.equal(next(busy)[0], reference[k][0])
    busy.close()
    resumed.close()


def test_resume_rejects_other_geometry(tok: Tokenizer) -> None:
    loader = PretrainLoader(ListSource(), tok, 2, 32, pool_docs=10)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        PretrainLoader(ListSource(), tok, 2, 32, rank=0, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint(tok: Tokenizer, world_size: int) -> None:
    src = ListSource()
    per_rank = []
    for rank in range(world_size):
        loader = PretrainLoader(src, tok, 3, 64, rank=rank, world_size=world_size, pool_docs=20)
        ids = set()
        for x, y in take(loader, 6):
            ids.update(doc_ids(tok, x, y))
        loader.close()
        assert ids, "no document identified"
        # Every document comes from a chunk this rank owns.
        assert all((i // src.per_chunk) % world_size == rank for i in ids)
        per_rank.append(ids)
    for r in range(world_size):
        for q in range(r + 1, world_size):
            assert not per_rank[r] & per_rank[q]


def test_background_error_propagates(tok: Tokenizer) -> None:
    loader = PretrainLoader(ListSource(fail_at=3), tok, 4, 64, pool_docs=1000)
    with pytest.raises(ValueError, match="broken chunk 3") as info:
        take(loader, 100)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "raise_from_source" in frames, "the original traceback from the thread must be kept"
    with pytest.raises(ValueError):  # and it keeps failing instead of hanging or draining quietly
        next(loader)
    loader.close()


def test_close_stops_thread(tok: Tokenizer) -> None:
    before = {t.ident for t in threading.enumerate()}
    loader = PretrainLoader(ListSource(), tok, 2, 32, pool_docs=10, prefetch_chunks=1)
    next(loader)
    loader.close()
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("picochat-loader")]
    assert not leftover
    next(loader)  # closing keeps the position: iteration restarts the prefetcher where it was
    loader.close()


def test_val_batches_fixed_and_finite(tok: Tokenizer) -> None:
    src = ListSource(n_chunks=6)
    a = list(val_batches(src, tok, 2, 32, max_batches=1000, rank=0, world_size=1, device="cpu"))
    b = list(val_batches(src, tok, 2, 32, max_batches=1000, rank=0, world_size=1, device="cpu"))
    assert 0 < len(a) < 1000 and len(a) == len(b)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert len(list(val_batches(src, tok, 2, 32, max_batches=3))) == 3
    # val comes from the val split, not train
    train = next(PretrainLoader(src, tok, 2, 32))[0]
    assert not torch.equal(train, a[0][0])


def test_real_embedded_source(tok: Tokenizer) -> None:
    """The loader against picochat's own EmbeddedSource: sharding and exact resume."""
    sources = pytest.importorskip("picochat.data.sources")
    src = sources.EmbeddedSource(n_docs=600, chunk_docs=16)
    args = dict(batch_size=2, seq_len=128, pool_docs=40)
    firsts = []
    for rank in range(2):
        reference = take(PretrainLoader(src, tok, rank=rank, world_size=2, **args), 6)
        first = PretrainLoader(src, tok, rank=rank, world_size=2, **args)
        take(first, 3)
        resumed = PretrainLoader(src, tok, rank=rank, world_size=2, **args)
        resumed.load_state_dict(first.state_dict())
        first.close()
        for (xr, _), (x, _) in zip(reference[3:], take(resumed, 3)):
            assert torch.equal(xr, x)
        resumed.close()
        firsts.append(reference[0][0])
    assert not torch.equal(firsts[0], firsts[1])
