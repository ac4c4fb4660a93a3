"""Optimizers and the learning-rate schedule.

Hidden weight matrices train with Muon (picochat's own, `muon.py`: momentum orthogonalised by a
batched polynomial iteration; `muon_impl="torch"` builds torch.optim.Muon instead, the baseline the
benchmarks compare against); embeddings, the head and anything else with AdamW. AdamW rates are scaled by (768/width)^0.5 so the
reference rates (tuned at 768 wide) carry over to other depths.
"""

from __future__ import annotations

import torch

from ..config import OptimConfig
from .muon import Muon


def build_optimizers(model, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    groups = model.param_groups()
    width = model.config.n_embd
    scale = (768 / width) ** 0.5
    adam_groups = [
        {"params": groups["embedding"], "lr": cfg.embedding_lr * scale},
        {"params": groups["unembedding"], "lr": cfg.unembedding_lr * scale},
    ]
    if groups["scalar"]:
        adam_groups.append({"params": groups["scalar"], "lr": cfg.scalar_lr * scale})
    adamw = torch.optim.AdamW(adam_groups, betas=cfg.adam_betas, eps=1e-10, weight_decay=cfg.weight_decay,
                              fused=device.type == "cuda")
    if cfg.muon_impl == "torch":
        muon = torch.optim.Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=0.95, nesterov=True,
                                weight_decay=cfg.weight_decay)
    elif cfg.muon_impl == "picochat":
        muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=0.95, nesterov=True,
                    weight_decay=cfg.weight_decay, coefficients=cfg.muon_coefficients)
    else:
        raise ValueError(f"muon_impl must be 'picochat' or 'torch', got {cfg.muon_impl!r}")
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, num_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last steps."""
    warmup = round(cfg.warmup_frac * num_steps)
    warmdown = round(cfg.warmdown_frac * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / max(1, warmdown)
    return progress + (1 - progress) * cfg.final_lr_frac


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
    return multiplier
