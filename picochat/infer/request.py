"""A generation request and its event stream: the contract between the decode loop and its users.

Every consumer (chat CLI, evaluation, RL rollouts, the HTTP server) builds a `SamplingParams`, submits
prompt tokens to the scheduler (`infer/scheduler.py`) and gets a `RequestHandle` back. The scheduler
pushes events into the handle from its own thread; consumers read them with `events()` (blocking
iterator), `aevents()` (asyncio) or `result()` (wait for the whole completion).

Events, in order, per request:
- `TokenEvent` for each token a sample appended (sampled or forced), with its UTF-8-safe text delta
  and the message part it belongs to (text / tool_call / tool_output);
- `FinishEvent` once per sample (reason: stop | length | cancelled);
- `DoneEvent` last, once, with the usage counts.
Invalid parameters raise `RequestError` (naming the field) before anything is queued.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

Part = Literal["text", "tool_call", "tool_output", "special"]
FinishReason = Literal["stop", "length", "cancelled"]


class RequestError(ValueError):
    """A request the core refuses; `param` names the offending field (for HTTP 400s)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The scheduler's waiting queue is at its bound; retry later."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: 256 or what fits in the context after the prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # per-request random stream: same text whatever shares the batch
    n: int = 1  # samples; the prompt is prefilled once, every sample drawn independently
    stop: tuple[str, ...] = ()  # stop strings (matched on generated text)
    stop_token_ids: tuple[int, ...] | None = None  # None: <|assistant_end|> and <|bos|>
    logprobs: int | None = None  # None: none; 0: chosen token's logprob; k: plus the top k alternatives
    tools: bool = True  # run the calculator on <|python_start|>...<|python_end|>

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise RequestError(f"{name} {why} (got {getattr(self, name)!r})", param=name)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            bad("top_k", "must be an integer >= 1")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 <= self.top_p <= 1):
            bad("top_p", "must be a number in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            bad("stop", "must be a tuple of strings")
        if self.stop_token_ids is not None and not all(is_int(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be integers")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")


@dataclass(frozen=True)
class TokenEvent:
    sample: int  # which of the request's n samples
    token: int
    text: str  # UTF-8-safe text delta ("" for special tokens and for bytes of an incomplete character)
    part: Part  # the message part this token belongs to
    sampled: bool  # False for forced tokens (tool outputs): RL masks those out of the loss
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class FinishEvent:
    sample: int
    reason: FinishReason


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all samples


@dataclass(frozen=True)
class DoneEvent:
    usage: Usage


Event = Union[TokenEvent, FinishEvent, DoneEvent]

_new, _set_attr = object.__new__, object.__setattr__


def frozen_instance(cls, fields: dict):
    """An instance of the frozen dataclass `cls` holding `fields` (all of them), at half the cost of
    `cls(**fields)`, whose `__init__` sets each field through `object.__setattr__`: for what the
    decode loop makes per token. Same fields, equality, hash and repr."""
    obj = _new(cls)
    _set_attr(obj, "__dict__", fields)
    return obj


def token_event(sample: int, token: int, text: str, part: Part, sampled: bool, logprob: float | None = None,
                top_logprobs: tuple[tuple[int, float], ...] | None = None) -> TokenEvent:
    """`TokenEvent(...)` through `frozen_instance` (tests/test_scheduler_host.py checks it against the
    constructor)."""
    return frozen_instance(TokenEvent, {"sample": sample, "token": token, "text": text, "part": part,
                                        "sampled": sampled, "logprob": logprob, "top_logprobs": top_logprobs})


@dataclass
class SampleResult:
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)  # per token: sampled (True) or forced (False)
    logprobs: list[float | None] = field(default_factory=list)
    text: str = ""  # the visible text (all parts, special tokens omitted)
    parts: list[tuple[Part, str]] = field(default_factory=list)  # consecutive (part, text) runs
    finish_reason: FinishReason | None = None


@dataclass
class Completion:
    samples: list[SampleResult]
    usage: Usage


_ids = itertools.count()


class _Waiter:
    """An asyncio reader of a handle: its loop, its wake-up flag, and whether a wake-up is on its way."""

    __slots__ = ("loop", "flag", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.flag, self.pending = loop, asyncio.Event(), False


class RequestHandle:
    """One submitted request. The scheduler calls `_push`; consumers read events or the result."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt = list(prompt)
        self.params = params
        self._queue: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._loop_waiters: list[_Waiter] = []
        self._lock = threading.Lock()
        # time.monotonic() stamps, set by the scheduler: for TTFT and latency metrics
        self.submitted_at: float = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    # -- scheduler side --------------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        self._push_many((event,))

    def _push_many(self, events: Sequence[Event]) -> None:
        """Several events at once (a decode chunk's): one wake-up of asyncio readers, not one each,
        and the events go into the queue under one lock with one notify: a blocked reader wakes
        once per chunk instead of racing the scheduler's thread for the GIL after every event."""
        q = self._queue
        with q.mutex:  # what Queue.put does per item (the queue is unbounded), done once for all
            q.queue.extend(events)
            q.unfinished_tasks += len(events)
            q.not_empty.notify()
        if events and isinstance(events[-1], DoneEvent):
            self._done.set()
        with self._lock:  # one wake-up per waiter until it has looked again, not one per event
            waiters = [w for w in self._loop_waiters if not w.pending]
            for w in waiters:
                w.pending = True
        for w in waiters:
            w.loop.call_soon_threadsafe(w.flag.set)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- consumer side ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the scheduler to stop this request; its samples finish with reason 'cancelled' and its
        slots are free within one decode step."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _pop(self) -> Event:
        """The next event, or queue.Empty. Events are pushed under the queue's lock (`_push_many`);
        taking one is a deque popleft, atomic on its own: no lock and no notify per event, which a
        reader of a chunk's 16 events per wake-up otherwise pays 16 times, holding the GIL the
        decode loop needs."""
        try:
            return self._queue.queue.popleft()
        except IndexError:
            raise queue.Empty from None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over the events, ending after the DoneEvent."""
        while True:
            try:
                event = self._pop()
            except queue.Empty:
                event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, DoneEvent):
                return

    def _waiter(self) -> "_Waiter":
        waiter = _Waiter(asyncio.get_running_loop())
        with self._lock:
            self._loop_waiters.append(waiter)
        return waiter

    def _rearm(self, waiter: "_Waiter") -> None:
        """Before looking at the queue: events pushed from now on wake this waiter again."""
        waiter.flag.clear()
        with self._lock:
            waiter.pending = False

    async def aevents(self) -> AsyncIterator[Event]:
        """The same events for asyncio code (the server): never blocks the event loop."""
        waiter = self._waiter()
        try:
            while True:
                try:
                    event = self._pop()
                except queue.Empty:
                    self._rearm(waiter)
                    if self._queue.empty():
                        await waiter.flag.wait()
                    continue
                yield event
                if isinstance(event, DoneEvent):
                    return
        finally:
            with self._lock:
                self._loop_waiters.remove(waiter)

    async def aevent_batches(self) -> AsyncIterator[list[Event]]:
        """Like `aevents`, but each item is every event that has arrived (at least one), so a server
        writes one network chunk per wake-up instead of one per token; ends after the DoneEvent."""
        waiter = self._waiter()
        try:
            while True:
                self._rearm(waiter)
                batch: list[Event] = []
                while True:
                    try:
                        batch.append(self._pop())
                    except queue.Empty:
                        break
                if not batch:
                    await waiter.flag.wait()
                    continue
                yield batch
                if isinstance(batch[-1], DoneEvent):
                    return
        finally:
            with self._lock:
                self._loop_waiters.remove(waiter)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish and collect every sample's tokens, text and parts."""
        samples = [SampleResult() for _ in range(self.params.n)]
        for event in self.events(timeout):
            if isinstance(event, TokenEvent):
                s = samples[event.sample]
                s.tokens.append(event.token)
                s.sampled.append(event.sampled)
                s.logprobs.append(event.logprob)
                if event.text:
                    s.text += event.text
                    if s.parts and s.parts[-1][0] == event.part:
                        s.parts[-1] = (event.part, s.parts[-1][1] + event.text)
                    else:
                        s.parts.append((event.part, event.text))
            elif isinstance(event, FinishEvent):
                samples[event.sample].finish_reason = event.reason
            else:
                return Completion(samples, event.usage)
        raise RuntimeError("event stream ended without a DoneEvent")  # pragma: no cover
