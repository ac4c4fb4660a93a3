"""Conversation data for midtraining and SFT: task mixtures and fixed-shape packed batches.

`TaskMixture` turns several tasks into one deterministic stream of conversations: each epoch is a
seeded shuffle of (task, index) pairs, a task's weight says how many times its items appear per
epoch (2.0 = every item twice, 0.5 = a fresh random half each epoch), and rank r of W takes global
positions r, r+W, r+2W, ... (disjoint; the epoch is cut to a multiple of W so ranks stay in step).
Its position (epoch, pos) is the whole state: resume is exact.

`SFTBatcher` renders conversations with the tokenizer (ids + loss mask) and yields batches of a
fixed shape (B, T), so a compiled model never sees a new shape:
  - "packed": each row holds T+1 tokens filled by best-fit packing of *whole* conversations (each
    starts with <|bos|>), from a buffer of pending conversations; the row tail is padding. The row is
    then shifted: inputs = row[:-1], targets = row[1:].
  - "padded": the seed's baseline, one conversation per row padded to T+1 (benchmarks only).
A conversation longer than T+1 tokens is cut to T+1 with a logged, counted warning.

Batch fields (CPU tensors moved to `device`):
  inputs   (B, T) long  token ids (padding = the bos id)
  targets  (B, T) long  ids[t+1] where mask[t+1] == 1, else -1 (user text, tool output, padding,
                        and the <|bos|> that starts the next conversation are never targets)
  doc_ids  (B, T) long  0, 1, 2, ... = which conversation of the row a position belongs to; -1 on
                        padding. Attention must stay within equal doc ids (document masking); the
                        padding forms its own block, so real tokens never attend to it.
  n_loss_tokens, n_real_tokens  ints: targets != -1, and non-padding input positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from picochat.common import log

from .packing import BestFitPool
from .tasks.base import Conversation, Task

IGNORE = -1  # target value for positions without loss
PAD_DOC = -1  # doc id of padding positions
_WARN_FIRST = 5  # truncation warnings logged one by one before switching to periodic summaries


# ---------------------------------------------------------------------------------------------------
# task mixture


class TaskMixture:
    """A deterministic, shardable, resumable stream of conversations from several tasks.

    `epochs=None` streams forever. Iterating continues from the current position; `state_dict()` taken
    after receiving item k resumes at item k+1."""

    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None, seed: int = 0,
                 epochs: int | None = 1, rank: int = 0, world_size: int = 1):
        if not tasks:
            raise ValueError("a mixture needs at least one task")
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(tasks) or any(w < 0 for w in weights):
            raise ValueError("weights must be one non-negative number per task")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.tasks = list(tasks)
        self.weights = weights
        self.seed = int(seed)
        self.epochs = epochs
        self.rank, self.world_size = rank, world_size
        self.sizes = [len(t) for t in self.tasks]
        self.epoch_size = sum(self._copies(n, w) for n, w in zip(self.sizes, weights))
        self.per_rank = self.epoch_size // world_size  # items each rank sees per epoch
        if self.per_rank == 0:
            raise ValueError(f"mixture of {self.epoch_size} items per epoch is too small for {world_size} ranks")
        self.epoch, self.pos = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @staticmethod
    def _copies(n: int, w: float) -> int:
        return int(w) * n + int(round((w - int(w)) * n))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(epoch_size, 2) array of (task, index), the same for every rank."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks = []
        for t, (n, w) in enumerate(zip(self.sizes, self.weights)):
            idx = [np.tile(np.arange(n), int(w))]
            extra = int(round((w - int(w)) * n))
            if extra:  # the fractional part: a different random subset each epoch
                idx.append(np.sort(rng.choice(n, size=extra, replace=False)))
            idx = np.concatenate(idx)
            chunks.append(np.stack([np.full(len(idx), t), idx], axis=1))
        order = np.concatenate(chunks).astype(np.int64)
        order = order[rng.permutation(len(order))]
        self._order_cache = (epoch, order)
        return order

    def __len__(self) -> int:
        """Items this rank yields in all epochs (from the start, not from the current position)."""
        if self.epochs is None:
            raise TypeError("an endless mixture (epochs=None) has no length")
        return self.per_rank * self.epochs

    @property
    def exhausted(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def __iter__(self) -> Iterator[Conversation]:
        while not self.exhausted:
            if self.pos >= self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            t, i = self.epoch_order(self.epoch)[self.rank + self.pos * self.world_size]
            self.pos += 1  # advance before yielding: a state taken now resumes after this item
            yield self.tasks[int(t)][int(i)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "sizes": list(self.sizes), "weights": list(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "rank", "world_size", "sizes", "weights"):
            if _plain(state[key]) != _plain(getattr(self, key)):
                raise ValueError(f"mixture state was saved with {key}={state[key]!r}, "
                                 f"this mixture has {getattr(self, key)!r}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------------------------------------------
# batches


class SFTBatcher:
    """Fixed-shape (B, T) batches of rendered conversations; see the module docstring.

    `buffer_size`: conversations kept pending for best-fit packing (more = less padding)."""

    def __init__(self, mixture: TaskMixture, tokenizer, batch_size: int, seq_len: int, mode: str = "packed",
                 device: str | torch.device = "cpu", buffer_size: int | None = None):
        if mode not in ("packed", "padded"):
            raise ValueError(f"mode must be 'packed' or 'padded', got {mode!r}")
        self.mixture, self.tokenizer = mixture, tokenizer
        self.B, self.T, self.mode = int(batch_size), int(seq_len), mode
        self.capacity = self.T + 1  # tokens per row before the shift into inputs/targets
        self.device = torch.device(device)
        self.pad_id = tokenizer.bos_id
        self.buffer_size = buffer_size or max(64, 8 * self.B)
        self._reset_buffer()
        self._counts = {"batches": 0, "rows": 0, "conversations": 0, "slots": 0, "real_tokens": 0,
                        "loss_tokens": 0, "truncated": 0, "truncated_tokens": 0}
        self._source: Iterator[Conversation] | None = None

    def _reset_buffer(self) -> None:
        self._pool = BestFitPool()  # pending conversations (ids, mask) for best-fit packing

    # -- filling the buffer ---------------------------------------------------------------------------
    def _render(self, conv: Conversation) -> tuple[list[int], list[int]]:
        ids, mask = self.tokenizer.render_conversation(conv)
        if len(ids) > self.capacity:
            c = self._counts
            c["truncated"] += 1
            c["truncated_tokens"] += len(ids) - self.capacity
            if c["truncated"] <= _WARN_FIRST or c["truncated"] % 1000 == 0:
                log.warning(f"SFT data: conversation of {len(ids)} tokens truncated to {self.capacity} "
                            f"({c['truncated']} truncated so far)")
            ids, mask = ids[:self.capacity], mask[:self.capacity]
        return ids, mask

    def _pull(self) -> bool:
        """Render one more conversation into the buffer; False when the mixture is exhausted."""
        if self._source is None:
            self._source = iter(self.mixture)
        conv = next(self._source, None)
        if conv is None:
            return False
        ids, mask = self._render(conv)
        self._pool.add((ids, mask), len(ids))
        return True

    def _take(self, max_len: int) -> tuple[list[int], list[int]] | None:
        """The longest pending conversation of at most `max_len` tokens (earliest among equals), or None."""
        return self._pool.take_fitting(max_len)

    # -- rows and batches --------------------------------------------------------------------------------
    def _row(self) -> list[tuple[list[int], list[int]]] | None:
        """The conversations of the next row, or None when no data is left."""
        want = self.buffer_size if self.mode == "packed" else 1
        while len(self._pool) < want and self._pull():
            pass
        if not len(self._pool):
            return None
        if self.mode == "padded":
            return [self._take(self.capacity)]
        docs, room = [], self.capacity
        while (doc := self._take(room)) is not None:
            docs.append(doc)
            room -= len(doc[0])
        return docs

    def next_batch(self) -> dict[str, Any] | None:
        """The next batch, or None when the mixture and the buffer are exhausted. A final partial
        batch is completed with all-padding rows (no loss) so the shape never changes."""
        C = self.capacity
        ids = np.full((self.B, C), self.pad_id, dtype=np.int64)
        mask = np.zeros((self.B, C), dtype=np.int64)
        doc = np.full((self.B, C), PAD_DOC, dtype=np.int64)
        n_rows = n_convs = 0
        for b in range(self.B):
            row = self._row()
            if row is None:
                break
            n_rows += 1
            pos = 0
            for d, (row_ids, row_mask) in enumerate(row):
                n = len(row_ids)
                ids[b, pos:pos + n], mask[b, pos:pos + n], doc[b, pos:pos + n] = row_ids, row_mask, d
                pos += n
            n_convs += len(row)
        if n_rows == 0:
            return None
        targets = np.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE)
        doc_ids = doc[:, :-1]
        n_loss, n_real = int((targets != IGNORE).sum()), int((doc_ids != PAD_DOC).sum())
        c = self._counts
        c["batches"] += 1
        c["rows"] += self.B
        c["conversations"] += n_convs
        c["slots"] += self.B * self.T
        c["real_tokens"] += n_real
        c["loss_tokens"] += n_loss
        return {"inputs": self._to_device(ids[:, :-1]), "targets": self._to_device(targets),
                "doc_ids": self._to_device(doc_ids), "n_loss_tokens": n_loss, "n_real_tokens": n_real}

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":  # pinned + async copy overlaps with the running step
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (batch := self.next_batch()) is not None:
            yield batch

    # -- bookkeeping -------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, float | int]:
        """Counts so far, plus padding_frac (non-real share of input slots) and loss_frac."""
        c = dict(self._counts)
        slots = max(1, c["slots"])
        c["padding_frac"] = 1.0 - c["real_tokens"] / slots if c["slots"] else 0.0
        c["loss_frac"] = c["loss_tokens"] / slots
        return c

    def state_dict(self) -> dict[str, Any]:
        pending = [(seq, ids, mask) for seq, _, (ids, mask) in self._pool.pending()]
        return {"mixture": self.mixture.state_dict(), "pending": pending, "next_seq": self._pool.next_seq,
                "counts": dict(self._counts), "mode": self.mode, "shape": [self.B, self.T],
                "buffer_size": self.buffer_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode or list(state["shape"]) != [self.B, self.T]:
            raise ValueError(f"batcher state is for mode={state['mode']} shape={state['shape']}, "
                             f"this batcher is mode={self.mode} shape={[self.B, self.T]}")
        self.mixture.load_state_dict(state["mixture"])
        self._source = None  # a fresh iterator starts at the restored mixture position
        self._reset_buffer()
        for seq, ids, mask in state["pending"]:
            self._pool.add((list(ids), list(mask)), len(ids), seq=int(seq))
        self._pool.next_seq = int(state["next_seq"])
        self.buffer_size = int(state.get("buffer_size", self.buffer_size))
        self._counts.update(state["counts"])


# ---------------------------------------------------------------------------------------------------
# the offline demo mixture

# share of each synthetic task in the demo mixture
SYNTHETIC_SHARES: dict[str, float] = {"spelling": 0.2, "letter_count": 0.2, "arithmetic": 0.25,
                                      "identity": 0.1, "facts": 0.25}


def synthetic_tasks(split: str = "train", seed: int = 0, size: int = 2000) -> list[Task]:
    """The five synthetic tasks, `size` conversations in all, split by SYNTHETIC_SHARES."""
    from .tasks.synthetic import SYNTHETIC_TASKS

    return [SYNTHETIC_TASKS[name](split=split, size=max(1, round(size * share)), seed=seed)
            for name, share in SYNTHETIC_SHARES.items()]


def synthetic_mixture(split: str = "train", seed: int = 0, size: int = 2000, epochs: int | None = 1,
                      rank: int = 0, world_size: int = 1) -> TaskMixture:
    """The default offline demo mixture (about `size` conversations per epoch)."""
    return TaskMixture(synthetic_tasks(split, seed, size), seed=seed, epochs=epochs, rank=rank,
                       world_size=world_size)
