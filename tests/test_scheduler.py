"""The continuous-batching scheduler: staggered joins, stops, tools, cancellations and slot reuse
give each request exactly what it gets decoded alone (CPU, fp32, greedy); seeded sampling does not
depend on batch-mates; the queue is bounded; oversized prompts are refused before taking a slot."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from picochat.infer.parts import MessageParser, StopMatcher, to_content
from picochat.infer.request import (DoneEvent, FinishEvent, QueueFullError, RequestError, SamplingParams,
                                    TokenEvent)
from picochat.infer.scheduler import ContextOverflowError, Scheduler, SchedulerConfig

from test_engine import A_END, OUT_E, OUT_S, PY_E, PY_S, TOK, MarkovModel, b, chain, random_model

GREEDY = dict(temperature=0)


def alone(model, prompt, params, tokenizer=None, **cfg) -> list[int]:
    """What a request decodes to on a scheduler of its own."""
    s = Scheduler(model, tokenizer, SchedulerConfig(slots=params.n, **cfg))
    h = s.submit(prompt, params)
    s.run_until_idle()
    return h.result().samples[0].tokens


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11)


# ---------------------------------------------------------------------------------------------------
# greedy outputs equal decoding alone


@pytest.mark.parametrize("sync_every,pipeline,fresh", [(1, False, None), (3, False, None), (4, True, None),
                                                       (4, True, True)])
def test_staggered_joins_equal_alone(model, sync_every, pipeline, fresh):
    """Requests join between chunks (mid-way through others' generations), with different prompt
    lengths, max_tokens and stop strings; one is cancelled. Each gets its solo output. `fresh`:
    first prompt chunks through the scratch-cache prefill that CUDA graphs replay on GPUs (here
    eagerly; longer prompts continue with the cached prefill)."""
    ps = prompts(7)
    params = [SamplingParams(max_tokens=30 if i == 1 else 5 + 3 * i, **GREEDY) for i in range(7)]
    solo = [alone(model, p, q, TOK) for p, q in zip(ps, params)]
    # a stop string taken from the middle of request 2's solo text
    text2 = TOK.decode(solo[2])
    stop = text2[4:6] if len(text2) > 6 else None
    if stop:
        params[2] = SamplingParams(max_tokens=params[2].max_tokens, stop=(stop,), **GREEDY)
    s = Scheduler(model, TOK, SchedulerConfig(slots=4, sync_every=sync_every, pipeline=pipeline, prefill_budget=16,
                                              prefill_graphs=fresh))
    assert (s.batch.fresh is not None) == bool(fresh)
    handles = {}
    for step in range(200):
        if step % 2 == 0 and len(handles) < 7:
            i = len(handles)
            handles[i] = s.submit(ps[i], params[i])
        if step == 5:
            handles[1].cancel()
        if not s.step() and len(handles) == 7:
            break
    for i, h in handles.items():
        res = h.result(timeout=5)
        sample = res.samples[0]
        if i == 1:
            assert sample.finish_reason == "cancelled"
            assert sample.tokens == solo[1][:len(sample.tokens)]
            continue
        if i == 2 and stop:
            assert sample.finish_reason == "stop" and stop not in sample.text
            assert TOK.decode(sample.tokens).find(stop) >= 0
            assert sample.tokens == solo[2][:len(sample.tokens)]
            assert sample.text == text2[:text2.find(stop)]
            continue
        assert sample.tokens == solo[i], i
        assert sample.finish_reason == "length"
        assert res.usage.prompt_tokens == len(ps[i]) and res.usage.completion_tokens == len(solo[i])
    st = s.stats()
    assert st["slots_used"] == 0 and st["running"] == 0 and st["finished"]["cancelled"] == 1


def test_fresh_prefill_equals_cached_prefill(model):
    """The scratch-cache prefill (what the prefill graphs replay) gives the cached prefill's logits,
    cache rows and positions, for scattered slots and prompts of different lengths."""
    from picochat.infer.batch import DecodeBatch
    from picochat.infer.modelprep import prepare_model

    m = prepare_model(model, torch.float32, fuse=True)
    chunks = [[3, 4, 5, 6, 7], [9] * 12, [1, 2]]
    slots = [0, 2, 3]
    out = []
    for fresh in (False, True):
        b = DecodeBatch(m, 4, 64, k_max=2, dtype=torch.float32, fresh_prefill=fresh)
        assert (b.fresh is not None) == fresh
        out.append((b, b.prefill(slots, chunks, [0, 0, 0])))
    (plain, want), (fresh, got) = out
    assert torch.allclose(want, got, atol=1e-5, rtol=0)
    assert torch.equal(plain.pos, fresh.pos)
    for a, b in zip(plain.cache.k + plain.cache.v, fresh.cache.k + fresh.cache.v):
        for slot, c in zip(slots, chunks):
            assert torch.allclose(a[slot, :, :len(c)], b[slot, :, :len(c)], atol=1e-5, rtol=0)


def test_prefill_group_split_into_buckets_and_eager(model):
    """A group no one prefill bucket holds is split: first chunks in as few bucket-sized runs as fit
    (longest first), a later chunk of a long prompt eagerly beside them; the logits come back in
    the group's order and the cache rows and positions equal the cached prefill's."""
    from picochat.infer.batch import DecodeBatch
    from picochat.infer.modelprep import prepare_model

    m = prepare_model(model, torch.float32, fuse=True)
    plain = DecodeBatch(m, 4, 64, k_max=2, dtype=torch.float32, fresh_prefill=False)
    split = DecodeBatch(m, 4, 64, k_max=2, dtype=torch.float32, fresh_prefill=True, prefill_tokens=128)
    assert split.fresh.buckets == [(1, 64), (2, 64)]
    assert split.fresh.plan([5, 12, 2, 70]) == ([[1, 0], [2]], [3])
    for b in (plain, split):
        b.prefill([1], [[8] * 6], [0])  # the first chunk of slot 1's prompt
    runs = split.fresh.runs
    slots, chunks, starts = [0, 1, 2, 3], [[3, 4, 5, 6, 7], [5] * 4, [9] * 12, [1, 2]], [0, 6, 0, 0]
    want, got = plain.prefill(slots, chunks, starts), split.prefill(slots, chunks, starts)
    assert split.fresh.runs == runs + 2  # three first chunks: 2 rows + 1 row; slot 1's second chunk eagerly
    assert torch.allclose(want, got, atol=1e-5, rtol=0)
    assert torch.equal(plain.pos, split.pos) and plain.pos.tolist() == [5, 10, 12, 2]
    for a, b in zip(plain.cache.k + plain.cache.v, split.cache.k + split.cache.v):
        for slot, n in enumerate(plain.pos.tolist()):
            assert torch.allclose(a[slot, :, :n], b[slot, :, :n], atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_equal_cached_prefill_cuda():
    """The prefill graphs (bucketed rows and tokens, replayed) give the eager cached prefill's
    logits, cache rows and positions, for scattered slots, in fp32 on CUDA; and a group too big for
    any bucket runs eagerly. Between capture and replay the caching allocator's free small blocks
    are taken by tensors of huge values: a tensor a graph reads that was freed after its capture
    (what broke these graphs on the H200: a KVCache view's row index, referenced only by the
    captured step) then holds them, and the replay fails a device-side index assert."""
    from picochat.infer.batch import DecodeBatch
    from picochat.infer.modelprep import prepare_model

    dev = torch.device("cuda")
    m = prepare_model(random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256,
                                   device=dev, seed=3), torch.float32, fuse=True)
    chunks = [[3, 4, 5, 6, 7], [9] * 70, [1, 2]]
    slots = [0, 2, 3]
    plain = DecodeBatch(m, 4, 128, k_max=2, dtype=torch.float32, fresh_prefill=False)
    graphed = DecodeBatch(m, 4, 128, k_max=2, dtype=torch.float32, graph=True, prefill_tokens=512,
                          fresh_prefill=True)
    assert graphed.fresh is not None and graphed.fresh.graphs and graphed.fresh.fits(3, 70)
    poison = [torch.full((64,), 1 << 40, dtype=torch.long, device=dev) for _ in range(4096)]  # 512-byte blocks
    want, got = plain.prefill(slots, chunks, [0, 0, 0]), graphed.prefill(slots, chunks, [0, 0, 0])
    assert torch.allclose(want, got, atol=1e-4, rtol=0)
    assert torch.equal(plain.pos, graphed.pos)
    for a, b in zip(plain.cache.k + plain.cache.v, graphed.cache.k + graphed.cache.v):
        for slot, c in zip(slots, chunks):
            assert torch.allclose(a[slot, :, :len(c)], b[slot, :, :len(c)], atol=1e-4, rtol=0)
    assert not graphed.fresh.fits(4, 130)  # longer than the longest bucket (the 128-token context): eager
    assert graphed.prefill([0, 1, 2, 3], [[5] * 130] * 4, [0] * 4).shape == (4, 265)
    # buckets too small for the group: first chunks in two replays, a later chunk eagerly beside them
    small = DecodeBatch(m, 4, 128, k_max=2, dtype=torch.float32, graph=True, prefill_tokens=128, fresh_prefill=True)
    plain = DecodeBatch(m, 4, 128, k_max=2, dtype=torch.float32, fresh_prefill=False)
    for b in (plain, small):
        b.prefill([1], [[8] * 6], [0])
    runs = small.fresh.runs
    slots, chunks, starts = [0, 1, 2, 3], [[3, 4, 5, 6, 7], [5] * 4, [9] * 70, [1, 2]], [0, 6, 0, 0]
    want, got = plain.prefill(slots, chunks, starts), small.prefill(slots, chunks, starts)
    assert small.fresh.runs == runs + 2
    assert torch.allclose(want, got, atol=1e-4, rtol=0) and torch.equal(plain.pos, small.pos)
    for a, b in zip(plain.cache.k + plain.cache.v, small.cache.k + small.cache.v):
        for slot, n in enumerate(plain.pos.tolist()):
            assert torch.allclose(a[slot, :, :n], b[slot, :, :n], atol=1e-4, rtol=0)
    del poison


def test_long_prompt_prefilled_in_chunks_while_others_decode(model):
    long_prompt = list(range(200, 256)) * 2  # 112 tokens, prefilled 8 per step
    short = [5, 6, 7]
    p = SamplingParams(max_tokens=12, **GREEDY)
    s = Scheduler(model, None, SchedulerConfig(slots=2, prefill_budget=8, max_context=160))
    h_short = s.submit(short, p)
    s.step()
    h_long = s.submit(long_prompt, p)
    for _ in range(3):
        s.step()
    # the long prompt is still being prefilled, the short request kept streaming meanwhile
    assert h_long.first_token_at is None and h_short._queue.qsize() >= 4
    s.run_until_idle()
    assert h_short.result().samples[0].tokens == alone(model, short, p, max_context=160)
    assert h_long.result().samples[0].tokens == alone(model, long_prompt, p, max_context=160)


def test_slot_reuse_leaks_nothing(model):
    """A cancelled request's cache rows are not read by the next request in that slot."""
    p = SamplingParams(max_tokens=10, **GREEDY)
    s = Scheduler(model, None, SchedulerConfig(slots=1, sync_every=2))
    first = s.submit(list(range(30, 50)), SamplingParams(max_tokens=40, **GREEDY))
    for _ in range(4):
        s.step()
    first.cancel()
    second = s.submit([7, 8], p)
    s.run_until_idle()
    assert first.result().samples[0].finish_reason == "cancelled"
    assert second.result().samples[0].tokens == alone(model, [7, 8], p)


def test_n_samples_prefilled_once_greedy_equal(model):
    p = SamplingParams(max_tokens=8, n=3, **GREEDY)
    s = Scheduler(model, None, SchedulerConfig(slots=4))
    h = s.submit([1, 2, 3], p)
    s.run_until_idle()
    res = h.result()
    solo = alone(model, [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY))
    assert [x.tokens for x in res.samples] == [solo] * 3
    assert res.usage.completion_tokens == 24 and s.stats()["prompt_tokens"] == 3


# ---------------------------------------------------------------------------------------------------
# sampling


def flat_model():
    m = random_model(seed=7)
    with torch.no_grad():
        m.lm_head.weight.mul_(0.05)
    return m


def test_seeded_sampling_independent_of_batch_mates():
    m = flat_model()
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123, n=2)
    solo = Scheduler(m, None, SchedulerConfig(slots=2))
    h = solo.submit([4, 5, 6], p)
    solo.run_until_idle()
    want = [x.tokens for x in h.result().samples]
    assert want[0] != want[1]  # samples draw independently from the first token
    s = Scheduler(m, None, SchedulerConfig(slots=8, sync_every=3))
    others = [s.submit([9] * (i + 1), SamplingParams(max_tokens=20, temperature=0.7 if i % 2 else 0, seed=i))
              for i in range(3)]
    s.step()
    h = s.submit([4, 5, 6], p)
    more = s.submit([1, 1], SamplingParams(max_tokens=5, temperature=1.5, top_k=3))
    s.run_until_idle()
    assert [x.tokens for x in h.result().samples] == want
    assert all(o.result().samples[0].tokens for o in others + [more])
    s2 = Scheduler(m, None, SchedulerConfig(slots=2))
    h2 = s2.submit([4, 5, 6], SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=124, n=2))
    s2.run_until_idle()
    assert [x.tokens for x in h2.result().samples] != want


