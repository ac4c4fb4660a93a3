"""Answering a generation request: submit jobs to the scheduler and turn their events into OpenAI
responses, streamed (SSE chunks) or whole, recording metrics on the way.

The scheduler pushes events from its own thread; each handler reads them in batches (every event
that arrived since it last looked), so one network chunk carries all the tokens of one wake-up.
A stream whose client goes away is cancelled in its `finally` (Starlette cancels the body iterator
on disconnect); a non-streamed request watches for the disconnect itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..infer.request import DoneEvent, FinishEvent, QueueFullError, RequestError, RequestHandle, TokenEvent
from . import responses as R
from .metrics import RequestObserver, ServerMetrics
from .protocol import APIError, Job, bad_request
from .scoring import prompt_logprobs

log = logging.getLogger("picochat.serve")


@dataclass
class Backend:
    """The loaded model: the scheduler that decodes for it, its tokenizer, and the model itself
    (for prompt log-probabilities)."""

    scheduler: Any  # infer.scheduler.Scheduler: submit(), stats()
    tokenizer: Any
    model: Any
    name: str
    max_context: int

    def __post_init__(self) -> None:
        self.markers = R.marker_ids(self.tokenizer)


@dataclass
class Server:
    """What the routes share. `backend` is None while the model loads (requests get 503)."""

    metrics: ServerMetrics
    backend: Backend | None = None
    load_error: str | None = None
    serial: bool = False  # one request at a time (the upstream web server's behaviour; a benchmark baseline)
    retry_after_s: int = 1
    _serial_lock: asyncio.Lock | None = field(default=None, repr=False)

    def ready(self) -> Backend:
        if self.backend is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, why, "server_error", code="model_not_ready",
                           headers={"Retry-After": str(self.retry_after_s)})
        return self.backend

    async def take_turn(self) -> Callable[[], None]:
        """Serial mode: wait until the previous request has finished. Returns the release function
        (idempotent; a no-op when not serial)."""
        if not self.serial:
            return lambda: None
        if self._serial_lock is None:
            self._serial_lock = asyncio.Lock()
        lock = self._serial_lock
        await lock.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()

        return release


def submit(server: Server, job: Job, prompt_param: str) -> RequestHandle:
    """Queue one job; the core's refusals become 400 (naming the field) or 503 (queue full)."""
    backend = server.ready()
    try:
        return backend.scheduler.submit(job.prompt, job.params)
    except RequestError as e:
        param = prompt_param if e.param in (None, "prompt", "prompt_tokens") else e.param
        code = "context_length_exceeded" if "context" in str(e) else None
        raise bad_request(str(e), param, code) from e
    except QueueFullError as e:
        raise APIError(503, f"the server is busy ({e or 'queue full'}); retry in {server.retry_after_s} s",
                       "server_error", code="queue_full", headers={"Retry-After": str(server.retry_after_s)}) from e


def submit_all(server: Server, jobs: list[Job], prompt_param: str) -> list[RequestHandle | None]:
    """Submit every job that generates; on a refusal, cancel the ones already queued."""
    limit = server.ready().max_context
    for job in jobs:
        if not job.generate and len(job.prompt) > limit:  # scored only: the scheduler never sees it
            raise bad_request(f"prompt of {len(job.prompt)} tokens exceeds the model's context of {limit} tokens",
                              prompt_param, "context_length_exceeded")
    handles: list[RequestHandle | None] = []
    try:
        for job in jobs:
            handles.append(submit(server, job, prompt_param) if job.generate else None)
    except APIError:
        for h in handles:
            if h is not None:
                h.cancel()
        raise
    return handles


class SampleState:
    """One sample of one job: its visible text, log-probabilities and finish reason."""

    def __init__(self, backend: Backend, job: Job):
        self.text = R.SampleText(backend.markers, job.params.stop)
        self.logprob_entries: list = []  # chat logprobs not yet sent
        self.reason: str | None = None
        self.sent_finish = False  # streaming: the chunk with finish_reason went out


