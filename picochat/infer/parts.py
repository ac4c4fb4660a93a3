"""The one reader of a generated token stream: token ids -> message parts and text.

The model writes plain text, tool calls (`<|python_start|> expr <|python_end|>`) and is given tool
outputs (`<|output_start|> result <|output_end|>`). `MessageParser` follows that protocol token by
token and says, for each token, which part it belongs to, the UTF-8-safe text it adds and, on the
token that closes a call, the call's expression. The scheduler (to run tools and label events), the
chat CLI (to render calls), the server and RL all read the stream through it, so the protocol is
decoded in one place. `StopMatcher` finds stop strings in the text and holds back text that may be
the start of one, so a stop string never reaches the reader. `to_content` turns (part, text) runs
into a conversation message's content as the tokenizer renders it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from .request import Part, frozen_instance

# the tokenizer's conversation format names the parts differently (tokenizer.render_conversation)
CONTENT_TYPES: dict[str, str] = {"text": "text", "tool_call": "python", "tool_output": "python_output"}


@dataclass(frozen=True)
class Piece:
    """What one token adds to the message."""

    part: Part
    text: str  # "" for markers, special tokens and bytes of an incomplete character
    tool_call: str | None = None  # the call's expression, on the token that closes it


_NO_TEXT = Piece("text", "")  # every token's piece without a tokenizer (made once: this runs per token)
_SPECIAL = Piece("special", "")


def _piece(part: Part, text: str) -> Piece:
    """`Piece(part, text)` through `frozen_instance` (this runs per token)."""
    return frozen_instance(Piece, {"part": part, "text": text, "tool_call": None})


class MessageParser:
    """Follows the tool protocol over one sample's generated tokens. Without a tokenizer every
    token is plain text with no text."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        special = (lambda name: tokenizer.special(name)) if tokenizer is not None else (lambda name: None)
        self._opens = {special("<|python_start|>"): "tool_call", special("<|output_start|>"): "tool_output"}
        self._closes = {special("<|python_end|>"): "tool_call", special("<|output_end|>"): "tool_output"}
        self._opens.pop(None, None)
        self._closes.pop(None, None)
        self.part: Part = "text"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._call: list[int] = []
        if tokenizer is not None:  # bound once: feed runs per token
            self._is_special, self._token_bytes = tokenizer.is_special, tokenizer.token_bytes
            self._decode = self._decoder.decode

    def feed(self, token: int) -> Piece:
        tok = self.tokenizer
        if tok is None:
            return _NO_TEXT
        opened = self._opens.get(token)
        if opened is not None and self.part == "text":
            tail = self._flush()
            self.part, self._call = opened, []
            return Piece("text", tail) if tail else Piece(opened, "")
        closed = self._closes.get(token)
        if closed is not None and self.part == closed:
            tail = self._flush()
            self.part = "text"
            call = tok.decode(self._call) if closed == "tool_call" else None
            return Piece(closed, tail, call)
        if self._is_special(token):
            return _SPECIAL
        part = self.part
        if part == "tool_call":
            self._call.append(token)
        return _piece(part, self._decode(self._token_bytes(token)))

    def _flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def finish(self) -> str:
        """Text still held back at the end (bytes of an incomplete character, as U+FFFD)."""
        return self._flush() if self.tokenizer is not None else ""


class StopMatcher:
    """Stop strings over a sample's text: `feed(text)` returns (text safe to release, matched).
    Text that could be the beginning of a stop string is held until it is known not to be one;
    on a match, the text before the stop string is released and the rest dropped."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = 0  # the longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Release what is held (the sample ended without a match)."""
        held, self._held = self._held, ""
        return held


def to_content(parts: list[tuple[str, str]]) -> str | list[dict]:
    """(part, text) runs -> an assistant message's content: a string when it is all text, else
    the tokenizer's list of {"type": text | python | python_output, "text"} parts."""
    runs = [(CONTENT_TYPES[p], t) for p, t in parts if p in CONTENT_TYPES]
    if all(kind == "text" for kind, _ in runs):
        return "".join(t for _, t in runs)
    merged: list[dict] = []
    for kind, text in runs:
        if merged and merged[-1]["type"] == kind:
            merged[-1]["text"] += text
        else:
            merged.append({"type": kind, "text": text})
    return merged
