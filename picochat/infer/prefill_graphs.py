"""Prefill of fresh prompts, replayed from CUDA graphs.

Why: an eager prefill forward at d12 is ~300 small launches, several milliseconds of host time on
the decode loop's one thread per admitted request. Meanwhile the GPU waits for those launches (at
concurrency 1 it is most of the time to first token), and with a decode chunk queued ahead the
launches can block, holding the GIL the clients need. A prompt's first chunk (start 0) reads
nothing from the cache, so its forward has a fixed shape, (rows, T bucket), whatever the slots:
one graph per bucket, captured once with the decode graphs, the slots given in a device tensor.
Chunks longer than every bucket and later chunks of long prompts run eagerly.

A first chunk attends to nothing but itself, so its forward needs neither the cache's rows nor a
(tokens x cache) mask: each layer's keys and values go straight into the slots' rows (positions
0..t-1) and attention is plain causal attention over the chunk (`SlotWriter`; flash attention on
CUDA in bf16), where the cached prefill runs masked attention over a cache window.

`FreshPrefill` also runs without graphs (`graph=False`): the same forward, eagerly, which is how the
CPU tests check what the graphs replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.attention import KVCache
from .runners import capture_graph

MIN_T = 64


class SlotWriter(KVCache):
    """The cache a first chunk's forward runs on: `write` puts a layer's keys/values into the
    scheduler's cache rows `index` at positions 0..t-1 (the chunk is t tokens), `attend` is causal
    attention over those same keys/values (kept from `write`), and no mask is built. Positions
    (`pos`, zero before the forward) only place the rotary phases."""

    def __init__(self, full: KVCache, index: torch.Tensor, t: int, pos: torch.Tensor):
        super().__init__(full.k, full.v, pos)
        self.index, self.t = index, t
        self._new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        # attend reads what the cache holds: values rounded to its dtype, as the cached prefill does
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        self.k[layer][self.index, :, :self.t] = k
        self.v[layer][self.index, :, :self.t] = v
        self._new[layer] = (k, v)

    def mask(self, positions: torch.Tensor) -> None:
        return None

    def attend(self, layer: int, q: torch.Tensor, mask) -> torch.Tensor:
        k, v = self._new.pop(layer)
        k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


class FreshPrefill:
    """Prefill of prompt chunks that start at position 0 (`SlotWriter`): buckets of 1, 2, 4, ...
    `max_rows` rows times 64, 96, 128, 192, 256, 384, ... `max_t` tokens (a chunk is padded by at
    most half; launch-bound at these sizes, a padded token costs little), every bucket with
    rows x tokens <= capacity (which bounds the activations a replay needs)."""

    def __init__(self, model, cache: KVCache, *, max_t: int, graph: bool, pool=None, max_rows: int = 32,
                 capacity: int = 8192):
        self.model, self.cache, self.graph = model, cache, graph
        self.device = cache.pos.device
        self.t_buckets = sorted({min(t, max_t) for p in range(12) for t in (MIN_T << p, 3 * MIN_T << p >> 1)
                                 if t < max_t or t // 2 < max_t} | {max_t})
        self.capacity = capacity = max(capacity, max_t)
        self.row_buckets = [1 << i for i in range(max_rows.bit_length())
                            if (1 << i) <= max_rows and (1 << i) * self.t_buckets[0] <= capacity]
        self.buckets = [(r, t) for r in self.row_buckets for t in self.t_buckets if r * t <= capacity]
        self._pos = torch.zeros(self.row_buckets[-1], dtype=torch.long, device=self.device)
        self._ids = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.last = torch.zeros(self.row_buckets[-1], dtype=torch.long, device=self.device)
        self.index = torch.zeros(self.row_buckets[-1], dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.runs = self.rows_run = 0  # forwards run and prompts they carried (stats, tests)
        if graph:
            for r, t in self.buckets:
                graph_, logits = capture_graph(self._body(r, t), lambda: None, self.device, warmup=1, pool=pool)
                self.graphs[r, t] = (graph_, logits)

    def fits(self, rows: int, tokens: int) -> bool:
        return self._bucket(rows, tokens) is not None

    def padded(self, rows: int, tokens: int) -> int:
        """The tokens a replay for these chunks writes per row (its bucket's length)."""
        return self._bucket(rows, tokens)[1]

    def plan(self, lengths: list[int]) -> tuple[list[list[int]], list[int]]:
        """Split chunks of these lengths into as few bucket-sized groups as greedily fit: (groups of
        indices, one replay each; indices of chunks longer than every bucket, left to the caller).
        Longest first, so each group's bucket is set by its first chunk and filled with shorter ones."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        rest = [i for i in order if not self.fits(1, lengths[i])]
        order = [i for i in order if self.fits(1, lengths[i])]
        groups = []
        while order:
            t = self._bucket(1, lengths[order[0]])[1]
            rows = max(r for r, t_ in self.buckets if t_ == t)
            groups.append(order[:rows])
            order = order[rows:]
        return groups, rest

    def _bucket(self, rows: int, tokens: int) -> tuple[int, int] | None:
        return next(((r, t) for r, t in self.buckets if r >= rows and t >= tokens), None)

    def _ids_view(self, r: int, t: int) -> torch.Tensor:
        return self._ids[:r * t].view(r, t)

    def _body(self, r: int, t: int):
        """One forward of r chunks of t tokens, written into the slots `index`."""
        view = SlotWriter(self.cache, self.index[:r], t, self._pos[:r])
        ids, last = self._ids_view(r, t), self.last[:r]

        @torch.no_grad()
        def run() -> torch.Tensor:
            view.pos.zero_()
            return self.model(ids, kv_cache=view, logits_at=last)[:, 0]

        return run

    def run(self, slots: list[int], chunks: list[list[int]], to_device) -> torch.Tensor:
        """(len(slots), V) logits of each chunk's last token; the chunks' keys/values are in the
        slots' first positions (and right-padding junk after them, as in any padded prefill).
        `to_device(host tensor)` copies without waiting for work in flight."""
        n, longest = len(slots), max(len(c) for c in chunks)
        self.runs, self.rows_run = self.runs + 1, self.rows_run + n
        r, t = self._bucket(n, longest)
        if not self.graph:  # eagerly, any shape that fits will do
            r, t = n, longest
        ids = torch.zeros(r, t, dtype=torch.long)
        last = torch.zeros(r, dtype=torch.long)
        index = torch.zeros(r, dtype=torch.long)
        for b in range(r):  # rows past n repeat the last one: same slot, same values, a harmless double write
            c = chunks[min(b, n - 1)]
            ids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
            last[b] = len(c) - 1
            index[b] = slots[min(b, n - 1)]
        self._ids_view(r, t).copy_(to_device(ids))
        self.last[:r].copy_(to_device(last))
        self.index[:r].copy_(to_device(index))
        if self.graph:
            graph, logits = self.graphs[r, t]
            graph.replay()
        else:
            logits = self._body(r, t)()
        return logits[:n]


class PrefillStream:
    """First-chunk replays on a second CUDA stream, overlapping the decode chunk in flight (the
    decode step at 32 rows leaves SMs idle; a 256-token prefill is ~1 ms of mostly small kernels).

    Ordering, all on the device: a replay starts after `mark` (recorded on the main stream before
    each chunk launch and after each read of a replay's logits), so after every slot move, rewind
    and read the main stream queued before the chunk in flight, but not after that chunk; the main
    stream waits for the replay before anything it queues next (first tokens, the next chunk).
    The chunk in flight keeps running rows that are free or dead (parked, or stopped in the chunk
    before) and writes junk at their positions: a replay into such a slot at positions that junk
    may reach waits for that chunk instead (`conflicts`)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.mark_event: torch.cuda.Event | None = None
        self.chunk_done: torch.cuda.Event | None = None  # the chunk in flight's completion
        self.chunk_starts: list[int] = []  # each row's position when that chunk was launched
        self.overlapped = self.waited = 0  # replays run beside the chunk / after it (stats, tests)

    def mark(self) -> None:
        self.mark_event = torch.cuda.Event()
        self.mark_event.record()

    def launched(self, starts: list[int], done: torch.cuda.Event | None) -> None:
        self.chunk_starts, self.chunk_done = list(starts), done

    def conflicts(self, slots: list[int], tokens: int) -> bool:
        """Whether the chunk in flight may write where a replay of `tokens` padded tokens writes."""
        starts = self.chunk_starts
        return any(s < len(starts) and starts[s] < tokens for s in slots)

    def run(self, replay, slots: list[int], tokens: int) -> torch.Tensor:
        main = torch.cuda.current_stream()
        if self.mark_event is not None:
            self.stream.wait_event(self.mark_event)
        wait = self.chunk_done is not None and self.conflicts(slots, tokens)
        if wait:
            self.stream.wait_event(self.chunk_done)
        self.waited, self.overlapped = self.waited + wait, self.overlapped + (not wait)
        with torch.cuda.stream(self.stream):
            logits = replay()
            done = torch.cuda.Event()
            done.record(self.stream)
        main.wait_event(done)
        return logits
