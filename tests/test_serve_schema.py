"""A bounded schemathesis run over the server's own OpenAPI schema, against a live server: whatever
the generated request, the answer is 2xx or 4xx in OpenAI's error shape, and the server stays up."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from picochat.infer.scheduler import SchedulerConfig  # noqa: E402
from picochat.serve.config import ServeConfig  # noqa: E402

from serve_support import byte_tokenizer, random_model, serving  # noqa: E402


@pytest.fixture(scope="module")
def live():
    tok = byte_tokenizer()
    model = random_model(tok.vocab_size, seq_len=48)  # a small context bounds every generated request
    with serving(model, tok, ServeConfig(max_n=4), SchedulerConfig(slots=8)) as (server, _):
        yield server


def test_every_answer_is_2xx_or_4xx(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/health"}
    seen: list[tuple[str, int]] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(case):
            response = case.call(timeout=60)
            seen.append((case.path, response.status_code))
            assert response.status_code < 500 or (case.path == "/health" and response.status_code == 503), \
                (case.path, response.status_code, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert "Traceback" not in response.text

        check()
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
    for path in ("/v1/chat/completions", "/v1/completions"):  # the generated bodies reach generation too
        assert (path, 200) in seen and (path, 400) in seen