async def merged(handles: list[RequestHandle | None]) -> AsyncIterator[tuple[int, list]]:
    """(job index, event batch) from several handles as the batches arrive."""
    live = [(j, h) for j, h in enumerate(handles) if h is not None]
    if not live:
        return
    if len(live) == 1:
        j, h = live[0]
        async for batch in h.aevent_batches():
            yield j, batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(j: int, h: RequestHandle) -> None:
        try:
            async for batch in h.aevent_batches():
                await queue.put((j, batch))
        finally:
            await queue.put((j, None))

    tasks = [asyncio.ensure_future(pump(j, h)) for j, h in live]
    try:
        remaining = len(tasks)
        while remaining:
            j, batch = await queue.get()
            if batch is None:
                remaining -= 1
            else:
                yield j, batch
    finally:
        for t in tasks:
            t.cancel()


class Collector:
    """Applies event batches to the per-sample states of every job, and to the metrics."""

    def __init__(self, backend: Backend, jobs: list[Job], handles: list[RequestHandle | None],
                 observer: RequestObserver, chat_logprobs: bool):
        self.backend, self.jobs, self.handles, self.observer = backend, jobs, handles, observer
        self.chat_logprobs = chat_logprobs
        self.samples = [[SampleState(backend, job) for _ in range(job.params.n)] for job in jobs]
        self.completion_lp = [[R.CompletionLogprobs(backend.tokenizer, backend.markers) for _ in range(job.params.n)]
                              for job in jobs] if not chat_logprobs else None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def apply(self, j: int, batch: list) -> dict[int, str]:
        """Feed one batch of job j; returns the new visible text per sample."""
        tok, markers = self.backend.tokenizer, self.backend.markers
        job, states = self.jobs[j], self.samples[j]
        new: dict[int, str] = {}
        count = 0
        for ev in batch:
            if isinstance(ev, TokenEvent):
                count += 1
                st = states[ev.sample]
                if st.text.stopped:
                    continue
                piece = st.text.add(ev)
                if piece:
                    new[ev.sample] = new.get(ev.sample, "") + piece
                if job.params.logprobs is not None and (ev.token in markers or not tok.is_special(ev.token)):
                    if self.chat_logprobs:
                        st.logprob_entries.append(R.chat_logprob(tok, self.backend.markers, ev))
                    else:
                        self.completion_lp[j][ev.sample].add(ev.token, ev.logprob if ev.sampled else None,
                                                             ev.top_logprobs, st.text.token_text(ev))
            elif isinstance(ev, FinishEvent):
                st = states[ev.sample]
                tail = st.text.finish()
                if tail:
                    new[ev.sample] = new.get(ev.sample, "") + tail
                st.reason = "stop" if st.text.stopped else ev.reason
                self.observer.finished(st.reason)
            elif isinstance(ev, DoneEvent):
                self.prompt_tokens += ev.usage.prompt_tokens
                self.completion_tokens += ev.usage.completion_tokens
        self.observer.tokens(count)
        if all(s.text.stopped for s in states) and self.handles[j] is not None:
            self.handles[j].cancel()  # every sample hit a stop string the core did not see: stop decoding
        return new

    def abandon(self) -> None:
        """The client went away: samples still running count as cancelled."""
        for states in self.samples:
            for st in states:
                if st.reason is None:
                    st.reason = "cancelled"
                    self.observer.finished("cancelled")

    def done(self) -> None:
        for job in self.jobs:
            if not job.generate:  # prompt scoring only: the scheduler saw nothing
                self.prompt_tokens += len(job.prompt)
        self.observer.done(self.prompt_tokens, self.completion_tokens)

    def usage(self) -> dict:
        return R.usage(self.prompt_tokens, self.completion_tokens)


async def echo_logprobs(backend: Backend, job: Job, lp: R.CompletionLogprobs | None) -> str:
    """The prompt's text for `echo`, and (when logprobs are asked for) its tokens' log-probabilities."""
    ids = job.prompt[1:] if job.skip_first else job.prompt
    text = backend.tokenizer.decode(ids)
    if lp is None:
        return text
    scored = await asyncio.to_thread(prompt_logprobs, backend.model, job.prompt, job.params.logprobs or 0)
    if not job.skip_first:
        lp.add(job.prompt[0], None, None)
    for token, (logprob, top) in zip(job.prompt[1:], scored):
        lp.add(token, logprob, top if job.params.logprobs else None)
    return text


async def wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request, work, handles: list[RequestHandle | None]):
    """Run `work` (a coroutine); if the client leaves first, cancel its requests and return None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        for h in handles:
            if h is not None:
                h.cancel()
        task.cancel()
        return None
    finally:
        watch.cancel()
