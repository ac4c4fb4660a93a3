"""Every way a request can fail, against a live server: 400s naming the field (and the token counts
on context overflow), 413, 503 with Retry-After (queue full, model loading), 401 with /health
public, malformed bodies never giving a 500, a client that disconnects mid-stream freeing its slot,
and /metrics as Prometheus text."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from picochat.infer.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from picochat.serve.api import attach, create_app  # noqa: E402
from picochat.serve.config import ServeConfig  # noqa: E402
from picochat.serve.generation import Backend  # noqa: E402

from serve_support import (LiveServer, ScriptedModel, byte_tokenizer, parse_prometheus, random_model,  # noqa: E402
                           script_tokens, serving, wait_until)

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def live(tok):
    model = random_model(tok.vocab_size, seq_len=128)
    cfg = ServeConfig(max_body_bytes=4096, max_n=4)
    with serving(model, tok, cfg, SchedulerConfig(slots=4)) as (server, scheduler):
        yield server


def post(live, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(live.url + path, content=data, headers={"content-type": "application/json", **kw.pop(
        "headers", {})}, timeout=30, **kw)


def assert_error(r, status, param=None, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    return err


def test_context_overflow_names_the_counts(live, tok):
    prompt_tokens = len(tok.render_for_completion(USER))
    r = post(live, CHAT, {"messages": USER, "max_tokens": 200})
    err = assert_error(r, 400, "max_tokens", "context of 128", f"{prompt_tokens} tokens", "max_tokens 200")
    assert err["code"] == "context_length_exceeded"
    long = [{"role": "user", "content": "x" * 300}]
    assert_error(post(live, CHAT, {"messages": long}), 400, "messages", "context of 128")
    assert_error(post(live, "/v1/completions", {"prompt": "y" * 300}), 400, "prompt", "context of 128")
    scoring_only = {"prompt": "y" * 300, "max_tokens": 0, "echo": True, "logprobs": 1}
    assert_error(post(live, "/v1/completions", scoring_only), 400, "prompt", "301 tokens", "context of 128")


@pytest.mark.parametrize("change,param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # above this server's limit of 4
    ({"n": True}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_k": -5}, "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ({"stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
])
def test_invalid_parameters_name_the_field(live, change, param):
    assert_error(post(live, CHAT, {"messages": USER, **change}), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [99999]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "echo": 1}, "echo"),
])
def test_invalid_completion_requests(live, body, param):
    assert_error(post(live, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b"{", b"null"])
def test_malformed_bodies_are_400(live, raw):
    assert_error(post(live, CHAT, raw), 400, None)


def test_unknown_fields_are_ignored_and_unknown_routes_are_404(live):
    r = post(live, CHAT, {"messages": USER, "max_tokens": 2, "presence_penalty": 0.5, "user": "u", "whatever": [1]})
    assert r.status_code == 200
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(live.url + CHAT)
    assert r.status_code == 405 and "error" in r.json()


def test_body_over_the_limit_is_413(live):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(post(live, CHAT, big), 413, None, "4096 bytes")

    def chunked():  # no Content-Length: the limit must hold while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(live.url + CHAT, content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, None)
    assert httpx.get(live.url + "/health").status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["messages", "n", "temperature", "top_p", "top_k", "max_tokens", "stop",
                                        "seed", "stream", "logprobs", "top_logprobs", "prompt", "echo",
                                        "stream_options", "max_completion_tokens"]),
                       st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False)
                                    | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                                       "include_usage"]), inner, max_size=3),
                                    max_leaves=8), max_size=6),
       st.sampled_from([CHAT, "/v1/completions"]))
def test_random_bodies_never_500(live, body, path):
    r = post(live, path, body)
    assert r.status_code < 500 or r.status_code == 503, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text


def test_api_key(tok):
    model = random_model(tok.vocab_size, seq_len=64)
    with serving(model, tok, ServeConfig(api_key="s3cret")) as (server, _):
        ok = {"messages": USER, "max_tokens": 2}
        assert_error(post(server, CHAT, ok), 401, None, "API key")
        assert_error(post(server, CHAT, ok, headers={"authorization": "Bearer wrong"}), 401, None)
        assert_error(post(server, CHAT, b"not even json"), 401, None)  # the key is checked first
        assert post(server, CHAT, ok, headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert httpx.get(server.url + "/").status_code == 200


def test_health_is_503_while_loading(tok):
    app = create_app(ServeConfig())
    with LiveServer(app) as server:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        assert_error(post(server, CHAT, {"messages": USER}), 503, None, "loading")
        model = random_model(tok.vocab_size, seq_len=64)
        with Scheduler(model, tok, SchedulerConfig(slots=2)) as scheduler:
            attach(app, Backend(scheduler, tok, model, "late", scheduler.max_context))
            assert httpx.get(server.url + "/health").status_code == 200
            assert post(server, CHAT, {"messages": USER, "max_tokens": 2}).status_code == 200


def slow_model(tok, delay=0.03):
    return ScriptedModel(script_tokens(tok, ["abcdefghij"]), tok.vocab_size, seq_len=512, delay=delay)


def test_queue_full_is_503_with_retry_after(tok):
    cfg = SchedulerConfig(slots=1, max_queue=1, sync_every=1)
    with serving(slow_model(tok), tok, ServeConfig(retry_after_s=2), cfg) as (server, scheduler):
        body = {"messages": USER, "max_tokens": 300, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", server.url + CHAT, json=body) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)
                assert wait_until(lambda: scheduler.stats()["running"] == 1)
                with c2.stream("POST", server.url + CHAT, json=body) as second:
                    assert second.status_code == 200
                    assert wait_until(lambda: scheduler.stats()["waiting"] == 1)
                    r = post(server, CHAT, body)
                    err = assert_error(r, 503, None, "busy")
                    assert r.headers["retry-after"] == "2" and err["code"] == "queue_full"
        assert wait_until(lambda: scheduler.stats()["slots_used"] == 0 and scheduler.stats()["waiting"] == 0)


def test_disconnect_mid_stream_frees_the_slot(tok):
    delay = 0.03
    with serving(slow_model(tok, delay), tok, None, SchedulerConfig(slots=2, sync_every=1)) as (server, scheduler):
        body = {"messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.url + CHAT, json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any('"content"' in line for line in got)
                assert scheduler.stats()["slots_used"] == 1
                closed = time.perf_counter()
        # nothing reads the stream any more: the server sees the disconnect and cancels
        assert wait_until(lambda: scheduler.stats()["slots_used"] == 0, timeout=5)
        freed_after = time.perf_counter() - closed
        assert freed_after < 1.0, freed_after
        metrics = parse_prometheus(httpx.get(server.url + "/metrics").text)
        assert metrics['picochat_request_finished_total{reason="cancelled"}'] == 1
        assert metrics["picochat_kv_slots_used"] == 0 and metrics["picochat_num_requests_running"] == 0


def test_metrics_are_prometheus_text(live):
    assert post(live, CHAT, {"messages": USER, "max_tokens": 3, "ignore_eos": True}).status_code == 200
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse_prometheus(r.text)
    for name in ("picochat_num_requests_running", "picochat_num_requests_waiting", "picochat_kv_slots_used",
                 "picochat_kv_slots_total", "picochat_prompt_tokens_total", "picochat_generation_tokens_total",
                 "picochat_time_to_first_token_seconds_count", "picochat_inter_token_latency_seconds_count",
                 "picochat_e2e_request_latency_seconds_count", 'picochat_request_finished_total{reason="length"}',
                 'picochat_request_finished_total{reason="stop"}'):
        assert name in m, name
    assert m["picochat_generation_tokens_total"] >= 3 and m["picochat_kv_slots_total"] == 4
    assert m["picochat_time_to_first_token_seconds_count"] >= 1