def test_logprobs_match_full_forward(model):
    p = SamplingParams(max_tokens=5, temperature=1.0, seed=0, logprobs=3)
    s = Scheduler(model, None, SchedulerConfig(slots=2, sync_every=2))
    h = s.submit([3, 1, 4], p)
    s.run_until_idle()
    events = [e for e in h.events() if isinstance(e, TokenEvent)]
    seq = [3, 1, 4] + [e.token for e in events]
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0].log_softmax(-1)
    for i, e in enumerate(events):
        row = full[2 + i]
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)
        ids = [t for t, _ in e.top_logprobs]
        assert ids == row.topk(3).indices.tolist()
        assert e.sampled


# ---------------------------------------------------------------------------------------------------
# tools, parts, stop strings (scripted through MarkovModel)


def test_tool_call_forced_output_parts_and_mask():
    table = {**chain(ord("="), PY_S, *b("2+3"), PY_E, ord("Q")), **chain(OUT_E, *b("ok"), A_END),
             **chain(*b("xyxyxy"))}
    m = MarkovModel(table)
    s = Scheduler(m, TOK, SchedulerConfig(slots=2, sync_every=3, pipeline=True))
    h = s.submit(b("="), SamplingParams(max_tokens=14, **GREEDY))
    h2 = s.submit(b("x"), SamplingParams(max_tokens=14, **GREEDY))
    s.run_until_idle()
    r = h.result().samples[0]
    assert r.tokens == [PY_S, *b("2+3"), PY_E, OUT_S, *b("5"), OUT_E, *b("ok"), A_END]
    assert r.sampled == [True] * 5 + [False] * 3 + [True] * 3
    assert r.parts == [("tool_call", "2+3"), ("tool_output", "5"), ("text", "ok")]
    assert r.finish_reason == "stop" and r.text == "2+3" + "5" + "ok"
    assert h2.result().samples[0].tokens == b("yx" * 7)
    assert to_content(r.parts) == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                   {"type": "text", "text": "ok"}]


