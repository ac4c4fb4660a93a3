"""OpenAI response shapes: a sample's text as it streams, log-probabilities, chunks and SSE framing.

`SampleText` turns a sample's `TokenEvent`s into the text a client sees: the text deltas the
scheduler decoded, the calculator's markers inline (`MARKERS`), and stop strings cut off (text that
could be the start of a stop string is held back until it cannot be). Streamed deltas and the
non-streamed `content` come from the same object, so they are equal by construction.
"""

from __future__ import annotations

import json
import time
import uuid

from ..infer.request import TokenEvent

# special tokens shown to clients, inline in the text: the model's calculator calls and their outputs
MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


def marker_ids(tokenizer) -> dict[int, str]:
    return {tokenizer.special(name): name for name in MARKERS}


class SampleText:
    """One sample's visible text, released as it becomes safe to show."""

    def __init__(self, markers: dict[int, str], stops: tuple[str, ...] = ()):
        self.markers, self.stops = markers, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars that may start a stop string
        self.text = ""  # everything seen so far (after a stop string: up to it)
        self.released = 0  # how much of `text` was handed out
        self.stopped = False  # a stop string was seen: further tokens are ignored

    def token_text(self, event: TokenEvent) -> str:
        return self.markers.get(event.token, event.text)

    def add(self, event: TokenEvent) -> str:
        """Feed one token; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        piece = self.token_text(event)
        if not piece:
            return ""
        self.text += piece
        if self.stops:
            start = max(0, self.released - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self._release(len(self.text))
            return self._release(len(self.text) - self.hold)
        return self._release(len(self.text))

    def finish(self) -> str:
        """The sample ended: whatever was held back is safe now."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        out, self.released = self.text[self.released:end], end
        return out


# ---------------------------------------------------------------------------------------------------
# log-probabilities


def token_string(tokenizer, token: int, markers: dict[int, str]) -> str:
    if token in markers:
        return markers[token]
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def chat_logprob(tokenizer, markers: dict[int, str], event: TokenEvent) -> dict:
    """One entry of `choices[i].logprobs.content` (forced tool-output tokens have logprob null)."""

    def entry(token: int, logprob: float | None) -> dict:
        text = token_string(tokenizer, token, markers)
        return {"token": text, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    out = entry(event.token, event.logprob if event.sampled else None)
    out["top_logprobs"] = [entry(t, lp) for t, lp in (event.top_logprobs or ())]
    return out


class CompletionLogprobs:
    """`choices[i].logprobs` of /v1/completions: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer, markers: dict[int, str], offset: int = 0):
        self.tokenizer, self.markers, self.offset = tokenizer, markers, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def add(self, token: int, logprob: float | None, top: tuple[tuple[int, float], ...] | None,
            text: str | None = None) -> None:
        s = token_string(self.tokenizer, token, self.markers)
        self.tokens.append(s)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else
                                 {token_string(self.tokenizer, t, self.markers): lp for t, lp in top})
        self.text_offset.append(self.offset)
        self.offset += len(s if text is None else text)

    def take(self) -> dict:
        """What was added since the last take (streaming sends each piece once)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


# ---------------------------------------------------------------------------------------------------
# response objects


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return out


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = None
    return out


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
