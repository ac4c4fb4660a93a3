"""Batched likelihood scoring: how well a model predicts given continuations of given contexts.

A `Scored` row is one token sequence (BOS, context, continuation) and the span `[start, end)` of the
continuation inside it. `score_rows` runs many rows per forward pass (all items and all their
options at once), sorted by length and right-padded to a few fixed shapes (so a compiled model on
CUDA compiles a handful of graphs, not one per item), and returns for each row the mean
cross-entropy over its continuation tokens and whether every continuation token was the greedy
argmax. Right padding is harmless: attention is causal, so pads never influence earlier positions.

`mode="eager"` is the baseline (each group of rows, e.g. one item's options, as its own unpadded
forward, the way a per-item loop runs); both modes give the same numbers up to float rounding.

`letter_choice` is the chat-model counterpart: the next-token logits after each prompt, restricted
to the allowed answer letters, batched the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common import autocast

LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Scored:
    tokens: tuple[int, ...]
    start: int  # first continuation token (>= 1: some token must precede it)
    end: int  # one past the last continuation token

    def __post_init__(self) -> None:
        if not 1 <= self.start < self.end <= len(self.tokens):
            raise ValueError(f"continuation span [{self.start}, {self.end}) invalid for {len(self.tokens)} tokens")


@dataclass(frozen=True)
class RowScore:
    mean_loss: float
    greedy: bool  # every continuation token is the model's argmax


def bucket_length(n: int, limit: int) -> int:
    """The padded length for a row of n tokens: the next bucket, never past the model's limit."""
    for b in LENGTH_BUCKETS:
        if n <= b:
            return min(b, limit)
    return limit


def _batches(lengths: list[int], limit: int, batch_tokens: int, full_rows: bool = False
             ) -> list[tuple[list[int], int, int]]:
    """Row indices grouped by length bucket: (rows, padded length, padded row count). `full_rows`
    pads every batch to the bucket's full row count (one shape per length bucket: what a compiled
    model wants); otherwise to the next power of two (less work for the last batch on a CPU)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = []
    i = 0
    while i < len(order):
        length = bucket_length(lengths[order[i]], limit)
        rows_per = max(1, batch_tokens // length)
        group = []
        while i < len(order) and len(group) < rows_per and bucket_length(lengths[order[i]], limit) == length:
            group.append(order[i])
            i += 1
        padded = rows_per if full_rows else min(rows_per, 1 << (len(group) - 1).bit_length())
        out.append((group, length, padded))
    return out


@torch.no_grad()
def _score_batch(model, rows: Sequence[Scored], length: int, padded_rows: int, device: torch.device,
                 pad_id: int) -> list[RowScore]:
    idx = torch.full((padded_rows, length), pad_id, dtype=torch.long)
    targets = torch.full((padded_rows, length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        toks = torch.tensor(row.tokens, dtype=torch.long)
        idx[r, :len(toks)] = toks
        # position p predicts token p + 1: the continuation is predicted from positions start-1 .. end-2
        targets[r, row.start - 1:row.end - 1] = toks[row.start:row.end]
    idx, targets = idx.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    with autocast(device):
        logits = model(idx)
    logits = logits.float()
    mask = targets >= 0
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction="none")
    loss = loss.view(targets.shape)
    mean = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    hits = ((logits.argmax(-1) == targets) | ~mask).all(1)
    mean, hits = mean.tolist(), hits.tolist()
    return [RowScore(mean[r], bool(hits[r])) for r in range(len(rows))]


def score_rows(model, rows: Sequence[Scored], *, device: torch.device | None = None, batch_tokens: int = 8192,
               pad_id: int = 0, mode: str = "batched", groups: Sequence[int] | None = None) -> list[RowScore]:
    """Score every row (see the module docstring). `groups` (eager mode): the number of consecutive
    rows that form one forward pass, e.g. the options of one item; default one row per pass."""
    if mode not in ("batched", "eager"):
        raise ValueError(f"mode must be 'batched' or 'eager', got {mode!r}")
    device = device or next(model.parameters()).device
    limit = model.config.seq_len
    too_long = [len(r.tokens) for r in rows if len(r.tokens) > limit]
    if too_long:
        raise ValueError(f"a row of {too_long[0]} tokens exceeds the model's context of {limit}: crop it first")
    out: list[RowScore | None] = [None] * len(rows)
    if mode == "eager":
        pos = 0
        for size in groups or [1] * len(rows):
            chunk = rows[pos:pos + size]
            width = max(len(r.tokens) for r in chunk)
            for k, s in enumerate(_score_batch(model, chunk, width, len(chunk), device, pad_id)):
                out[pos + k] = s
            pos += size
        return out  # type: ignore[return-value]
    full = device.type == "cuda"
    for group, length, padded in _batches([len(r.tokens) for r in rows], limit, batch_tokens, full):
        scores = _score_batch(model, [rows[i] for i in group], length, padded, device, pad_id)
        for i, s in zip(group, scores):
            out[i] = s
    return out  # type: ignore[return-value]


@torch.no_grad()
def letter_choice(model, prompts: Sequence[Sequence[int]], letter_ids: Sequence[Sequence[int]], *,
                  device: torch.device | None = None, batch_tokens: int = 8192, pad_id: int = 0) -> list[int]:
    """For each prompt, the index of the allowed letter whose token has the highest next-token logit
    (`letter_ids[i]`: the token of each letter allowed for prompt i)."""
    device = device or next(model.parameters()).device
    limit = model.config.seq_len
    prompts = [list(p)[-limit:] for p in prompts]  # the question's end matters most: crop from the left
    out: list[int] = [0] * len(prompts)
    for group, length, padded in _batches([len(p) for p in prompts], limit, batch_tokens, device.type == "cuda"):
        idx = torch.full((padded, length), pad_id, dtype=torch.long)
        last = torch.zeros(padded, dtype=torch.long)
        for r, i in enumerate(group):
            idx[r, :len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long)
            last[r] = len(prompts[i]) - 1
        with autocast(device):
            logits = model(idx.to(device), logits_at=last.to(device))[:, 0].float()
        for r, i in enumerate(group):
            allowed = torch.tensor(list(letter_ids[i]), dtype=torch.long, device=logits.device)
            out[i] = int(logits[r, allowed].argmax())
    return out