def test_stop_string_held_back_and_cut():
    m = MarkovModel(chain(*b("hi world!")))
    s = Scheduler(m, TOK, SchedulerConfig(slots=1))
    h = s.submit(b("h"), SamplingParams(max_tokens=20, stop=("wor",), **GREEDY))
    s.run_until_idle()
    r = h.result().samples[0]
    assert TOK.decode(r.tokens) == "i wor" and r.text == "i " and r.finish_reason == "stop"


def test_stop_matcher_and_parser_units():
    m = StopMatcher(["abc"])
    assert m.feed("xa") == ("x", False) and m.feed("b") == ("", False) and m.feed("d") == ("abd", False)
    assert m.feed("zab") == ("z", False) and m.feed("cq") == ("", True)
    p = MessageParser(TOK)
    pieces = [p.feed(t) for t in [*b("é"), PY_S, *b("1+1"), PY_E]]
    assert [x.part for x in pieces] == ["text", "text", "tool_call", "tool_call", "tool_call", "tool_call",
                                        "tool_call"]
    assert pieces[1].text == "é" and pieces[-1].tool_call == "1+1"


# ---------------------------------------------------------------------------------------------------
# the contract: refusals, queue, thread, asyncio, weights


def test_oversize_prompt_refused_before_taking_a_slot():
    s = Scheduler(MarkovModel({}, seq_len=64), TOK, SchedulerConfig(slots=2))
    with pytest.raises(ContextOverflowError) as info:
        s.submit([1] * 60, SamplingParams(max_tokens=10))
    assert isinstance(info.value, RequestError) and info.value.param == "max_tokens"
    assert all(str(n) in str(info.value) for n in (60, 10, 70, 64))
    with pytest.raises(RequestError) as info:
        s.submit([1] * 64, SamplingParams())
    assert info.value.param == "prompt"
    for bad, param in (([], "prompt"), ([999], "prompt")):
        with pytest.raises(RequestError) as info:
            s.submit(bad, SamplingParams())
        assert info.value.param == param
    with pytest.raises(RequestError) as info:
        s.submit([1], SamplingParams(n=3))
    assert info.value.param == "n"
    st = s.stats()
    assert st["slots_used"] == 0 and st["waiting"] == 0 and st["requests"] == 0


