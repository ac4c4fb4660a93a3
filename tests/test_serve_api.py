"""The OpenAI-compatible API through the real `openai` client against a live server on 127.0.0.1:
chat (stream and not), n > 1, stop strings, seeds, max_tokens, usage, log-probabilities equal to
the model's own, /v1/completions with echo, concurrency equal to one-at-a-time, tool-call markup."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from picochat.infer.scheduler import SchedulerConfig  # noqa: E402
from picochat.serve.protocol import assistant_parts  # noqa: E402

from serve_support import ScriptedModel, byte_tokenizer, random_model, script_tokens, serving  # noqa: E402

USER = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok.vocab_size, seq_len=128)


@pytest.fixture(scope="module")
def live(model, tok):
    with serving(model, tok, scheduler_config=SchedulerConfig(slots=8)) as (server, scheduler):
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from a plain forward of the model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_models_and_health(live, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["picochat-test"]
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_whole_and_stream_agree(client):
    whole = client.chat.completions.create(model="picochat-test", messages=USER, max_tokens=24, temperature=0.9,
                                           seed=11)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 1 <= whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="picochat-test", messages=USER, max_tokens=24,
                                                 temperature=0.9, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seed_reproducible_and_n_samples(client):
    def ask(seed, n=1):
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=16, temperature=1.0, seed=seed, n=n,
                                           extra_body={"ignore_eos": True})
        return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]

    assert ask(5) == ask(5)
    assert ask(5) != ask(6)
    three = ask(5, n=3)
    assert len(three) == 3 and len(set(three)) == 3  # independent samples
    assert three == ask(5, n=3)


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="m", messages=USER, max_completion_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7


def test_stop_string_cuts_text(client):
    full = client.chat.completions.create(model="m", messages=USER, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    visible = [c for c in full if c.isprintable() and c != "\ufffd"]
    assert len(visible) > 6, full
    stop = full[full.index(visible[5]):][:2]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=30, temperature=0, stop=[stop, "@@"],
                                           stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_chat_logprobs_are_the_models(client, model, tok):
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 10 and all(len(e.top_logprobs) == 3 for e in content)
    for e in content:  # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)
    # byte tokenizer: a token is its byte; the calculator's markers come back by name
    generated = [e.bytes[0] if len(e.bytes) == 1 else tok.special(e.token) for e in content]
    prompt = tok.render_for_completion(USER)
    ids = prompt + generated
    expected = own_logprobs(model, ids)[len(prompt) - 1:]
    assert [e.logprob for e in content] == pytest.approx(expected.tolist(), abs=1e-4)


def test_completions_echo_logprobs_equal_the_models(client, model, tok):
    prompt = "The cat sat"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    ids = tok.encode(prompt, prepend_bos=True)
    expected = own_logprobs(model, ids)
    assert "".join(lp.tokens[:len(prompt)]) == prompt
    assert lp.token_logprobs[:len(prompt)] == pytest.approx(expected.tolist(), abs=1e-4)
    assert lp.text_offset[:3] == [0, 1, 2]
    assert len(lp.tokens) == len(prompt) + 4 and all(len(t) <= 2 for t in lp.top_logprobs)

    # prompt scoring only (likelihood harnesses): max_tokens 0, token ids in, a logprob per token
    r = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].logprobs.token_logprobs[0] is None
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_completions_stream_and_several_prompts(client):
    r = client.completions.create(model="m", prompt=["one", "two"], max_tokens=5, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: both samples agree
    chunks = list(client.completions.create(model="m", prompt="one", max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_index[0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_greedy_equals_one_at_a_time(client):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(64)]

    def ask(p):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_tool_calls_appear_inline_and_round_trip(tok):
    """A scripted model calls the calculator: clients see the call and its output inline, the same
    streamed and whole, and the markup sent back is rendered as the tool structure again."""
    script = script_tokens(tok, ["The answer: ", "<|python_start|>", "6*7", "<|python_end|>", " so."])
    model = ScriptedModel(script, tok.vocab_size, seq_len=256)
    with serving(model, tok) as (server, _):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=60, temperature=0)
        content = r.choices[0].message.content
        assert "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>" in content
        chunks = client.chat.completions.create(model="m", messages=USER, max_tokens=60, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    parts = assistant_parts("x <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> y")
    assert parts == [{"type": "text", "text": "x "}, {"type": "python", "text": "6*7"},
                     {"type": "python_output", "text": "42"}, {"type": "text", "text": " y"}]
    history = USER + [{"role": "assistant", "content": "<|python_start|>1+1<|python_end|><|output_start|>2"
                                                      "<|output_end|>"}, {"role": "user", "content": "ok"}]
    ids = tok.render_for_completion([{**m, "content": assistant_parts(m["content"])} if m["role"] == "assistant"
                                     else m for m in history])
    assert tok.special("<|python_start|>") in ids and tok.special("<|output_start|>") in ids
    assert json.dumps(history)  # plain JSON: what a client stores and sends back


def test_event_batches_lose_no_wakeup():
    """Events pushed from another thread at any moment reach the asyncio reader, batched, in order,
    with one wake-up per batch rather than per event (the server reads handles this way)."""
    import asyncio
    import random
    import threading
    import time

    from picochat.infer.request import DoneEvent, RequestHandle, SamplingParams, TokenEvent, Usage

    async def run() -> tuple[list[int], int]:
        handle = RequestHandle([1], SamplingParams())
        rng = random.Random(0)

        def produce():
            for i in range(3000):
                handle._push(TokenEvent(0, i, "x", "text", True))
                if rng.random() < 0.02:
                    time.sleep(rng.random() * 0.002)
            handle._push(DoneEvent(Usage(1, 3000)))

        thread = threading.Thread(target=produce)
        thread.start()
        seen, batches = [], 0
        async for batch in handle.aevent_batches():
            batches += 1
            seen += [e.token for e in batch if isinstance(e, TokenEvent)]
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        thread.join()
        return seen, batches

    seen, batches = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert seen == list(range(3000)) and batches < 3000
