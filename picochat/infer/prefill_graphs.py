"""Prefill of fresh prompts, replayed from CUDA graphs.

Why: an eager prefill forward at d12 is ~300 small launches, several milliseconds of host time on
the decode loop's one thread per admitted request. Meanwhile the GPU waits for those launches (at
concurrency 1 it is most of the time to first token), and with a decode chunk queued ahead the
launches can block, holding the GIL the clients need. A prompt's first chunk (start 0) reads
nothing from the cache, so it can run on a scratch cache of a fixed shape, (rows, T bucket), and
then be copied into its slots: one graph per (rows, T bucket), captured once with the decode
graphs. Groups with more rows, longer chunks or a later chunk of a long prompt run eagerly.

`FreshPrefill` also runs without graphs (`graph=False`): the same scratch-cache forward, eagerly,
which is how the CPU tests check what the graphs replay.
"""

from __future__ import annotations

import torch

from ..model.attention import KVCache
from .runners import capture_graph

ROW_BUCKETS = (1, 2, 4)
MIN_T = 64


class FreshPrefill:
    """Prefill of prompt chunks that start at position 0, through a scratch cache of up to
    `max_rows` x `max_t` tokens (buckets: ROW_BUCKETS rows; MIN_T tokens times 1, 2, 3, 4, 6, 8,
    12, ... up to `max_t`)."""

    def __init__(self, model, cache: KVCache, *, max_t: int, graph: bool, pool=None, max_rows: int = 4):
        c = model.config
        self.model, self.cache, self.graph = model, cache, graph
        self.device = cache.pos.device
        dtype = cache.k[0].dtype
        self.row_buckets = [r for r in ROW_BUCKETS if r <= max_rows]
        # 64, 128, 192, 256, 384, 512, 768, ...: a chunk is padded by at most half (launch-bound at
        # these sizes, a padded token costs little, but a doubled one would)
        self.t_buckets = sorted({min(t, max_t) for p in range(12) for t in (MIN_T << p, 3 * MIN_T << p >> 1)
                                 if t >= MIN_T and (t < max_t or t // 2 < max_t)} | {max_t})
        top_r, top_t = self.row_buckets[-1], self.t_buckets[-1]
        self.scratch = KVCache.allocate(c.n_layer, top_r, c.n_kv_head, top_t, c.head_dim, self.device, dtype)
        self.ids = torch.zeros(top_r, top_t, dtype=torch.long, device=self.device)
        self.last = torch.zeros(top_r, dtype=torch.long, device=self.device)
        self.index = torch.zeros(top_r, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graph:
            for r in self.row_buckets:
                for t in self.t_buckets:
                    graph_, logits = capture_graph(self._body(r, t), lambda: None, self.device, warmup=1, pool=pool)
                    self.graphs[r, t] = (graph_, logits)

    def fits(self, rows: int, tokens: int) -> bool:
        return rows <= self.row_buckets[-1] and tokens <= self.t_buckets[-1]

    def _body(self, r: int, t: int):
        """One forward of the first r scratch rows over t tokens, copied into the slots `index`."""
        s = self.scratch
        view = KVCache([k[:r, :, :t] for k in s.k], [v[:r, :, :t] for v in s.v], s.pos[:r])
        ids, last, index = self.ids[:r, :t], self.last[:r], self.index[:r]

        @torch.no_grad()
        def run() -> torch.Tensor:
            view.pos.zero_()
            logits = self.model(ids, kv_cache=view, logits_at=last)[:, 0]
            for full, part in zip((*self.cache.k, *self.cache.v), (*view.k, *view.v)):
                full[index, :, :t] = part
            return logits

        return run

    def run(self, slots: list[int], chunks: list[list[int]], to_device) -> torch.Tensor:
        """(len(slots), V) logits of each chunk's last token; the chunks' keys/values are in the
        slots' first positions (and right-padding junk after them, as in any padded prefill).
        `to_device(host tensor)` copies without waiting for work in flight."""
        n, longest = len(slots), max(len(c) for c in chunks)
        r = next(b for b in self.row_buckets if b >= n)
        t = next(b for b in self.t_buckets if b >= longest) if self.graph else longest
        ids = torch.zeros(r, t, dtype=torch.long)
        last = torch.zeros(r, dtype=torch.long)
        index = torch.zeros(r, dtype=torch.long)
        for b in range(r):  # rows past n repeat the last one: same slot, same values, a harmless double write
            c = chunks[min(b, n - 1)]
            ids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
            last[b] = len(c) - 1
            index[b] = slots[min(b, n - 1)]
        self.ids[:r, :t].copy_(to_device(ids))
        self.last[:r].copy_(to_device(last))
        self.index[:r].copy_(to_device(index))
        if self.graph:
            graph, logits = self.graphs[r, t]
            graph.replay()
        else:
            logits = self._body(r, t)()
        return logits[:n]