def test_queue_is_bounded():
    s = Scheduler(MarkovModel({}), TOK, SchedulerConfig(slots=1, max_queue=2))
    a, b_ = s.submit([1], SamplingParams(max_tokens=3)), s.submit([2], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.submit([3], SamplingParams(max_tokens=3))
    s.step()  # a takes the slot, the queue has room again
    c = s.submit([3], SamplingParams(max_tokens=3))
    s.run_until_idle()
    assert all(h.result().samples[0].finish_reason == "length" for h in (a, b_, c))


def test_background_thread_threads_and_asyncio(model):
    p = SamplingParams(max_tokens=6, **GREEDY)
    ps = prompts(6, seed=3)
    solo = [alone(model, x, p) for x in ps]
    results = {}
    with Scheduler(model, None, SchedulerConfig(slots=3, sync_every=2)) as s:
        def worker(i):
            results[i] = s.submit(ps[i], p).result(timeout=30).samples[0].tokens

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()

        async def streamed(i):
            toks = []
            async for e in s.submit(ps[i], p).aevents():
                if isinstance(e, TokenEvent):
                    toks.append(e.token)
                elif isinstance(e, DoneEvent):
                    assert e.usage.completion_tokens == len(toks)
            return toks

        async def both():
            return await asyncio.gather(streamed(4), streamed(5))

        results[4], results[5] = asyncio.run(both())
        for t in threads:
            t.join()
        h = s.submit(ps[0], SamplingParams(max_tokens=50, **GREEDY))
        h.cancel()
        events = list(h.events(timeout=30))
        assert isinstance(events[-2], FinishEvent) and events[-2].reason == "cancelled"
        assert h.first_token_at is None or h.first_token_at >= h.submitted_at
    assert [results[i] for i in range(6)] == solo


def test_refresh_weights_in_place(model):
    other = random_model(seed=12)
    p = SamplingParams(max_tokens=6, **GREEDY)
    s = Scheduler(random_model(seed=11), None, SchedulerConfig(slots=2))
    s.refresh_weights(other.state_dict())
    h = s.submit([1, 2, 3], p)
    s.run_until_idle()
    assert h.result().samples[0].tokens == alone(other, [1, 2, 3], p)
    fused = Scheduler(random_model(seed=11), None, SchedulerConfig(slots=2, fuse=True))
    fused.refresh_weights(other)  # unfused source into a fused copy
    h = fused.submit([1, 2, 3], p)
    fused.run_until_idle()
    assert h.result().samples[0].tokens == alone(other, [1, 2, 3], p)


def test_config_validation():
    with pytest.raises(ValueError, match="SchedulerConfig.slots"):
        SchedulerConfig(slots=0)
    with pytest.raises(ValueError, match="SchedulerConfig.kernels"):
        SchedulerConfig(kernels="cuda")


def test_chat_session_renders_tool_parts(capsys):
    import io

    from picochat.config import SamplingConfig
    from picochat.infer.chat_cli import ChatSession

    table = {**chain(TOK.special("<|assistant_start|>"), PY_S, *b("6*7"), PY_E),
             **chain(OUT_E, *b("so 42"), A_END)}
    s = Scheduler(MarkovModel(table, seq_len=64), TOK, SchedulerConfig(slots=1, sync_every=2))
    out = io.StringIO()
    session = ChatSession(s, TOK, SamplingConfig(temperature=0, max_tokens=30), out=out)
    assert session.reply("hi") == "so 42"
    assert out.getvalue() == "[python: 6*7][= 42]so 42\n"
    assert session.messages[-1]["content"] == [{"type": "python", "text": "6*7"},
                                               {"type": "python_output", "text": "42"},
                                               {"type": "text", "text": "so 42"}]
    assert s.stats()["slots_used"] == 0


# ---------------------------------------------------------------------------------------------------
# the batch benchmark (CPU smoke test; the real run is on a GPU)


def test_batch_bench_smoke(capsys, tmp_path):
    import argparse
    import json

    from picochat.bench.batch import add_batch_parser

    parser = argparse.ArgumentParser()
    add_batch_parser(parser.add_subparsers())
    plot = tmp_path / "plot.png"
    args = parser.parse_args(["batch", "--depth", "1", "--seq-len", "128", "--vocab-size", "300", "--concurrency",
                              "2", "--request-rate", "50", "--num-requests", "4", "--serial-requests", "2",
                              "--prompt-median", "8", "--output-median", "6", "--device", "cpu", "--plot", str(plot),
                              "--append", str(tmp_path / "r.jsonl"), "--profile"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "profile: continuous, concurrency 2" in out and "scheduler thread (cProfile" in out
    last = json.loads(out.strip().splitlines()[-1])
    modes = [(r["mode"], r.get("concurrency"), r.get("request_rate")) for r in last["records"]]
    assert modes == [("continuous", 2, None), ("static_fixed", 2, None), ("static", 2, None), ("serial", 2, None),
                     ("continuous", None, 50.0)]
    for r in last["records"]:
        assert r["bench"] == "batch" and r["tok_per_s_total"] > 0 and r["ttft_p99_ms"] > 0
        assert {"ttft_p50_ms", "tpot_p50_ms", "itl_p99_ms", "slot_occupancy", "commit", "command",
                "tok_per_s_steady"} <= set(r)
    assert plot.stat().st_size > 1000 and len((tmp_path / "r.jsonl").read_text().splitlines()) == 5


# ---------------------------------------------------------------------------------------------------
# CUDA: the graphed torch step and the Triton step against eager, on a staggered workload


def _staggered(sched, ps, params, cancel_at: int = 5, per_step: int = 1) -> list[list[int]]:
    handles = {}
    for step in range(400):
        while step % 2 == 0 and len(handles) < min(len(ps), (step // 2 + 1) * per_step):
            handles[len(handles)] = sched.submit(ps[len(handles)], params[len(handles)])
        if step == cancel_at:
            handles[1].cancel()
        if not sched.step() and len(handles) == len(ps):
            break
    out = []
    for i in range(len(ps)):
        sample = handles[i].result(timeout=10).samples[0]
        out.append(sample.tokens if i != 1 else [sample.finish_reason])
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fast_scheduler_matches_eager_on_staggered_requests(kernels):
    """fp32 on both sides (bf16 batch shapes would make near-ties differ): the graphed step,
    pipelined chunks of 4, joins, a cancellation and a stop string give eager's tokens exactly."""
    dev = torch.device("cuda")
    m = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256, device=dev, seed=3)
    ps = prompts(7, seed=5)
    params = [SamplingParams(max_tokens=60 if i == 1 else 9 + 5 * i, **GREEDY) for i in range(7)]
    params[3] = SamplingParams(max_tokens=30, stop=("e",), **GREEDY)
    params[4] = SamplingParams(max_tokens=25, temperature=1.0, top_k=20, seed=4)
    eager = Scheduler(m, TOK, SchedulerConfig(slots=4, mode="eager", sync_every=4, pipeline=True, dtype="float32"))
    fast = Scheduler(m, TOK, SchedulerConfig(slots=4, mode="fast", sync_every=4, dtype="float32", kernels=kernels,
                                             window_step=16))
    assert all(r.graph is not None and r.kernels == kernels for r in fast.batch.runners.values())
    assert _staggered(fast, ps, params) == _staggered(eager, ps, params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fast_scheduler_with_prefill_graphs_matches_eager(kernels):
    """Prefill graphs on, through the scheduler: prompts arrive a few at a time (grouped into one
    replay of a multi-row bucket), more requests than slots (slots reused), a cancellation, a stop
    string, greedy and seeded temperature sampling, a row moved down to a smaller bucket: eager
    decoding's tokens exactly (fp32)."""
    dev = torch.device("cuda")
    m = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256, device=dev, seed=3)
    ps = prompts(9, seed=7) + [list(range(1, 90)), [7] * 70]  # two prompts longer than the 64-token bucket
    params = [SamplingParams(max_tokens=50 if i == 1 else 6 + 4 * i, **GREEDY) for i in range(len(ps))]
    params[3] = SamplingParams(max_tokens=30, stop=("e",), **GREEDY)
    params[4] = SamplingParams(max_tokens=25, temperature=0.9, seed=4)
    eager = Scheduler(m, TOK, SchedulerConfig(slots=4, mode="eager", sync_every=4, pipeline=True, dtype="float32"))
    fast = Scheduler(m, TOK, SchedulerConfig(slots=4, mode="fast", sync_every=4, dtype="float32", kernels=kernels,
                                             prefill_graphs=True))
    assert fast.batch.fresh is not None and fast.batch.fresh.graphs
    assert _staggered(fast, ps, params, per_step=3) == _staggered(eager, ps, params, per_step=3)
    fresh = fast.batch.fresh
    assert fresh.rows_run >= len(ps) - 1 and fresh.runs < fresh.rows_run  # every prompt (but the cancelled), grouped
    assert fast.counters["moves"] > 0  # and a row moved down to a smaller bucket between graphed chunks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_stream_overlaps_and_matches_eager():
    """Prefill replays on a second stream (experimental `prefill_stream`): long generations first,
    then short prompts into the slots they free, some while a chunk runs over those slots (a replay
    beside the chunk when its rows' junk cannot reach the prompt's positions, after it otherwise):
    eager decoding's tokens exactly (fp32), and both kinds of replay happened."""
    dev = torch.device("cuda")
    m = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256, device=dev, seed=3)
    ps = [[1 + i, 2, 3, 4, 5] for i in range(4)] + prompts(8, seed=8)
    params = [SamplingParams(max_tokens=80 + 9 * i, **GREEDY) for i in range(4)]
    params += [SamplingParams(max_tokens=12 + 3 * i, **GREEDY) if i % 3 else
               SamplingParams(max_tokens=20, temperature=0.8, seed=i) for i in range(8)]
    eager = Scheduler(m, None, SchedulerConfig(slots=4, mode="eager", sync_every=4, pipeline=True, dtype="float32"))
    fast = Scheduler(m, None, SchedulerConfig(slots=4, mode="fast", sync_every=4, dtype="float32", prefill_stream=True))
    side = fast.batch.side
    assert side is not None
    assert _staggered(fast, ps, params, cancel_at=-1) == _staggered(eager, ps, params, cancel_at=-1)
    assert side.overlapped > 0 and side.waited > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_triton_whole_chunk_graphs_match_eager():
    """Triton buckets launch a whole chunk (steps, copies out and temperature sampling) as one
    graph: greedy and seeded temperature-only requests, staggered, give eager's tokens (fp32)."""
    dev = torch.device("cuda")
    m = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256, device=dev, seed=3)
    ps = prompts(7, seed=6)
    params = [SamplingParams(max_tokens=40 if i == 1 else 12 + 7 * i, **GREEDY) if i % 2 else
              SamplingParams(max_tokens=12 + 7 * i, temperature=0.8, seed=10 + i, stop_token_ids=()) for i in range(7)]
    eager = Scheduler(m, None, SchedulerConfig(slots=4, mode="eager", sync_every=4, pipeline=True, dtype="float32"))
    fast = Scheduler(m, None, SchedulerConfig(slots=4, mode="fast", sync_every=4, dtype="float32", kernels="triton"))
    assert {kind for _, kind in fast.batch.chunk_graphs} == {"greedy", "sample"}
    assert _staggered(fast, ps, params) == _staggered(eager, ps, params)
    assert fast.batch.whole_chunks > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_scheduler_seeded_sampling_independent_of_batch_mates():
    """On CUDA in fp32 a seeded request draws the same tokens alone and in a batch (the noise is
    keyed by seed, sample and position; the logits of a row do not depend on its batch-mates
    beyond rounding, which this test shows does not flip a draw here; in bf16 it may)."""
    dev = torch.device("cuda")
    m = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=265, seq_len=256, device=dev, seed=3)
    p = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=77, n=2)
    solo = Scheduler(m, None, SchedulerConfig(slots=8, dtype="float32"))
    h = solo.submit([1, 2, 3], p)
    solo.run_until_idle()
    want = [x.tokens for x in h.result().samples]
    s = Scheduler(m, None, SchedulerConfig(slots=8, dtype="float32"))
    for i in range(5):
        s.submit([9] * (i + 2), SamplingParams(max_tokens=50, temperature=0.9, seed=i))
    s.step()
    h = s.submit([1, 2, 3], p)
    s.run_until_idle()
    assert [x.tokens for x in h.result().samples] == want


