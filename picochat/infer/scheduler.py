"""Continuous batching: the one decode loop every generating caller submits requests to.

`Scheduler(model, tokenizer, SchedulerConfig(...))` owns a `DecodeBatch` (one persistent KV cache
of `slots` rows x context) and a bounded queue. `submit(prompt_tokens, SamplingParams)` validates
the request (`RequestError` naming the field, `ContextOverflowError` with the token counts,
`QueueFullError` when the queue is at its bound; the checks and the config live in `limits.py`) and
returns a `RequestHandle` whose events stream as the request runs (`request.py`). Each scheduler step:
  1. drops cancelled requests (their slots are free for this very step);
  2. admits queued requests into free slots (n slots for n samples, lowest slots first) and
     prefills prompt chunks under a per-step token budget, so a long prompt does not stall the
     running rows; a finished prompt's cache is copied to its other samples' slots and each sample
     draws its first token independently, on the device (read with the chunk after it: a prefill
     does not make the host wait for the chunk in flight);
  3. launches a chunk of decode steps over the running rows and reads the previous chunk's tokens
     (on CUDA the next chunk is already running while the host reads: rows that stopped or called
     a tool meanwhile ran on and are rewound, which is just resetting their position).
Run it from a background thread (`start()`/`close()`, or `with Scheduler(...)`), or drive it
synchronously with `step()` / `run_until_idle()` (tests, evaluation).

Sampling is per row (temperature, top-k, top-p) with counter-based noise keyed by the request's
seed, the sample and the position, so a seeded request samples the same tokens whatever shares
the batch. Tool calls run on a small thread pool; the row pauses and then has the tool's output
forced in (`sampled=False`). `refresh_weights` copies new weights into the model in place (RL),
keeping the cache and the captured graphs.
"""

from __future__ import annotations

import heapq
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from .batch import DecodeBatch
from .limits import (DEFAULT_MAX_TOKENS, TRITON_MAX_ROWS, ContextOverflowError, SchedulerConfig,  # noqa: F401
                     check_request)
from .modelprep import prepare_model, resolve_dtype, triton_unusable
from .parts import MessageParser, StopMatcher
from .request import DoneEvent, Event, QueueFullError, RequestHandle, SamplingParams
from .rows import RUNNING, Request, Sample
from .sampling import stream_key

log = logging.getLogger("picochat")


