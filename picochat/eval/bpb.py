"""Bits per byte of a run's checkpoint on the held-out split of a text source.

Independent of the tokenizer (cross-entropy over the UTF-8 bytes the predicted tokens stand for), so
base models with different vocabularies compare. The numbers are the same `evaluate_bpb` that training
logs as validation, computed here for any stage's checkpoint on demand."""

from __future__ import annotations

import torch

from ..config import DataConfig


def evaluate_run_bpb(run: str, stage: str | None, data: DataConfig, max_tokens: int = 2**20,
                     device: str = "auto") -> dict:
    """On training's own validation batches, so with the same token budget this reproduces the
    validation figure the training log shows."""
    from ..common import detect_device
    from ..data.sources import open_source
    from ..runs import load_model
    from ..train.loop import bpb_batches, evaluate_bpb

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
