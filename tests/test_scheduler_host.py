"""The scheduler's host path, made cheaper per token, keeps every event: `token_event` builds the
same `TokenEvent` as its constructor; reading chunks request by request (`take_by_request`, the
default) sends each handle exactly the event stream of the first per-step loop, on a workload with
n samples, logprobs, stop strings, stop tokens, tool calls and a cancellation; readers that pop
events without the queue's lock lose none and leave unread ones in the queue."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from picochat.infer.request import DoneEvent, RequestHandle, SamplingParams, TokenEvent, token_event
from picochat.infer.sampling import _M32, mix32, stream_key
from picochat.infer.scheduler import Scheduler, SchedulerConfig

from test_engine import A_END, PY_E, PY_S, TOK, MarkovModel, b, chain, random_model


def test_token_event_equals_the_constructor():
    for args in [(0, 5, "", "text", True, None, None), (2, 7, "hé", "tool_output", False, -1.5, ((7, -1.5), (3, -2.0)))]:
        fast, slow = token_event(*args), TokenEvent(*args)
        assert type(fast) is TokenEvent and fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        assert dataclasses.asdict(fast) == dataclasses.asdict(slow)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.token = 1
    assert token_event(0, 5, "", "text", True) == TokenEvent(0, 5, "", "text", True)


def _all_events(take_by_request: bool, model, tokenizer, work, cancel: int | None, **cfg) -> list[list]:
    s = Scheduler(model, tokenizer, SchedulerConfig(take_by_request=take_by_request, **cfg))
    handles = []
    for step in range(2 * len(work)):  # requests join every other step
        if step % 2 == 0:
            handles.append(s.submit(*work[len(handles)]))
        if cancel is not None and step == 6:
            handles[cancel].cancel()
        s.advance()
    s.run_until_idle()  # waits for tools rather than spinning
    return [list(h.events(timeout=5)) for h in handles]


@pytest.mark.parametrize("sync_every,pipeline,tokenizer", [(1, False, TOK), (4, False, TOK), (5, True, TOK),
                                                            (4, False, None), (5, True, None)])
def test_take_by_request_sends_the_per_step_loops_events(sync_every, pipeline, tokenizer):
    """Without a tokenizer, single samples without logprobs take a chunk's run of tokens at once
    (`Sample.accept_plain`)."""
    model = random_model(seed=3)
    stop_text = TOK.decode([40, 41])
    work = [([1, 2, 3], SamplingParams(max_tokens=9, temperature=1.0, seed=5, n=3)),
            ([4, 5], SamplingParams(max_tokens=12, temperature=0, logprobs=3)),
            ([6] * 7, SamplingParams(max_tokens=20, temperature=0.9, seed=1, logprobs=0, n=2)),
            ([7, 8, 9], SamplingParams(max_tokens=15, temperature=0)),
            ([2, 2], SamplingParams(max_tokens=30, temperature=1.2, seed=9, stop=(stop_text, "a"))),
            ([3] * 11, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(17, 99))),
            ([5, 1], SamplingParams(max_tokens=25, temperature=1.0, seed=4, stop_token_ids=tuple(range(0, 265, 9)))),
            ([9, 9, 9], SamplingParams(max_tokens=40, temperature=1.0, seed=2, stop_token_ids=()))]
    cfg = dict(slots=8, sync_every=sync_every, pipeline=pipeline, prefill_budget=16)
    want = _all_events(False, model, tokenizer, work, cancel=3, **cfg)
    got = _all_events(True, model, tokenizer, work, cancel=3, **cfg)
    assert got == want
    assert all(isinstance(events[-1], DoneEvent) for events in got)
    assert sum(isinstance(e, TokenEvent) for events in got for e in events) > 100
    reasons = {e.reason for events in got for e in events if hasattr(e, "reason")}
    assert {"stop", "length", "cancelled"} <= reasons


def test_take_by_request_with_tool_calls_sends_the_same_events():
    table = {**chain(ord("="), PY_S, *b("2+3"), PY_E, ord("Q")), **chain(*b("ok"), A_END), **chain(*b("xyxyxy"))}
    m = MarkovModel(table)
    work = [(b("="), SamplingParams(max_tokens=14, temperature=0)),
            (b("x"), SamplingParams(max_tokens=14, temperature=0, n=2)),
            (b("="), SamplingParams(max_tokens=9, temperature=0, stop=("5",)))]
    for pipeline in (False, True):
        cfg = dict(slots=4, sync_every=3, pipeline=pipeline)
        assert _all_events(True, m, TOK, work, None, **cfg) == _all_events(False, m, TOK, work, None, **cfg)


def test_events_pop_without_the_lock_and_leave_unread_ones():
    h = RequestHandle([1], SamplingParams())
    events = [token_event(0, t, "", "text", True) for t in range(50)] + [DoneEvent(None)]

    def push():
        for i in range(0, len(events), 7):
            h._push_many(events[i:i + 7])

    it = h.events(timeout=5)
    threading.Thread(target=push).start()
    first = [next(it) for _ in range(10)]
    it.close()  # a reader that stops early: what it did not read stays queued
    assert first == events[:10]
    assert list(h.events(timeout=5)) == events[10:]


def test_stream_key_equals_mix32_on_tensors():
    """Keys are computed on Python ints; the noise (`gumbel_noise`) hashes them with `mix32` on
    tensors: both must be the same function."""
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, -1, 2**63 - 1, -2**63, 2**40 + 7, 123] + torch.randint(-2**62, 2**62, (200,), generator=g).tolist()
    for seed in seeds:
        for sample in (0, 1, 5, 2**33 + 3):
            x = torch.tensor([(seed & _M32) ^ ((seed >> 32) & _M32) * 0x9E3779B1 & _M32], dtype=torch.long)
            assert stream_key(seed, sample) == int(mix32(mix32(x) ^ (sample & _M32)).item())
