"""Pretraining loader: background tokenization, BOS-aligned best-fit packing, per-rank sharding and an
exactly resumable state.

Data flow inside one `PretrainLoader`:

    source.iter_chunks ──► prefetch thread (shard filter, tokenize, <|bos|> + doc) ──► bounded queue
        ──► packer (pool of documents, best-fit into (B, T+1) rows) ──► (inputs, targets) on device

* Sharding: rank r takes the chunks whose index % world_size == r, so ranks never see the same
  document. Chunk indices come from the source and keep increasing across epochs.
* Packing: every row starts at a document start (`<|bos|>`), so the model never attends across a
  half-document at position 0. Each row is filled by repeatedly taking the *largest* pooled document
  that still fits; when none fits, the *shortest* one is cropped to fill the row exactly. Documents
  longer than a row are cropped to one row when they enter the pool. Every cropped token is counted.
* Resume: the packer pulls whole chunks into its pool, so its position is fully described by "the
  next chunk index to pull" plus the pool's documents (and the tie-breaking counter). That is what
  `state_dict()` stores; how far the prefetch thread ran ahead is irrelevant, a resumed loader simply
  restarts the source at that chunk index.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from ..common import log
from .packing import BestFitPool

_STATE_VERSION = 1


class TextSource(Protocol):
    """What the loader needs from a text source (see picochat/data/sources.py)."""

    name: str

    def iter_chunks(self, split: str, start: int = 0, epochs: int | None = None
                    ) -> Iterator[tuple[int, list[str]]]: ...


class _Tokenizer(Protocol):
    @property
    def bos_id(self) -> int: ...

    def encode_batch(self, texts: list[str], num_threads: int = 4, prepend_bos: bool = False
                     ) -> list[list[int]]: ...


_END = object()  # the source is exhausted (finite epochs)


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer (traceback included)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _own_chunks(source: TextSource, split: str, start: int, epochs: int | None, rank: int,
                world_size: int) -> Iterator[tuple[int, list[str]]]:
    """This rank's chunks (index % world_size == rank) from `start` on.

    With several ranks, jump straight to each owned chunk (`start` is cheap by the source protocol)
    instead of reading and discarding the other ranks' text, which would cost world_size times the I/O."""
    if world_size == 1:
        yield from source.iter_chunks(split, start=start, epochs=epochs)
        return
    index = start + (rank - start) % world_size  # first owned index >= start
    while True:
        chunks = source.iter_chunks(split, start=index, epochs=epochs)
        got = next(chunks, None)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # release the source's generator (open files) now, not at garbage collection
        if got is None:
            return
        if got[0] != index:
            raise RuntimeError(f"{source.name}: asked for chunk {index}, got {got[0]}")
        yield got
        index += world_size


class _Prefetcher:
    """Daemon thread: reads this rank's chunks from `start` on, tokenizes them, queues them.

    tiktoken's batch encode releases the GIL, so tokenization overlaps with packing and training."""

    def __init__(self, source: TextSource, tokenizer: _Tokenizer, split: str, start: int,
                 epochs: int | None, rank: int, world_size: int, num_threads: int, depth: int):
        self._args = (source, tokenizer, split, start, epochs, rank, world_size, num_threads)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="picochat-loader-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        # A bounded put that notices close(): never block forever on a consumer that went away.
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        source, tokenizer, split, start, epochs, rank, world_size, num_threads = self._args
        try:
            for index, docs in _own_chunks(source, split, start, epochs, rank, world_size):
                if self._stop.is_set():
                    return
                ids = tokenizer.encode_batch(list(docs), num_threads=num_threads, prepend_bos=True)
                arrays = [np.asarray(d, dtype=np.int32) for d in ids]
                if not self._put((index, arrays)):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - everything must reach the consumer
            self._put(_Failure(exc))

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("loader prefetch thread died without a result") from None

    def close(self) -> None:
        self._stop.set()
        # Drain so a producer blocked on a full queue sees the stop flag promptly.
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=5.0)