def test_scattered_slots_prefill_and_n_samples(model):
    """Requests admitted together into non-adjacent free slots (gathered prefill) and a request
    with n = 2 whose prompt is copied to a second slot decode as they do alone."""
    p = SamplingParams(max_tokens=9, **GREEDY)
    s = Scheduler(model, None, SchedulerConfig(slots=6, sync_every=2))
    a = s.submit([1, 2, 3], SamplingParams(max_tokens=30, **GREEDY))
    b_ = s.submit([4, 5], SamplingParams(max_tokens=1, **GREEDY))  # leaves slot 1 free at once
    c = s.submit([6, 7, 8, 9], SamplingParams(max_tokens=30, **GREEDY))
    s.step()
    assert b_.done and s.stats()["slots_used"] == 2
    d = s.submit(list(range(10, 22)), p)  # slot 1
    e = s.submit([30, 31, 32, 33, 34], SamplingParams(max_tokens=9, n=2, **GREEDY))  # slots 3, 4
    s.step()
    assert s.batch.bound[1] > 0 and s.batch.bound[3] > 0
    s.run_until_idle()
    for h, prompt, params in ((a, [1, 2, 3], SamplingParams(max_tokens=30, **GREEDY)), (c, [6, 7, 8, 9],
                              SamplingParams(max_tokens=30, **GREEDY)), (d, list(range(10, 22)), p)):
        assert h.result().samples[0].tokens == alone(model, prompt, params)
    solo = alone(model, [30, 31, 32, 33, 34], p)
    assert [x.tokens for x in e.result().samples] == [solo, solo]


