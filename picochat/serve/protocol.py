"""OpenAI request shapes: validation (a 400 naming the field), errors, and conversion to the decode loop.

`ChatCompletionRequest` and `CompletionRequest` are the bodies of `/v1/chat/completions` and
`/v1/completions` (unknown fields are ignored; picochat's extensions are marked). `chat_job` and
`completion_jobs` turn a validated body into prompt token ids and a `SamplingParams` for the
scheduler, so everything the core refuses is refused here first with the field's name, and the API
layer never builds sampling parameters itself.

Tool calls: the model calls its calculator as `<|python_start|>expr<|python_end|>` and the server
forces `<|output_start|>result<|output_end|>` in. Clients see those markers inline in the assistant's
`content` (see `responses.MARKERS`); an earlier assistant message sent back with the same markers is
rendered with the tool structure again, so a multi-turn chat keeps what the model saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..infer.request import RequestError, SamplingParams
from ..tokenizer import ConversationError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    # strict: "1" is not a number and true is not an integer; unknown fields are ignored (OpenAI's SDKs
    # send fields this server does not use, such as presence_penalty or user)
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="a string, or a list of {type: 'text', text} parts")

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError("content must be a string or a non-empty list of {\"type\": \"text\", \"text\": ...} parts")


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, description="default 1.0; 0 = greedy")
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="picochat extension: keep the k most likely tokens "
                                                       "(0 or -1: no filtering)")
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="picochat extension (as vLLM): do not stop at the end-of-turn "
                                                "token (benchmarks use it for fixed output lengths)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def stop_tuple(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of token-id lists")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def token_list(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or token_list(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(v, str) for v in value)
                                                  or all(token_list(v) for v in value)):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists")


# ---------------------------------------------------------------------------------------------------
# conversion to what the scheduler takes


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's own bounds, on top of the model's context)."""

    max_n: int = 16
    max_tokens: int | None = None  # a cap on max_tokens (None: the context is the only bound)
    max_prompts: int = 64  # prompts in one /v1/completions request


@dataclass(frozen=True)
class Job:
    """One scheduler submission: prompt ids and sampling parameters, plus what the answer includes."""

    prompt: list[int]
    params: SamplingParams
    generate: bool = True  # False: /v1/completions with echo and max_tokens 0 (score the prompt only)
    echo: bool = False  # /v1/completions: return the prompt (and its log-probabilities) first
    skip_first: bool = False  # the prompt starts with a <|bos|> the server added: not echoed back


def _sampling_params(body: _Sampling, max_tokens: int | None, logprobs: int | None, tools: bool,
                     limits: Limits) -> SamplingParams:
    if body.n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n} on this server (got {body.n})", "n")
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens must be at most {limits.max_tokens} on this server (got {max_tokens})",
                          "max_tokens")
    top_k = body.top_k if body.top_k not in (None, 0, -1) else None
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else float(body.temperature),
            top_k=top_k, top_p=None if body.top_p is None else float(body.top_p), seed=body.seed, n=body.n,
            stop=body.stop_tuple(), stop_token_ids=() if body.ignore_eos else None, logprobs=logprobs,
            tools=tools)
    except RequestError as e:
        raise bad_request(str(e), e.param) from e


_MARKUP = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


def assistant_parts(content: str) -> str | list[dict]:
    """An assistant message's content with inline tool markers turned back into tokenizer parts."""
    parts, at = [], 0
    for m in _MARKUP.finditer(content):
        if m.start() > at:
            parts.append({"type": "text", "text": content[at:m.start()]})
        kind, text = ("python", m.group(1)) if m.group(1) is not None else ("python_output", m.group(2))
        parts.append({"type": kind, "text": text})
        at = m.end()
    if not parts:
        return content
    if at < len(content):
        parts.append({"type": "text", "text": content[at:]})
    return parts


def chat_job(body: ChatCompletionRequest, tokenizer, limits: Limits) -> Job:
    messages = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": assistant_parts(m.content) if role == "assistant" else m.content})
    try:
        prompt = tokenizer.render_for_completion(messages)
    except ConversationError as e:
        raise bad_request(str(e), "messages") from e
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens == 0:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    return Job(prompt, _sampling_params(body, max_tokens, logprobs, tools=True, limits=limits))


def completion_jobs(body: CompletionRequest, tokenizer, limits: Limits, vocab_size: int) -> list[Job]:
    """One job per prompt. With max_tokens 0 (only sensible with echo) nothing is generated: the
    jobs carry max_tokens=None and the caller skips the scheduler."""
    p = body.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompts) > limits.max_prompts:
        raise bad_request(f"at most {limits.max_prompts} prompts per request (got {len(prompts)})", "prompt")
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 returns nothing unless echo is true", "max_tokens")
    params = _sampling_params(body, max_tokens or None, body.logprobs, tools=False, limits=limits)
    jobs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            # text prompts start a document, as in pretraining: the model sees <|bos|> first, and
            # every token of the text gets a log-probability
            ids, added_bos = tokenizer.encode(prompt, prepend_bos=True), True
        else:
            bad = [t for t in prompt if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
            ids, added_bos = list(prompt), False
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        jobs.append(Job(ids, params, generate=max_tokens > 0, echo=body.echo, skip_first=added_bos))
    return jobs
