"""Bits per byte of a run's checkpoint on the held-out split of a text source.

Independent of the tokenizer (cross-entropy over the UTF-8 bytes the predicted tokens stand for), so
base models with different vocabularies compare. The numbers are the same `evaluate_bpb` that training
logs as validation, computed here for any stage's checkpoint on demand."""

from __future__ import annotations

import torch

from ..config import DataConfig


def evaluate_run_bpb(run: str, stage: str | None, data: DataConfig, max_tokens: int = 2**20,
                     batch_size: int | None = None, device: str = "auto") -> dict:
    """Batches as training's validation makes them (8 rows on CUDA, 4 elsewhere), so with the same
    token budget this reproduces the validation figure the training log shows."""
    from ..common import detect_device
    from ..data.loader import val_batches
    from ..data.sources import open_source
    from ..train.checkpoint import load_model
    from ..train.loop import evaluate_bpb

    dev = detect_device(device)
    model, tokenizer, meta = load_model(run, stage, dev)
    T = model.config.seq_len
    batch_size = batch_size or (8 if dev.type == "cuda" else 4)
    n_batches = max(1, max_tokens // (batch_size * T))
    batches = ({"inputs": x, "targets": y} for x, y in
               val_batches(open_source(data), tokenizer, batch_size, T, n_batches, device=dev))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths, device=dev)
    bpb = evaluate_bpb(model, batches, token_bytes, dev)
    return {"stage": meta["stage"], "step": meta.get("step"), "path": meta["path"], "val_bpb": bpb,
            "source": data.source, "max_tokens": n_batches * batch_size * T}