def test_cancel_while_waiting_on_a_tool_frees_the_slot():
    gate = threading.Event()

    def slow_tool(expr: str) -> str:
        gate.wait(5)
        return "9"

    table = {**chain(ord("="), PY_S, *b("1"), PY_E), **chain(OUT_E, A_END), **chain(*b("xyxyxy"))}
    s = Scheduler(MarkovModel(table), TOK, SchedulerConfig(slots=2, sync_every=2), tool_runner=slow_tool)
    calling = s.submit(b("="), SamplingParams(max_tokens=20, **GREEDY))
    other = s.submit(b("x"), SamplingParams(max_tokens=12, **GREEDY))
    for _ in range(4):
        s.step()
    assert any(x.state == "waiting" for x in s._rows.values())
    calling.cancel()
    s.step()
    assert s.stats()["slots_used"] == 1
    third = s.submit(b("x"), SamplingParams(max_tokens=4, **GREEDY))
    s.run_until_idle()
    gate.set()
    assert calling.result().samples[0].finish_reason == "cancelled"
    assert other.result().samples[0].tokens == b("yx" * 6)
    assert third.result().samples[0].tokens == b("yxyx")


def test_engine_runs_on_its_own_model_copy():
    """Engine prepares the model (dtype, fused q/k/v) once; its schedulers run that very copy."""
    from picochat.infer.engine import Engine

    m = random_model(seed=2)
    eng = Engine(m, None, dtype=torch.float64, fuse=True)
    assert eng.scheduler(3).model is eng.model and eng.scheduler(3).dtype == torch.float64
    out = eng.generate_batch([[1, 2, 3]], max_tokens=4, temperature=0)
    assert out == Engine(m, None).generate_batch([[1, 2, 3]], max_tokens=4, temperature=0)


