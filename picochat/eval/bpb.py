"""Bits per byte: the measure itself, the held-out batches it is taken on, and a run's checkpoint
measured on demand.

Independent of the tokenizer (cross-entropy over the UTF-8 bytes the predicted tokens stand for), so
base models with different vocabularies compare. Training logs its validation with `evaluate_bpb` on
`bpb_batches` from here (train imports eval.bpb, never the other way round), so `picochat eval --bpb`
reproduces the figure the training log shows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..common import autocast
from ..config import DataConfig


def evaluate_bpb(model, batches: Iterator[dict], token_bytes: torch.Tensor, device: torch.device) -> float:
    """Bits per byte: summed cross-entropy (nats) over the byte length of the predicted tokens.
    Independent of the vocabulary, so runs with different tokenizers compare. Specials count 0 bytes
    and are left out."""
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x, y = batch["inputs"].to(device), batch["targets"].to(device)
            with autocast(device):
                losses = model(x, y, loss_reduction="none").view(-1)
            y = y.view(-1)
            nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)
            keep = nbytes > 0
            total_nats += (losses.double() * keep).sum()
            total_bytes += nbytes.double().sum()
    model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (total_nats, total_bytes):
            torch.distributed.all_reduce(t)
    return (total_nats / (math.log(2) * total_bytes.clamp(min=1))).item()


def bpb_batches(source, tokenizer, seq_len: int, max_tokens: int, device: torch.device, rank: int = 0,
                world_size: int = 1) -> Iterator[dict]:
    """The fixed held-out batches validation bits-per-byte is measured on (8 rows on CUDA, 4
    elsewhere; `max_tokens` over all ranks): training's log and `picochat eval --bpb` share them."""
    from ..data.loader import val_batches

    B = 8 if device.type == "cuda" else 4
    n = max(1, max_tokens // (B * seq_len * world_size))
    for x, y in val_batches(source, tokenizer, B, seq_len, n, rank, world_size, device):
        yield {"inputs": x, "targets": y}


def evaluate_run_bpb(run: str, stage: str | None, data: DataConfig, max_tokens: int = 2**20,
                     device: str = "auto") -> dict:
    """On training's own validation batches, so with the same token budget this reproduces the
    validation figure the training log shows."""
    from ..common import detect_device
    from ..data.sources import open_source
    from ..runs import load_model

    dev = detect_device(device)
    model, tokenizer, meta = load_model(run, stage, dev)
    tokens = 0

    def counted():
        nonlocal tokens
        for batch in bpb_batches(open_source(data), tokenizer, model.config.seq_len, max_tokens, dev):
            tokens += batch["inputs"].numel()
            yield batch

    token_bytes = torch.tensor(tokenizer.token_byte_lengths, device=dev)
    bpb = evaluate_bpb(model, counted(), token_bytes, dev)
    return {"stage": meta["stage"], "step": meta.get("step"), "path": meta["path"], "val_bpb": bpb,
            "source": data.source, "max_tokens": tokens}
