"""Sampling the next token and streaming text: pieces of generation that need no model.

`sample_next` turns logits into tokens without a host sync (greedy, temperature, top-k, top-p, each
row independent); `StreamDecoder` turns token ids into text as it becomes complete UTF-8.
"""

from __future__ import annotations

import codecs

import torch


# ---------------------------------------------------------------------------------------------------
# sampling


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(R, V) float logits -> (R,) token ids, each row independent. No host sync anywhere."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass strictly before it exceeds top_p; the top token always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # Exponential race (= Gumbel-max): argmax(p / E) with E ~ Exp(1) is a draw from p. Unlike
    # torch.multinomial it never syncs with the host, so it can sit between graph replays.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------
# streaming text


class StreamDecoder:
    """Token ids -> text as it becomes complete UTF-8: a character split across tokens is held back
    until its last byte arrives. Special tokens give "" unless `show_special`."""

    def __init__(self, tokenizer, show_special: bool = False):
        self.tokenizer, self.show_special = tokenizer, show_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.tokenizer.is_special(token_id) and not self.show_special:
            return ""
        return self._dec.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
