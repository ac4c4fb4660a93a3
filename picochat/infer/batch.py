"""The decode batch: one persistent KV cache of `slots` rows and what runs on it.

`DecodeBatch` owns the device side of continuous batching: the cache (slots x context, plus a
little slack that rows running past their end during a chunk write into), each slot's next input
id and position, each slot's sampling settings, prefill of prompt chunks into chosen slots, and
chunks of decode steps over the first `bucket` slots (slots are handed out lowest first, so the
running rows sit at the front). A decode step runs through one `CachedRunner` per bucket size whose
cache and inputs are views of the batch's own: eager, or replayed from CUDA graphs (the torch step,
or the Triton step for small buckets). The host reads a chunk's tokens once, after the chunk.

The scheduler (`scheduler.py`) decides which rows run, what is forced into them and when a slot is
parked or reused; this module never looks at requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..model.attention import KVCache
from .runners import CachedRunner, NaiveRunner, bucket_size
from .sampling import sample_rows

log = logging.getLogger("picochat")

MAX_LOGPROBS = 20  # top alternatives a row may ask for (SamplingParams.logprobs)
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


@dataclass
class ChunkOut:
    """A launched chunk: host copies of its tokens (k, bucket) and, when asked, logprobs, filled
    once `ready()` returns (the device may still be running the chunk when this is made)."""

    seq: int
    k: int
    bucket: int
    tokens: torch.Tensor
    logprob: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprob: torch.Tensor | None
    event: object | None

    def ready(self) -> "ChunkOut":
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self


class DecodeBatch:
    def __init__(self, model, slots: int, context: int, *, k_max: int, dtype: torch.dtype, graph: bool = False,
                 compile: str | None = None, window_step: int = 256, kernels_for=lambda bucket: "torch",
                 naive: bool = False, fresh_prefill: bool | None = None, chunk_graphs: bool = True,
                 prefill_tokens: int = 8192, prefill_stream: bool = False):
        """`fresh_prefill`: prompts' first chunks through `FreshPrefill` (None/False: off; True: its
        graphs when `graph`, else the same forward eagerly, as the tests do), buckets of up to
        `prefill_tokens` padded tokens (at most 8192). `prefill_stream`: single replays run on a
        second stream, beside the decode chunk in flight (`PrefillStream`; graphs only)."""
        c = model.config
        self.model, self.slots, self.context, self.k_max = model, slots, context, k_max
        self.device = next(model.parameters()).device
        # a row may run up to two chunks past its last token (it stopped mid-chunk, and the next
        # chunk was already launched): those junk writes land in the slack, never out of bounds
        self.length = context + 2 * k_max
        if self.length > model.rotary_len:
            raise ValueError(f"context {context} + {2 * k_max} slack exceeds the model's {model.rotary_len} positions")
        dev = self.device
        self.naive = naive
        if naive:  # the baseline: no cache, a token buffer, every step a forward over whole prefixes
            self.cache, self.seq = None, torch.zeros(slots, self.length, dtype=torch.long, device=dev)
            self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        else:
            slots_len = self.length + (1 if compile else 0)
            self.cache = KVCache.allocate(c.n_layer, slots, c.n_kv_head, slots_len, c.head_dim, dev, dtype)
            self.pos = self.cache.pos
        self.idx = torch.zeros(slots, 1, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=dev)
        self.keys = torch.zeros(slots, dtype=torch.long, device=dev)
        self.fmask = torch.zeros(k_max, slots, dtype=torch.bool, device=dev)
        self.ftok = torch.zeros(k_max, slots, dtype=torch.long, device=dev)
        self.out = torch.zeros(k_max, slots, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(k_max, slots, dtype=torch.float32, device=dev)
        self.out_top_ids = torch.zeros(k_max, slots, MAX_LOGPROBS, dtype=torch.long, device=dev)
        self.out_top_lp = torch.zeros(k_max, slots, MAX_LOGPROBS, dtype=torch.float32, device=dev)
        self.bound = [0] * slots  # host-side upper bound of each slot's device position
        self.buckets = sorted({min(bucket_size(n), slots) for n in range(1, slots + 1)})
        self.runners: dict[int, CachedRunner] = {}
        self._seq = 0
        # every bucket's graphs share one memory pool: they replay one at a time on one stream and
        # each step's outputs are consumed before the next replay
        pool = torch.cuda.graph_pool_handle() if graph else None
        self._runner_args = dict(dtype=dtype, graph=graph, compile=compile, window_step=window_step,
                                 graph_pool=pool)
        self._kernels_for = kernels_for
        # (bucket, "greedy" | "sample") -> a CUDA graph of k_max whole decode steps (see _capture_chunks)
        self.chunk_graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.whole_chunks = 0  # chunks launched as one graph (stats, tests)
        if graph:  # capture every bucket's graphs now: capturing writes junk into the cache rows
            for b in self.buckets:
                self.runner(b)
                if chunk_graphs:
                    try:
                        self._capture_chunks(b)
                    except Exception as e:  # speed, never the answer: the chunk then steps one by one
                        log.warning(f"capturing whole decode chunks failed ({type(e).__name__}: {e}); "
                                    "stepping one graph per step")
                        self.chunk_graphs = {key: g for key, g in self.chunk_graphs.items() if key[0] != b}
                        torch.cuda.synchronize(self.device)
        self.fresh = None
        if not naive and bool(fresh_prefill):
            from .prefill_graphs import FreshPrefill

            try:
                with sdpa_kernel(PREFILL_ATTENTION):  # captured with the backends prefill runs with
                    self.fresh = FreshPrefill(model, self.cache, max_t=min(2048, context), graph=graph,
                                              pool=torch.cuda.graph_pool_handle() if graph else None,
                                              max_rows=min(32, slots), capacity=min(8192, prefill_tokens))
            except Exception as e:  # speed, never the answer: prompts are then prefilled eagerly
                log.warning(f"capturing the prefill graphs failed ({type(e).__name__}: {e}); prefilling eagerly")
                if graph:
                    torch.cuda.synchronize(self.device)
        self.side = None
        if prefill_stream and self.fresh is not None and self.fresh.graph:
            from .prefill_graphs import PrefillStream

            self.side = PrefillStream(self.device)

    def _capture_chunks(self, bucket: int) -> None:
        """For a Triton bucket (no attention windows: one graph serves every step), capture whole
        chunks: k_max steps, each with its token copied out (and, for "sample", temperature
        sampling with per-row noise, the drawn token fed back), in one graph. The host then
        launches one graph per chunk instead of a replay plus eager copies (and ~30 eager sampling
        kernels) per step. Chunks with top-k/top-p, forced tokens or logprobs step one by one."""
        runner = self.runners[bucket]
        if runner.kernels != "triton" or runner.graph is None:
            return
        from .runners import capture_graph

        def chunk(kind: str):
            def run():
                for j in range(self.k_max):
                    logits, tok = runner._fn(self.model, runner.idx, runner.cache)
                    if kind == "sample":
                        tok = self.sample(logits, slice(0, bucket), top_k_max=0, any_top_p=False, positions=runner.pos)
                        self.idx[:bucket, 0].copy_(tok)
                    self.out[j, :bucket].copy_(tok)
            return run

        for kind in ("greedy", "sample"):
            with torch.no_grad():
                self.chunk_graphs[bucket, kind] = capture_graph(chunk(kind), runner.pos.zero_, self.device, warmup=1,
                                                            pool=self._runner_args["graph_pool"])[0]

    def _dev(self, values, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A small host tensor (or list) on the device. On CUDA through pinned memory without
        blocking: a plain copy from pageable memory would wait for the running chunk first."""
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- runners ---------------------------------------------------------------------------------
    def bucket_for(self, top_slot: int) -> int:
        """The smallest bucket holding slots 0..top_slot."""
        return next(b for b in self.buckets if b > top_slot)

    def runner(self, bucket: int) -> CachedRunner | NaiveRunner:
        runner = self.runners.get(bucket)
        if runner is None and self.naive:
            runner = NaiveRunner(self.model, bucket, self.length, self.k_max, seq=self.seq[:bucket],
                                 pos=self.pos[:bucket], idx=self.idx[:bucket])
            self.runners[bucket] = runner
        elif runner is None:
            view = self.cache.view(rows=bucket)
            runner = CachedRunner(self.model, bucket, self.length, self.k_max, cache=view, idx=self.idx[:bucket],
                                  kernels=self._kernels_for(bucket), **self._runner_args)
            self.runners[bucket] = runner
        return runner

    # -- slot state ------------------------------------------------------------------------------
    def set_rows(self, slots: list[int], pos: list[int], tokens: list[int]) -> None:
        """Set slots' positions and next input ids (rewinds, parking, resumed rows)."""
        if not slots:
            return
        index = self._dev(slots, torch.long)
        self.pos[index] = self._dev(pos, torch.long)
        self.idx[index, 0] = self._dev(tokens, torch.long)
        for s, p in zip(slots, pos):
            self.bound[s] = p

    def set_sampling(self, slots: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
                     keys: list[int]) -> None:
        # two host-to-device copies instead of five (this runs on every admission)
        ints = self._dev(torch.tensor([slots, top_k, keys], dtype=torch.long))
        floats = self._dev(torch.tensor([temperature, top_p], dtype=torch.float32))
        index = ints[0]
        self.temperature[index] = floats[0]
        self.top_k[index] = ints[1]
        self.top_p[index] = floats[1]
        self.keys[index] = ints[2]

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Give slots `dst` the first `length` cached positions of slot `src` (n samples)."""
        if not dst:
            return
        index = self._dev(dst, torch.long)
        if self.naive:
            self.seq[index, :length] = self.seq[src, :length].unsqueeze(0)
            return
        for kv in (*self.cache.k, *self.cache.v):
            kv[index, :, :length] = kv[src, :, :length].unsqueeze(0)

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Give slots `dst` the rows of slots `src` (their cached positions up to each one's bound,
        position, next input and sampling settings), on the device, after the work queued before."""
        s, d = self._dev(src, torch.long), self._dev(dst, torch.long)
        length = min(self.length, max(self.bound[i] for i in src) + 1)
        if self.naive:
            self.seq[d, :length] = self.seq[s, :length]
        else:
            for kv in (*self.cache.k, *self.cache.v):
                kv[d, :, :length] = kv[s, :, :length]  # the gather copies first: src and dst may not overlap anyway
        for t in (self.pos, self.idx, self.temperature, self.top_k, self.top_p, self.keys):
            t[d] = t[s]
        for i, j in zip(src, dst):
            self.bound[j] = self.bound[i]

    # -- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed each slot its chunk of prompt at positions start.. (right-padded into one forward;
        every start + longest chunk must fit in `length`). Returns (len(slots), V) logits of each
        chunk's last token; leaves each slot's position after its chunk."""
        lens = [len(c) for c in chunks]
        ends = [s + n for s, n in zip(starts, lens)]
        # Every prefill has a new (rows, chunk, window) shape. torch 2.11 sends masked attention to
        # cuDNN first on Hopper, and cuDNN builds an execution plan per new shape (tens of ms on an
        # H200 at d12: it was most of TTFT and the stalls of continuous batching). Flash cannot
        # take the mask; the memory-efficient kernel needs no plan. The backend switch is
        # process-wide while this forward runs; it only takes cuDNN out of the order.
        with sdpa_kernel(PREFILL_ATTENTION):
            if self.fresh is not None and not any(starts) and self.fresh.fits(len(slots), max(lens)):
                if self.side is not None:
                    logits = self.side.run(lambda: self.fresh.run(slots, chunks, self._dev), slots,
                                           self.fresh.padded(len(slots), max(lens)))
                else:
                    logits = self.fresh.run(slots, chunks, self._dev)
            elif self.fresh is not None and 0 in starts:
                logits = self._prefill_split(slots, chunks, starts)
            elif self.naive:
                logits = self._prefill_naive(slots, chunks, starts, ends)
            else:
                logits = self._prefill_cached(slots, chunks, starts)
        if self.side is not None:
            self.side.mark()  # graphs replayed here on the main stream (a split group) come before the next replay
        self.set_rows(slots, ends, [0] * len(slots))
        return logits

    def _prefill_split(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """A group no one prefill graph holds (too many rows or tokens, or later chunks of long
        prompts among first ones): first chunks in as few graph replays as fit, the rest in one
        eager forward. Each replay's logits are copied out before the next replay (graphs of one
        pool may reuse each other's memory)."""
        fresh = [i for i, s in enumerate(starts) if s == 0]
        groups, long = self.fresh.plan([len(chunks[i]) for i in fresh])
        parts, order = [], []
        for group in groups:
            rows = [fresh[g] for g in group]
            parts.append(self.fresh.run([slots[i] for i in rows], [chunks[i] for i in rows], self._dev).clone())
            order += rows
        rest = [i for i, s in enumerate(starts) if s != 0] + [fresh[g] for g in long]
        if rest:
            parts.append(self._prefill_cached([slots[i] for i in rest], [chunks[i] for i in rest],
                                              [starts[i] for i in rest]))
            order += rest
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if order == list(range(len(slots))):
            return logits
        inverse = sorted(range(len(order)), key=order.__getitem__)  # row i of the result is logits[inverse[i]]
        return logits.index_select(0, self._dev(inverse, torch.long))

    def _prefill_cached(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        B, T = len(slots), max(len(c) for c in chunks)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, c in enumerate(chunks):
            ids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        ids = self._dev(ids)
        last = self._dev([len(c) - 1 for c in chunks], torch.long)
        start_t = self._dev(starts, torch.long)
        window = min(self.length, -(-max(s + T for s in starts) // 64) * 64)  # the slots this forward reads
        lo = min(slots)
        if slots == list(range(lo, lo + B)):  # contiguous: write straight into the cache
            view = KVCache([k[lo:lo + B, :, :window] for k in self.cache.k],
                           [v[lo:lo + B, :, :window] for v in self.cache.v], self.pos[lo:lo + B])
            view.pos.copy_(start_t)
            return self.model(ids, kv_cache=view, logits_at=last)[:, 0]
        # scattered slots: gather their rows, run, scatter them back
        index = self._dev(slots, torch.long)
        view = KVCache([k[index, :, :window] for k in self.cache.k], [v[index, :, :window] for v in self.cache.v],
                       start_t)
        logits = self.model(ids, kv_cache=view, logits_at=last)[:, 0]
        for full, part in zip((*self.cache.k, *self.cache.v), (*view.k, *view.v)):
            full[index, :, :window] = part
        return logits

    def _prefill_naive(self, slots: list[int], chunks: list[list[int]], starts: list[int],
                       ends: list[int]) -> torch.Tensor:
        for slot, start, c in zip(slots, starts, chunks):
            self.seq[slot, start:start + len(c)] = self._dev(c, torch.long)
        index = self._dev(slots, torch.long)
        last = self._dev([e - 1 for e in ends], torch.long)
        return self.model(self.seq[index, :max(ends)], logits_at=last)[:, 0]

    # -- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, logits: torch.Tensor, slots: torch.Tensor | slice, *, top_k_max: int, any_top_p: bool,
               positions: torch.Tensor) -> torch.Tensor:
        return sample_rows(logits, self.temperature[slots], self.top_k[slots], self.top_p[slots], self.keys[slots],
                           positions, top_k_max=top_k_max, any_top_p=any_top_p)

    @torch.no_grad()
    def launch(self, bucket: int, k: int, *, sampling: bool, top_k_max: int = 0, any_top_p: bool = False,
               forced: dict[int, list[int]] | None = None, logprobs: int | None = None) -> ChunkOut:
        """Run k decode steps over slots 0..bucket-1 and start copying their tokens to the host.
        `forced`: slot -> tokens fed in place of the sampled ones for the chunk's first steps;
        `logprobs`: None, or how many top alternatives to record (0: the chosen token's only)."""
        runner = self.runner(bucket)
        runner.hi = max(self.bound[:bucket])
        starts = self.bound[:bucket]  # each row's position as the chunk starts (exact: every row steps)
        if self.side is not None:
            self.side.mark()  # replays after this chunk's launch wait for what came before it, not for it
        if forced:
            fmask = torch.zeros(k, bucket, dtype=torch.bool)
            ftok = torch.zeros(k, bucket, dtype=torch.long)
            for s, toks in forced.items():
                toks = toks[:k]
                fmask[:len(toks), s] = True
                ftok[:len(toks), s] = torch.tensor(toks, dtype=torch.long)
            self.fmask[:k, :bucket].copy_(self._dev(fmask))
            self.ftok[:k, :bucket].copy_(self._dev(ftok))
        rows = slice(0, bucket)
        kind = ("sample" if top_k_max == 0 and not any_top_p else None) if sampling else "greedy"
        whole = self.chunk_graphs.get((bucket, kind)) if k == self.k_max and not forced and logprobs is None else None
        if whole is not None:
            whole.replay()
            self.whole_chunks += 1
            runner.hi = min(runner.hi + k, runner.max_len - 1)
        for j in range(0 if whole is not None else k):
            logits, tok = runner.step()  # tok: greedy, already the next step's input
            if sampling:
                tok = self.sample(logits, rows, top_k_max=top_k_max, any_top_p=any_top_p, positions=runner.pos)
            if forced:
                tok = torch.where(self.fmask[j, :bucket], self.ftok[j, :bucket], tok)
            if sampling or forced:
                self.idx[:bucket, 0].copy_(tok)
            self.out[j, :bucket].copy_(tok)
            if logprobs is not None:
                self._record_logprobs(j, bucket, logits, tok, logprobs)
        cap = self.length - 1
        self.bound[:bucket] = [min(b + k, cap) for b in self.bound[:bucket]]
        self._seq += 1
        out = self._read(self._seq, k, bucket, logprobs)
        if self.side is not None:
            self.side.launched(starts, out.event)
        return out

    def _record_logprobs(self, j: int, bucket: int, logits: torch.Tensor, tok: torch.Tensor, top: int) -> None:
        lp = logits.float().log_softmax(dim=-1)
        self.out_lp[j, :bucket] = lp.gather(1, tok[:, None])[:, 0]
        if top > 0:
            values, ids = lp.topk(top, dim=-1)
            self.out_top_lp[j, :bucket, :top] = values
            self.out_top_ids[j, :bucket, :top] = ids

    def _read(self, seq: int, k: int, bucket: int, logprobs: int | None) -> ChunkOut:
        top = logprobs is not None and logprobs > 0
        return self._to_host(seq, self.out[:k, :bucket],
                             self.out_lp[:k, :bucket] if logprobs is not None else None,
                             self.out_top_ids[:k, :bucket, :logprobs] if top else None,
                             self.out_top_lp[:k, :bucket, :logprobs] if top else None)

    def _to_host(self, seq: int, tokens: torch.Tensor, lp: torch.Tensor | None, top_ids: torch.Tensor | None,
                 top_lp: torch.Tensor | None) -> ChunkOut:
        """Start copying (k, rows) results to the host; on CUDA into pinned memory, without waiting."""
        cuda = self.device.type == "cuda"

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not cuda:
                return None if t is None else t.clone()
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host

        event = None
        out = ChunkOut(seq, tokens.size(0), tokens.size(1), copy(tokens), copy(lp), copy(top_ids), copy(top_lp),
                       event)
        if cuda:
            out.event = torch.cuda.Event()
            out.event.record()
        return out

    @torch.no_grad()
    def first_tokens(self, logits: torch.Tensor, rows: list[int], slots: list[int], positions: list[int], *,
                     top_k_max: int, any_top_p: bool, logprobs: int | None, sampling: bool = True) -> ChunkOut:
        """Sample each slot's first token from its prompt's logits (`logits[rows[i]]` for slot i)
        and make it the slot's next input, on the device; the tokens (and logprobs) come back as a
        one-step ChunkOut, read later like a chunk (no wait here, so the next chunk launches first)."""
        logits = logits.index_select(0, self._dev(rows, torch.long))
        index = self._dev(slots, torch.long)
        pos = self._dev(positions, torch.long)
        if sampling:
            tok = self.sample(logits, index, top_k_max=top_k_max, any_top_p=any_top_p, positions=pos)
        else:  # every row greedy: one kernel instead of the sampler's ~40
            tok = logits.argmax(dim=-1)
        self.idx[index, 0] = tok
        lp = top_lp = top_ids = None
        if logprobs is not None:
            full = logits.float().log_softmax(dim=-1)
            lp = full.gather(1, tok[:, None])[:, 0]
            if logprobs > 0:
                top_lp, top_ids = full.topk(logprobs, dim=-1)
                top_lp, top_ids = top_lp[None], top_ids[None]
            lp = lp[None]
        out = self._to_host(-1, tok[None], lp, top_ids, top_lp)
        if self.side is not None:
            self.side.mark()  # a replay's logits are read: the next replay may overwrite them
        return out
