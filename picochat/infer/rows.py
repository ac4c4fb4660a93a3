"""A request's samples as the scheduler's host side sees them: tokens in, events out.

`Sample` is one of a request's n rows: its slot, position and pending token, and what each
appended token means (`accept`): the message part and text (through `parts.MessageParser`), stop
tokens, stop strings (text held back until it cannot be one), `max_tokens`, the start of a tool call,
and forced tokens (tool outputs, `sampled=False`). `Request` holds the samples, counts usage and
sends the `FinishEvent`s and the `DoneEvent`; events wait in the request's outbox until the
scheduler delivers them, once per step. Nothing here touches the device.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .parts import MessageParser, StopMatcher
from .request import DoneEvent, FinishEvent, RequestHandle, SamplingParams, Usage, token_event

# states: prefill (waiting for its prompt), text (sampling), waiting (on a tool), forcing (tool
# output being fed in), done
RUNNING = ("text", "forcing")


@dataclass
class Request:
    handle: RequestHandle
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    keys: list[int]  # per-sample noise keys
    outboxes: list["Request"]  # the scheduler's list of requests with events to deliver
    slots: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache so far
    samples: list["Sample"] = field(default_factory=list)
    finished: int = 0
    outbox: list = field(default_factory=list)  # events not yet handed to the handle

    def emit(self, event) -> None:
        if not self.outbox:
            self.outboxes.append(self)
        self.outbox.append(event)

    def deliver(self) -> None:
        events, self.outbox = self.outbox, []
        self.handle._push_many(events)

    @property
    def prompt(self) -> list[int]:
        return self.handle.prompt

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    def completion_tokens(self) -> int:
        return sum(s.emitted for s in self.samples)

    def finish_unstarted(self, reason: str) -> None:
        """End a request that never got samples (cancelled in the queue or while prefilling)."""
        for i in range(self.params.n):
            self.emit(FinishEvent(i, reason))
        self.done()

    def done(self) -> None:
        self.handle.finished_at = time.monotonic()
        self.emit(DoneEvent(Usage(len(self.prompt), self.completion_tokens())))


@dataclass
class Sample:
    request: Request
    index: int
    slot: int
    pos: int  # where the pending token (last appended, not yet fed) will be written
    last: int = 0
    emitted: int = 0
    state: str = "text"
    since: int = 0  # the first decode chunk whose tokens are this sample's
    resync: bool = False  # the device's position/input for this slot must be reset before a chunk
    first_pending: bool = False  # its first token was sampled on the device and not read yet
    forced: deque = field(default_factory=deque)
    tool: Future | None = None
    parser: MessageParser | None = None
    stops: StopMatcher | None = None
    reason: str | None = None

    def accept(self, token: int, logprob: float | None = None,
               top: list[tuple[int, float]] | None = None, tools: bool = True) -> str | None:
        """Book one appended token and send its TokenEvent. Returns the expression of a tool call
        this token closes (the caller runs it), else None. Sets `reason` when the sample ends."""
        req = self.request
        forced = self.state == "forcing"
        if forced:
            self.forced.popleft()
            if not self.forced:
                self.state = "text"
        self.last, self.emitted = token, self.emitted + 1
        stops = self.stops
        if self.parser.tokenizer is None:  # no tokenizer: every token is text with no text (MessageParser)
            part, text, tool_call = "text", "", None
        else:
            piece = self.parser.feed(token)
            part, text, tool_call = piece.part, piece.text, piece.tool_call
        matched = False
        if part == "text" and not forced:
            if stops.stops:
                text, matched = stops.feed(text)
        else:  # stop strings live in the text part: what it held back is text after all
            held = stops.flush()
            if held:
                part, text = "text", held + text  # an event's part is that of the text it carries
        if matched or (not forced and token in req.stop_ids):
            self.reason = "stop"
        call = None
        if tool_call is not None and not forced and self.reason is None and tools:
            call, self.state = tool_call, "waiting"
        if self.reason is None and self.emitted >= req.max_tokens:
            self.reason = "length"
        if self.reason is not None and not matched:
            tail = stops.flush() + self.parser.finish()
            if tail:
                text += tail
                part = "text" if part == "special" else part
        handle = req.handle
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        outbox = req.outbox
        if not outbox:  # Request.emit, inlined: this runs once per token
            req.outboxes.append(req)
        outbox.append(token_event(self.index, token, text, part, not forced, logprob,
                                  tuple(top) if top is not None else None))
        return call

    @property
    def plain(self) -> bool:
        """Whether its next tokens carry no text and need no parsing: no tokenizer (so no text, no
        tool calls), no stop strings, nothing being forced in, no logprobs."""
        return (self.state == "text" and self.parser.tokenizer is None and not self.stops.stops
                and self.request.params.logprobs is None)

    def accept_plain(self, tokens: list[int]) -> int:
        """`accept` of each token in turn, for a `plain` sample, done for a run of tokens at once:
        the same TokenEvents, stop on a stop token or at max_tokens. Returns how many tokens it
        took (the rest of the run comes after its end and is discarded)."""
        req = self.request
        take = min(len(tokens), req.max_tokens - self.emitted)
        if take <= 0:
            return 0
        stop_ids = req.stop_ids
        stopped = False
        if stop_ids:
            for i in range(take):
                if tokens[i] in stop_ids:
                    take, stopped = i + 1, True
                    break
        run = tokens[:take] if take < len(tokens) else tokens
        self.last, self.emitted = run[-1], self.emitted + take
        if stopped:
            self.reason = "stop"
        elif self.emitted >= req.max_tokens:
            self.reason = "length"
        handle = req.handle
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        if not req.outbox:
            req.outboxes.append(req)
        index = self.index
        req.outbox += [token_event(index, t, "", "text", True, None, None) for t in run]
        return take

    def finish(self, reason: str) -> None:
        """Send this sample's FinishEvent (and the request's DoneEvent after its last sample)."""
        self.state, self.reason = "done", reason
        req = self.request
        req.emit(FinishEvent(self.index, reason))
        req.finished += 1
        if req.finished == len(req.samples):
            req.done()
