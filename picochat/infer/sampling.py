"""Sampling the next token and streaming text: pieces of generation that need no model.

`sample_next` turns logits into tokens without a host sync (greedy, temperature, top-k, top-p, each
row independent, one shared generator); `sample_rows` does the same with settings per row and
counter-based noise keyed by (row key, position), so a seeded row draws the same tokens whatever
else shares the batch (the scheduler's sampler); `StreamDecoder` turns token ids into text as it
becomes complete UTF-8.
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


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow (two 16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" constants published by Chris Wellons), on int64
    tensors holding values in [0, 2^32): counter-based random numbers without a generator state."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """`mix32` of one Python int in [0, 2^32) (the same arithmetic mod 2^32, no tensors)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, sample: int) -> int:
    """The noise key of one sample of a seeded request: a 32-bit value from (seed, sample).
    Python ints, not tensors: it runs on the submitting thread for every sample (~60 us of tensor
    ops against ~1 us; `tests/test_scheduler_host.py` checks it equals `mix32` on tensors)."""
    x = (seed & _M32) ^ ((seed >> 32) & _M32) * 0x9E3779B1 & _M32
    return _mix32_int(_mix32_int(x) ^ (sample & _M32))


def gumbel_noise(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, V) standard Gumbel noise that depends only on each row's (key, position) and the token
    id: the same row draws the same noise in any batch, on any chunking of the decode loop."""
    row = mix32(keys ^ mix32((positions & _M32) ^ 0x5BD1E995))  # (R,)
    salt = mix32(torch.arange(vocab, device=keys.device, dtype=torch.long) + 0x27D4EB2F)  # (V,)
    bits = mix32(row[:, None] ^ salt[None, :])
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                keys: torch.Tensor, positions: torch.Tensor, *, top_k_max: int = 0,
                any_top_p: bool = False) -> torch.Tensor:
    """(R, V) logits -> (R,) tokens with per-row settings: `temperature` (R,) float (0 = greedy),
    `top_k` (R,) long (0 = off), `top_p` (R,) float (1 = off), noise keyed by `keys` and `positions`
    (R,) long. No host sync. The host says what the filters need: `top_k_max`, the largest top-k
    any row asks for (0: no row filters by top-k), and `any_top_p`."""
    greedy = logits.argmax(dim=-1)
    temp = temperature.to(logits.dtype)[:, None]
    scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp))
    V = logits.size(-1)
    if 0 < top_k_max:
        kmax = min(top_k_max, V)
        k = top_k.clamp(0, kmax)
        kth = torch.topk(scaled, kmax, dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
        keep = (scaled >= kth) | (k[:, None] == 0)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    if any_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass strictly before it exceeds top_p; the top token always stays
        drop = ((probs.cumsum(dim=-1) - probs) > top_p.to(probs.dtype)[:, None]) & (top_p < 1.0)[:, None]
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    noisy = scaled + gumbel_noise(keys, positions, V)
    return torch.where(temperature > 0, noisy.argmax(dim=-1), greedy)


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