def test_sample_rows_distribution_and_filters():
    from picochat.infer.sampling import sample_rows

    R = 4000
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(R, 1)
    keys = torch.full((R,), 12345, dtype=torch.long)
    pos = torch.arange(R)  # one stream, many positions: independent draws

    def draw(temp=1.0, k=0, p=1.0, **kw):
        return sample_rows(logits, torch.full((R,), temp), torch.full((R,), k, dtype=torch.long),
                           torch.full((R,), p), keys, pos, **kw)

    full = draw()
    assert set(full.tolist()) == {0, 1, 2, 3}
    freq = [(full == t).float().mean().item() for t in range(4)]
    assert all(abs(f - q) < 0.03 for f, q in zip(freq, (0.4, 0.3, 0.2, 0.1))), freq
    assert set(draw(k=2, top_k_max=2).tolist()) == {0, 1}
    assert set(draw(p=0.5, any_top_p=True).tolist()) == {0, 1}  # 0.4 < 0.5, so token 1 is still in
    assert draw(temp=0.0).tolist() == [0] * R
    assert torch.equal(draw(), full)  # the same (key, position) draws the same token


@pytest.mark.parametrize("sync_every,pipeline", [(1, False), (4, True)])
def test_rows_moved_down_to_a_smaller_bucket_decode_as_alone(model, sync_every, pipeline):
    """When the rows left would fit a smaller bucket than the slots they hold span (short requests
    in the low slots finished first), they move down into free slots (cache, position, next input,
    sampling settings copied on the device, the chunk in flight still read by the old slot): every
    request, greedy or seeded-sampled, still decodes exactly as alone; and the steps run over the
    smaller bucket."""
    ps = prompts(8, seed=3)
    params = [SamplingParams(max_tokens=3 + i % 4, **GREEDY) for i in range(5)]
    params += [SamplingParams(max_tokens=40, **GREEDY), SamplingParams(max_tokens=36, temperature=0.9, seed=5),
               SamplingParams(max_tokens=30, stop=("q",), **GREEDY)]
    solo = [alone(model, p, q, TOK) for p, q in zip(ps, params)]
    s = Scheduler(model, TOK, SchedulerConfig(slots=8, sync_every=sync_every, pipeline=pipeline))
    handles = [s.submit(p, q) for p, q in zip(ps, params)]
    buckets = []
    launch = s.batch.launch
    s.batch.launch = lambda bucket, *a, **k: buckets.append(bucket) or launch(bucket, *a, **k)
    s.run_until_idle()
    assert [h.result().samples[0].tokens for h in handles] == solo
    assert s.counters["moves"] >= 3 and min(buckets) <= 4
    off = Scheduler(model, TOK, SchedulerConfig(slots=8, sync_every=sync_every, pipeline=pipeline, compact=False))
    handles = [off.submit(p, q) for p, q in zip(ps, params)]
    off.run_until_idle()
    assert [h.result().samples[0].tokens for h in handles] == solo and off.counters["moves"] == 0


def test_finished_requests_are_delivered_first(model):
    """In a step where one request finishes and another gets tokens, the finished one's events are
    handed over first (its caller may send the next request before the loop admits again), though
    its row comes later in the batch."""
    s = Scheduler(model, None, SchedulerConfig(slots=2, sync_every=1))
    order = []
    handles = [s.submit([1, 2, 3], SamplingParams(max_tokens=n, **GREEDY)) for n in (10, 3)]
    for name, h in zip("BA", handles):
        push = h._push_many
        h._push_many = lambda events, push=push, name=name: order.append(
            (name, any(isinstance(e, DoneEvent) for e in events))) or push(events)
    s.run_until_idle()
    done_at = order.index(("A", True))
    assert order[done_at - 2:done_at] == [("B", False), ("A", False)]  # a step before: B (slot 0) first
    assert order[done_at + 1] == ("B", False)  # the finishing step: A's events, then B's
    assert [h.result().samples[0].finish_reason for h in handles] == ["length", "length"]