class Scheduler:
    """The decode loop over one persistent KV cache; see the module docstring."""

    def __init__(self, model, tokenizer=None, config: SchedulerConfig | None = None, *, tool_runner=None):
        """`tool_runner(expr) -> str` runs a tool call (default: the calculator, `tools.py`)."""
        cfg = self.config = config or SchedulerConfig()
        device = next(model.parameters()).device
        self.device = device
        mode = cfg.mode or ("fast" if device.type == "cuda" else "eager")
        if mode == "fast" and device.type != "cuda":
            log.warning(f"fast decode needs CUDA; using eager on {device.type}")
            mode = "eager"
        if cfg.kernels == "triton" and mode != "fast":
            raise ValueError(f"kernels='triton' needs mode 'fast' (CUDA); mode is {mode!r}")
        self.mode, self.tokenizer = mode, tokenizer
        dtype = resolve_dtype(cfg.dtype, device)
        fuse = cfg.fuse if cfg.fuse is not None else (mode == "fast" and hasattr(model, "fuse_for_inference"))
        self.model, self.fused = prepare_model(model, dtype, fuse), bool(fuse)
        self.dtype = dtype
        self.max_context = cfg.max_context or model.config.seq_len
        # 8 in fast mode: a finished row's slot idles the rest of its chunk and the one launched
        # ahead, so shorter chunks keep more slots busy (H200, d12, c32: 43.3k tok/s vs 39.8k at 16)
        self.sync_every = cfg.sync_every or (8 if mode == "fast" else 1)
        self.pipeline = cfg.pipeline if cfg.pipeline is not None else mode == "fast"
        self.prefill_budget = cfg.prefill_budget or (8192 if device.type == "cuda" else 2048)
        self.kernels = cfg.kernels
        self.triton_unusable = triton_unusable(self.model) if mode == "fast" else "not fast mode"
        if cfg.kernels == "triton" and self.triton_unusable:
            raise ValueError(f"kernels='triton' cannot run here: {self.triton_unusable}")
        slots = cfg.slots or self._slots_from_memory()
        compile_mode = ("default" if cfg.compile is True else cfg.compile) or None
        self.batch = self._build_batch(slots, compile_mode, cfg.window_step or 64)
        self.slots = slots
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps running rows in front
        self._rows: dict[int, Sample] = {}  # slot -> running sample (text, forcing or waiting)
        self._outboxes: list[Request] = []  # requests with events to deliver at the end of the step
        self._firsts: list = []  # (ChunkOut, samples): first tokens sampled on the device, not yet read
        self._prefilling: list[Request] = []
        self._queue: deque[Request] = deque()
        self._inflight = None  # (ChunkOut, {slot: sample}) launched and not yet read
        self._lock = threading.Lock()  # the queue
        self._step_lock = threading.RLock()  # one step at a time; weights refresh between steps
        self._wake = threading.Condition(self._lock)
        self._tool_runner = tool_runner or _run_tool
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._rng = random.Random()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0, "steps": 0, "chunks": 0,
                         "moves": 0,
                         "finished": {"stop": 0, "length": 0, "cancelled": 0}}
        self._special_stops = frozenset(
            tokenizer.special(n) for n in ("<|assistant_end|>", "<|bos|>")) if tokenizer is not None else frozenset()

    # -- construction ----------------------------------------------------------------------------
    def _slots_from_memory(self) -> int:
        if self.device.type != "cuda":
            return 8
        c = self.model.config
        length = self.max_context + 2 * self.sync_every
        per_slot = 2 * c.n_layer * c.n_kv_head * c.head_dim * length * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        n = max(1, min(self.config.max_slots, int(free * self.config.memory_fraction) // per_slot))
        return 1 << (n.bit_length() - 1)  # a power of two: the top bucket is then a full graph bucket

    def _build_batch(self, slots: int, compile_mode, window_step: int) -> DecodeBatch:
        def build(kernels_for) -> DecodeBatch:
            return DecodeBatch(self.model, slots, self.max_context, k_max=self.sync_every, dtype=self.dtype,
                               graph=self.mode == "fast", compile=compile_mode, window_step=window_step,
                               kernels_for=kernels_for, naive=self.mode == "naive",
                               fresh_prefill=self.mode == "fast" if self.config.prefill_graphs is None
                               else self.config.prefill_graphs, chunk_graphs=self.config.chunk_graphs,
                               prefill_tokens=self.prefill_budget, prefill_stream=self.config.prefill_stream)

        try:
            return build(self.kernels_for)
        except Exception as e:
            if self.mode != "fast" or self.kernels != "auto" or self.triton_unusable:
                raise
            # auto: Triton kernels that do not build or run on this GPU cost speed, never the answer
            log.warning(f"Triton decode step failed ({type(e).__name__}: {e}); using the torch step")
            self.triton_unusable = f"failed on this device: {type(e).__name__}"
            torch.cuda.synchronize(self.device)
            return build(self.kernels_for)

    def kernels_for(self, bucket_rows: int) -> str:
        """"triton" or "torch": what a fast-mode bucket of this many rows steps with."""
        if self.mode != "fast":
            return "torch"
        if self.kernels == "auto":
            top = self.config.triton_max_rows or TRITON_MAX_ROWS
            return "torch" if self.triton_unusable or bucket_rows > top else "triton"
        return self.kernels

    # -- submitting ------------------------------------------------------------------------------
    def validate(self, prompt_tokens, params: SamplingParams) -> tuple[list[int], int]:
        """The prompt as ints and the max_tokens it will run with; raises RequestError."""
        return check_request(prompt_tokens, params, self.model.config.vocab_size, self.slots, self.max_context)

    def submit(self, prompt_tokens, params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        params = params or SamplingParams()
        prompt, max_tokens = self.validate(prompt_tokens, params)
        handle = RequestHandle(prompt, params, request_id)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        stops = self._special_stops if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        request = Request(handle, params, max_tokens, stops, [stream_key(seed, i) for i in range(params.n)],
                          self._outboxes)
        with self._lock:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            self._queue.append(request)
            self.counters["requests"] += 1
            self._wake.notify_all()
        return handle

    # -- the loop --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._queue or self._prefilling or self._rows or self._inflight or self._firsts)

    def step(self) -> bool:
        """One scheduling round (see the module docstring). Returns whether work remains."""
        with self._step_lock, torch.no_grad():
            self.counters["steps"] += 1
            self._drop_cancelled()
            if self._inflight is not None and not self._can_run_ahead():
                self._consume(*self._inflight)
                self._inflight = None
            self._resolve_tools()
            self._admit()
            self._prefill()
            if self.config.compact:
                self._compact()
            launched = self._launch()
            if self._inflight is not None:
                self._consume(*self._inflight)
            self._inflight = launched
            if launched is not None and not self.pipeline:
                self._consume(*launched)
                self._inflight = None
            self._take_firsts()  # first tokens no chunk was read after
            self._deliver()
            return self.busy

    def _deliver(self) -> None:
        # Finished requests first: a closed-loop caller sends its next request on the finish, and
        # that request should be queued before the next admission (see _await_followups); woken
        # after every other reader of token events, the caller would wait its turn for the GIL.
        boxes = self._outboxes
        for req in [r for r in boxes if isinstance(r.outbox[-1], DoneEvent)] + \
                [r for r in boxes if not isinstance(r.outbox[-1], DoneEvent)]:
            req.deliver()
        boxes.clear()

    def run_until_idle(self) -> None:
        """Drive the loop on this thread until every submitted request has finished."""
        while self.busy:
            self.advance()

    def advance(self) -> None:
        """One step driven from the caller's thread (no background thread); when every live row
        waits on a tool, wait for one to return instead of spinning."""
        if self._thread is not None:
            raise RuntimeError("the scheduler runs on its background thread; read the handles instead")
        if self.step() and not self._launchable():
            self._wait_for_tools()

    def iter_events(self, handle: RequestHandle) -> Iterator[Event]:
        """`handle`'s events as they come: from the background thread if it runs, else by driving
        the loop here (the chat CLI, scripts)."""
        if self._thread is not None:
            yield from handle.events()
            return
        while True:
            try:
                event = handle._pop()
            except queue.Empty:
                self.advance()
                continue
            yield event
            if isinstance(event, DoneEvent):
                return

    def _launchable(self) -> bool:
        """Whether a step would do anything now (else every live row waits on a tool)."""
        if self._prefilling or self._inflight or self._firsts:
            return True
        if any(s.state != "waiting" for s in self._rows.values()):
            return True
        return bool(self._queue) and len(self._free) >= self._queue[0].params.n

    def _wait_for_tools(self, timeout: float | None = None) -> None:
        pending = [s.tool for s in self._rows.values() if s.state == "waiting" and s.tool is not None]
        if pending:
            wait_futures(pending, timeout=timeout, return_when="FIRST_COMPLETED")

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="picochat-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        if self.device.type == "cuda":  # graphs replay on the current device's stream: make it ours
            torch.cuda.set_device(self.device)
        while True:
            with self._lock:
                while not self._closing and not self.busy:
                    self._wake.wait()
                if self._closing:
                    return
            finished = self._finished()
            try:
                self.step()
            except Exception:  # a failed step must not leave every caller waiting forever
                log.exception("scheduler step failed; cancelling the running requests")
                self._abort_all()
            if not self._launchable():
                self._wait_for_tools(timeout=0.05)
            else:
                self._await_followups(self._finished() - finished)

    def _finished(self) -> int:
        return sum(self.counters["finished"].values())

    def _await_followups(self, finished: int) -> None:
        """After samples finished, while a chunk runs on the device: give their callers a moment
        (up to `followup_wait` seconds) to submit follow-up requests, so those join the next
        chunk. Without it the loop goes straight on to admit with the GIL held and a request sent
        right after a finish (closed-loop clients, evaluation and RL loops) waits a whole extra
        chunk. The wait ends as soon as that many requests are queued; it is idle host time while
        the device works, not device time."""
        if finished <= 0 or self._inflight is None or not self.config.followup_wait:
            return
        with self._lock:
            self._wake.wait_for(lambda: self._closing or len(self._queue) >= finished,
                                timeout=self.config.followup_wait)

    def close(self) -> None:
        """Stop the background thread; requests still queued or running finish as cancelled."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._abort_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _abort_all(self) -> None:
        with self._step_lock:
            with self._lock:
                queued = list(self._queue)
                self._queue.clear()
            for req in queued:
                req.handle.cancel()
            for req in list(self._prefilling):
                req.handle.cancel()
            for sample in list(self._rows.values()):
                sample.request.handle.cancel()
            self._inflight = None
            self._firsts.clear()
            self._drop_cancelled(queued)
            self._deliver()

    # -- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Gauges and counters for metrics: requests running and waiting, slots, tokens, finishes."""
        with self._lock:
            waiting = len(self._queue)
        # snapshots: another thread may be stepping (list() of a dict view runs without a GIL release)
        running = {id(s.request) for s in list(self._rows.values())} | {id(r) for r in list(self._prefilling)}
        c = self.counters
        return {"running": len(running), "waiting": waiting, "slots_used": self.slots - len(self._free),
                "slots_total": self.slots, "prompt_tokens": c["prompt_tokens"],
                "generation_tokens": c["generation_tokens"], "requests": c["requests"], "steps": c["steps"],
                "chunks": c["chunks"], "moves": c["moves"], "finished": dict(c["finished"])}

    # -- weights ---------------------------------------------------------------------------------
    def refresh_weights(self, source) -> None:
        """Copy new weights (a model or a state dict of the same architecture, fused or not) into
        the scheduler's model in place, between steps; the cache and captured graphs stay."""
        from .modelprep import load_weights_in_place

        with self._step_lock:
            load_weights_in_place(self.model, source)
            if self.batch.side is not None:  # a prefill replay on the second stream must not read half-copied weights
                torch.cuda.synchronize(self.device)

    # -- scheduling steps (called under _step_lock) ----------------------------------------------
    def _drop_cancelled(self, queued: list[Request] | None = None) -> None:
        with self._lock:
            gone = [r for r in self._queue if r.cancelled]
            for r in gone:
                self._queue.remove(r)
        for req in gone + (queued or []):
            req.finish_unstarted("cancelled")
            self.counters["finished"]["cancelled"] += req.params.n
        for req in [r for r in self._prefilling if r.cancelled]:
            self._prefilling.remove(req)
            self._release(req.slots)
            req.finish_unstarted("cancelled")
            self.counters["finished"]["cancelled"] += req.params.n
        for sample in [s for s in self._rows.values() if s.request.cancelled]:
            self._end(sample, "cancelled")

    def _release(self, slots: list[int]) -> None:
        for s in slots:
            self._rows.pop(s, None)
            heapq.heappush(self._free, s)

    def _end(self, sample: Sample, reason: str) -> None:
        if self._rows.get(sample.slot) is sample:
            self._release([sample.slot])
        self.counters["finished"][reason] += 1
        sample.finish(reason)

    def _tools(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.config.tool_workers, thread_name_prefix="picochat-tool")
        return self._pool

    def _resolve_tools(self) -> None:
        tok = self.tokenizer
        for sample in self._rows.values():
            if sample.state == "waiting" and sample.tool is not None and sample.tool.done():
                result = sample.tool.result()
                sample.forced = deque([tok.special("<|output_start|>"), *tok.encode(result),
                                       tok.special("<|output_end|>")])
                sample.state, sample.tool, sample.resync = "forcing", None, True

    def _admit(self) -> None:
        settings: list[list] = [[], [], [], [], []]  # slots, temperature, top_k, top_p, keys: one copy each
        with self._lock:
            while self._queue and len(self._free) >= self._queue[0].params.n:
                req = self._queue.popleft()
                req.slots = [heapq.heappop(self._free) for _ in range(req.params.n)]
                self._prefilling.append(req)
                p = req.params
                n = p.n
                for column, values in zip(settings, (req.slots, [float(p.temperature)] * n, [p.top_k or 0] * n,
                                                     [1.0 if p.top_p is None else float(p.top_p)] * n, req.keys)):
                    column += values
        if settings[0]:
            self.batch.set_sampling(*settings)

    def _prefill(self) -> None:
        """Prefill prompt chunks (right-padded into one forward of at most `prefill_budget` padded
        tokens); start the requests whose prompt is then all in the cache."""
        budget = self.prefill_budget
        group: list[tuple[Request, list[int]]] = []
        width = 0  # the padded chunk length of the group
        for req in self._prefilling:
            rest = len(req.prompt) - req.prefilled
            n = len(group) + 1
            if n * max(width, min(rest, budget)) <= budget:  # whole (or budget-sized), widening the group
                take = min(rest, budget)
            elif width and n * width <= budget:  # a chunk as wide as the group, the rest next step
                take = min(rest, width)
            else:
                break
            if any(r.prefilled + max(width, take) > self.batch.length for r, _ in group + [(req, [])]):
                continue  # right-padding would run past the cache: this one waits for the next step
            group.append((req, req.prompt[req.prefilled:req.prefilled + take]))
            width = max(width, take)
        if not group:
            return
        logits = self.batch.prefill([r.slots[0] for r, _ in group], [c for _, c in group],
                                    [r.prefilled for r, _ in group])
        done = []
        for i, (req, chunk) in enumerate(group):
            req.prefilled += len(chunk)
            if req.prefilled == len(req.prompt):
                done.append((req, i))
        if done:
            self._start(done, logits)

    def _start(self, done: list[tuple[Request, int]], logits: torch.Tensor) -> None:
        """Prompts fully in the cache: copy to the other samples' slots, draw every first token."""
        rows, slots, positions = [], [], []
        for req, i in done:
            P = len(req.prompt)
            self.batch.copy_prefix(req.slots[0], req.slots[1:], P)
            self.batch.set_rows(req.slots[1:], [P] * (len(req.slots) - 1), [0] * (len(req.slots) - 1))
            rows += [i] * len(req.slots)
            slots += req.slots
            positions += [P] * len(req.slots)
            self._prefilling.remove(req)
            self.counters["prompt_tokens"] += P
        params = [req.params for req, _ in done]
        top_k_max = max((p.top_k or 0) for p in params)
        any_top_p = any(p.top_p is not None and p.top_p < 1 for p in params)
        lp_k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        firsts = self.batch.first_tokens(logits, rows, slots, positions, top_k_max=top_k_max,
                                         any_top_p=any_top_p, logprobs=lp_k,
                                         sampling=any(p.temperature > 0 for p in params))
        owners = []
        for req, _ in done:
            for index, slot in enumerate(req.slots):
                sample = Sample(req, index, slot, pos=len(req.prompt), since=self.batch._seq + 1,
                                parser=MessageParser(self.tokenizer), stops=StopMatcher(req.params.stop),
                                first_pending=True)
                req.samples.append(sample)
                self._rows[slot] = sample
                owners.append(sample)
        self._firsts.append((firsts, owners))

    def _take_firsts(self) -> None:
        """Hand the first tokens sampled after prefills to their samples (before any chunk's)."""
        for firsts, owners in self._firsts:
            self._take(firsts.ready(), dict(enumerate(owners)), first=True)
        self._firsts.clear()

    def _accept(self, sample: Sample, token: int, lp=None, top=None) -> None:
        req = sample.request
        call = sample.accept(token, lp, top, tools=req.params.tools and self.tokenizer is not None)
        self.counters["generation_tokens"] += 1
        if call is not None:
            sample.tool = self._tools().submit(self._tool_runner, call)
            sample.tool.add_done_callback(lambda _: self._notify())
        if sample.reason is not None:
            self._end(sample, sample.reason)

    def _notify(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _can_run_ahead(self) -> bool:
        """Whether the next chunk may launch before the host reads the one in flight: only when no
        running row needs the host in between (tool output to force in, a rewind pending)."""
        return all(s.state == "text" and not s.resync for s in self._rows.values())

    def _launch(self):
        """Launch the next decode chunk over the running rows (None when there is nothing to run)."""
        running = [s for s in self._rows.values() if s.state in RUNNING]
        # rows already run through the chunk in flight need that many fewer steps: the chunk
        # launched ahead stops where the longest row ends instead of running on into junk
        ahead = self._inflight[0] if self._inflight is not None else None
        ahead_owners = {id(s) for s in self._inflight[1].values()} if ahead is not None else set()  # by any slot

        def left(s: Sample) -> int:
            owned = id(s) in ahead_owners and ahead.seq >= s.since
            return s.request.max_tokens - s.emitted - s.first_pending - (ahead.k if owned else 0)

        k = min(self.sync_every, max((left(s) for s in running), default=0))
        if k <= 0:
            return None
        bucket = self.batch.bucket_for(max(self._rows))
        self._park(bucket, self.batch._seq + 1)
        params = [s.request.params for s in running]
        sampled = [p for p in params if p.temperature > 0]
        chunk = self.batch.launch(
            bucket, k, sampling=bool(sampled), top_k_max=max((p.top_k or 0 for p in sampled), default=0),
            any_top_p=any(p.top_p is not None and p.top_p < 1 for p in sampled),
            forced={s.slot: list(s.forced)[:k] for s in running if s.state == "forcing"} or None,
            logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None))
        self.counters["chunks"] += 1
        return chunk, dict(self._rows)

    def _compact(self) -> None:
        """When the running rows would fit a smaller batch bucket than the slots they hold span,
        move the rows above it into free slots below it: a step over fewer rows is faster (a burst's
        tail, a quiet server). The device copies each moved row's cache, position, next input and
        sampling settings after the chunk in flight, which still hands its tokens to the row by the
        old slot (its owners were fixed at launch). Rows forcing tokens, waiting on a tool or due a
        rewind stay where they are."""
        if not self._rows:
            return
        held = len(self._rows) + sum(len(r.slots) for r in self._prefilling)
        need = self.batch.bucket_for(held - 1)  # the bucket that many slots fill
        top = max(self._rows)
        if top < need or not self._free or self._free[0] >= need:
            return
        src, dst = [], []
        for slot in sorted((s for s in self._rows if s >= need), reverse=True):
            sample = self._rows[slot]
            if sample.state != "text" or sample.resync:
                continue
            if not self._free or self._free[0] >= need:
                break
            to = heapq.heappop(self._free)
            heapq.heappush(self._free, slot)
            del self._rows[slot]
            self._rows[to] = sample
            sample.slot = to
            req = sample.request
            req.slots[req.slots.index(slot)] = to
            src.append(slot)
            dst.append(to)
        if src:
            self.batch.move_rows(src, dst)
            self.counters["moves"] += len(src)

    def _park(self, bucket: int, seq: int) -> None:
        """Before chunk `seq`: reset the device position and input of every slot in the bucket that
        is not simply decoding on: free slots (to 0), prompts being prefilled (to where their next
        chunk goes), rows waiting on a tool or rewound (to their pending token)."""
        fixes = []
        prefilling = {slot: r.prefilled for r in self._prefilling for slot in r.slots}
        for slot in range(bucket):
            sample = self._rows.get(slot)
            if sample is None:
                park = prefilling.get(slot, 0)
                if self.batch.bound[slot] != park:
                    fixes.append((slot, park, 0))
            elif sample.state == "waiting" or sample.resync:
                fixes.append((slot, sample.pos, sample.last))
                sample.resync = False
                sample.since = seq
        if fixes:
            self.batch.set_rows(*map(list, zip(*fixes)))

    def _consume(self, chunk, owners: dict[int, Sample]) -> None:
        """Read a chunk's tokens and hand each to the sample that owned its slot at launch."""
        self._take_firsts()
        self._take(chunk.ready(), owners)

    def _take(self, chunk, owners: dict[int, Sample], first: bool = False) -> None:
        """Accept a read chunk's tokens: `owners` maps its columns to samples (slots for decode
        chunks, positions in the list for first tokens)."""
        if not self.config.take_by_request:
            return self._take_per_step(chunk, owners, first)
        # Request by request: which columns a sample reads is decided once per chunk, not per
        # token; each request's samples take their tokens step by step (the order of its events
        # is that of the per-step loop), other requests' events go to other handles.
        groups: dict[int, list[tuple[int, Sample]]] = {}
        bucket, seq = chunk.bucket, chunk.seq
        for col, sample in owners.items():
            if sample.state not in RUNNING or not first and (col >= bucket or seq < sample.since):
                continue  # stopped (or cancelled), paused or rewound: its tokens here are discarded
            group = groups.get(id(sample.request))
            if group is None:
                groups[id(sample.request)] = [(col, sample)]
            else:
                group.append((col, sample))
        if not groups:
            return
        columns = chunk.tokens.t().tolist()
        logprobs = chunk.logprob is not None
        if logprobs:
            lps = chunk.logprob.t().tolist()
            top_ids = chunk.top_ids.transpose(0, 1).tolist() if chunk.top_ids is not None else None
            top_lp = chunk.top_logprob.transpose(0, 1).tolist() if chunk.top_logprob is not None else None
        tools_on = self.tokenizer is not None
        accepted = 0
        for group in groups.values():
            if len(group) == 1 and group[0][1].plain:  # one sample, tokens without text: the run at once
                col, sample = group[0]
                took = sample.accept_plain(columns[col])
                if first:
                    sample.first_pending = False
                else:
                    sample.pos += took
                accepted += took
                if sample.reason is not None:
                    self._end(sample, sample.reason)
                continue
            params = group[0][1].request.params
            n_top = params.logprobs if logprobs else None
            tools = params.tools and tools_on
            for j in range(chunk.k):
                for col, sample in group:
                    if sample.state not in RUNNING:
                        continue  # stopped or called a tool earlier in this chunk
                    if first:
                        sample.first_pending = False
                    else:
                        sample.pos += 1  # the pending token was fed at sample.pos during step j
                    lp = top = None
                    if n_top is not None:
                        lp = lps[col][j]
                        top = list(zip(top_ids[col][j][:n_top], top_lp[col][j][:n_top])) if n_top else None
                    call = sample.accept(columns[col][j], lp, top, tools=tools)
                    accepted += 1
                    if call is not None:
                        sample.tool = self._tools().submit(self._tool_runner, call)
                        sample.tool.add_done_callback(lambda _: self._notify())
                    if sample.reason is not None:
                        self._end(sample, sample.reason)
        self.counters["generation_tokens"] += accepted

    def _take_per_step(self, chunk, owners: dict[int, Sample], first: bool = False) -> None:
        """`_take` as first written: step by step, every column's checks per token."""
        tokens = chunk.tokens.tolist()
        lps = chunk.logprob.tolist() if chunk.logprob is not None else None
        top_ids = chunk.top_ids.tolist() if chunk.top_ids is not None else None
        top_lp = chunk.top_logprob.tolist() if chunk.top_logprob is not None else None
        for j in range(chunk.k):
            for col, sample in owners.items():
                if sample.state not in RUNNING or not first and (col >= chunk.bucket or chunk.seq < sample.since):
                    continue  # stopped (or cancelled), paused or rewound: its tokens here are discarded
                if first:
                    sample.first_pending = False
                else:
                    sample.pos += 1  # the pending token was fed at sample.pos during step j
                lp = top = None
                n = sample.request.params.logprobs
                if n is not None:
                    lp = lps[j][col]
                    top = list(zip(top_ids[j][col][:n], top_lp[j][col][:n])) if n else None
                # a row that stops or calls a tool here runs on to the chunk's end (and through a
                # chunk already launched): its slot is parked, or it is rewound, before the next one
                self._accept(sample, tokens[j][col], lp, top)


def _run_tool(expr: str) -> str:
    try:  # imported lazily: the scheduler works without the tool module present
        from .tools import run_python_tool

        return run_python_tool(expr)
    except Exception as e:  # the tool promises never to raise; stay safe if it does anyway
        return f"Error: {type(e).__name__}: {e}"