class PretrainLoader:
    """Infinite (or `epochs`-bounded) iterator of `(inputs, targets)` LongTensors of shape (B, T)."""

    def __init__(self, source: TextSource, tokenizer: _Tokenizer, batch_size: int, seq_len: int,
                 split: str = "train", rank: int = 0, world_size: int = 1,
                 device: torch.device | str = torch.device("cpu"), num_threads: int = 2,
                 prefetch_chunks: int = 4, pool_docs: int = 1000, epochs: int | None = None,
                 log_every: int = 1000):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.row_len = batch_size, seq_len, seq_len + 1
        self.split, self.rank, self.world_size, self.epochs = split, rank, world_size, epochs
        self.device = torch.device(device)
        self.num_threads, self.prefetch_chunks = num_threads, prefetch_chunks
        self.pool_docs, self.log_every = max(1, pool_docs), log_every
        self.bos_id = int(tokenizer.bos_id)
        self._reset(next_chunk=0)
        self._prefetcher: _Prefetcher | None = None

    # -- state -----------------------------------------------------------------------------------
    def _reset(self, next_chunk: int) -> None:
        self._next_chunk = next_chunk  # the packer's position: next source chunk index it will pull
        self._pool = BestFitPool()  # documents (token arrays) waiting for a row
        self._exhausted = False
        self._failure: BaseException | None = None
        self.batches = 0
        self.tokens_in = 0  # tokens of all documents pulled into the pool (BOS included)
        self.tokens_emitted = 0  # tokens placed in rows (B * (T+1) per batch)
        self.tokens_cropped = 0  # tokens pulled in but never emitted (cropped documents)
        self.tokens_dropped = 0  # tokens of an incomplete final batch (finite sources only)
        self.docs_in = 0

    def state_dict(self) -> dict:
        """Plain data (ints + int32 tensors): resumes exactly at the next batch."""
        pending = list(self._pool.pending())
        seqs, lengths = [p[0] for p in pending], [p[1] for p in pending]
        flat = np.concatenate([p[2] for p in pending]) if pending else np.zeros(0, np.int32)
        return {
            "version": _STATE_VERSION, "next_chunk": self._next_chunk, "seq": self._pool.next_seq,
            "rank": self.rank, "world_size": self.world_size, "split": self.split,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "batches": self.batches,
            "pool_seqs": torch.tensor(seqs, dtype=torch.int64),
            "pool_lengths": torch.tensor(lengths, dtype=torch.int64),
            "pool_tokens": torch.from_numpy(flat.copy()),
            "stats": {"tokens_in": self.tokens_in, "tokens_emitted": self.tokens_emitted,
                      "tokens_cropped": self.tokens_cropped, "tokens_dropped": self.tokens_dropped,
                      "docs_in": self.docs_in},
        }

    def continue_after(self, states: list[dict]) -> None:
        """Resume from states saved under another world size: start past the furthest chunk any old
        rank had reached, so no document is seen twice (the old ranks' pooled documents are skipped)."""
        self._stop_prefetch()
        self._reset(max(int(s["next_chunk"]) for s in states) if states else 0)

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        for key in ("rank", "world_size", "split", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, "
                                 f"this loader has {getattr(self, key)!r}")
        self._stop_prefetch()
        self._reset(int(state["next_chunk"]))
        self._pool.clear(next_seq=int(state["seq"]))
        self.batches = int(state["batches"])
        flat = state["pool_tokens"].numpy().astype(np.int32, copy=False)
        offset = 0
        for seq, length in zip(state["pool_seqs"].tolist(), state["pool_lengths"].tolist()):
            self._pool.add(flat[offset:offset + length], length, seq=seq)
            offset += length
        stats = state["stats"]
        self.tokens_in, self.tokens_emitted = stats["tokens_in"], stats["tokens_emitted"]
        self.tokens_cropped, self.docs_in = stats["tokens_cropped"], stats["docs_in"]
        self.tokens_dropped = stats["tokens_dropped"]

    @property
    def stats(self) -> dict:
        """Counters; exactly: tokens_in == emitted + cropped + dropped + pooled."""
        pooled = self._pool.total_length()
        return {"batches": self.batches, "docs_in": self.docs_in, "tokens_in": self.tokens_in,
                "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped,
                "tokens_dropped": self.tokens_dropped, "tokens_pooled": pooled,
                "crop_frac": self.tokens_cropped / max(1, self.tokens_emitted + self.tokens_cropped)}

    def log_stats(self) -> None:
        s = self.stats
        log.info(f"loader[{self.split} r{self.rank}/{self.world_size}]: {s['batches']} batches, "
                 f"{s['tokens_emitted']:,} tokens emitted, {s['tokens_cropped']:,} cropped "
                 f"({100 * s['crop_frac']:.2f}%), {s['docs_in']:,} docs")

    # -- pool ------------------------------------------------------------------------------------
    def _pull_chunk(self) -> bool:
        """Move one chunk of this rank from the prefetch queue into the pool; False at the end."""
        if self._failure is not None:
            raise self._failure  # keep failing loudly rather than quietly draining the pool
        if self._exhausted:
            return False
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self.source, self.tokenizer, self.split, self._next_chunk,
                                           self.epochs, self.rank, self.world_size,
                                           self.num_threads, self.prefetch_chunks)
        item = self._prefetcher.get()
        if item is _END:
            self._exhausted = True
            return False
        if isinstance(item, _Failure):
            self._failure = item.exc
            raise item.exc  # the original exception object: its traceback points into the thread
        index, arrays = item
        self._next_chunk = index + 1
        for doc in arrays:
            if len(doc) == 0:
                continue
            self.tokens_in += len(doc)
            self.docs_in += 1
            if len(doc) > self.row_len:
                # No row can hold it and rows must start at a document start: keep its first row.
                self.tokens_cropped += len(doc) - self.row_len
                doc = doc[:self.row_len]
            self._pool.add(doc, len(doc))
        return True

    def _fill_row(self, row: np.ndarray) -> int:
        """Best-fit pack one row in place; returns tokens placed (< row length: the source ran dry)."""
        pos, n, pool = 0, self.row_len, self._pool
        while pos < n:
            while len(pool) < self.pool_docs and self._pull_chunk():
                pass
            if not len(pool):
                return pos
            room = n - pos
            doc = pool.take_fitting(room)  # largest that fits; among equal lengths the oldest
            if doc is not None:
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
            else:
                # Nothing fits: crop the shortest document to close the row exactly.
                doc = pool.take_shortest()
                row[pos:] = doc[:room]
                self.tokens_cropped += len(doc) - room
                pos = n
        return pos

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> "PretrainLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        cuda = self.device.type == "cuda"
        # Pinned host memory lets the host->device copy run asynchronously (non_blocking).
        buf = torch.empty((self.batch_size, self.row_len), dtype=torch.int64, pin_memory=cuda)
        rows = buf.numpy()
        for b in range(self.batch_size):
            placed = self._fill_row(rows[b])
            if placed < self.row_len:
                # Finite source ran dry: the incomplete last batch is dropped (and counted).
                self.tokens_dropped += b * self.row_len + placed
                raise StopIteration
        self.batches += 1
        self.tokens_emitted += rows.size
        if self.log_every and self.batches % self.log_every == 0:
            self.log_stats()
        batch = buf.to(self.device, non_blocking=True) if cuda else buf.to(self.device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        """Stop the prefetch thread. The loader's state stays valid (it can resume from it)."""
        self._stop_prefetch()
        self._exhausted = False  # a later next() restarts the thread from the packer's position

    def __enter__(self) -> "PretrainLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_prefetch()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def val_batches(source: TextSource, tokenizer: _Tokenizer, batch_size: int, seq_len: int,
                max_batches: int, rank: int = 0, world_size: int = 1,
                device: torch.device | str = torch.device("cpu"), pool_docs: int = 1000
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, finite set of batches from split "val": one epoch, at most `max_batches`."""
    loader = PretrainLoader(source, tokenizer, batch_size, seq_len, split="val", rank=rank,
                            world_size=world_size, device=device, pool_docs=pool_docs, epochs=1,
                            log_every=0)
    try:
        for _ in range(max_batches):
            try:
                batch = next(loader)
            except StopIteration:
                return
            yield batch
    finally:
        loader.close()


def measure_throughput(loader: PretrainLoader, batches: int, warmup: int = 2) -> float:
    """Tokens per second (inputs only, B*T per batch) over `batches` steady-state batches."""
    for _ in range(warmup):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * loader.batch_size * loader.seq_len / (time.perf_counter() - t0)
