"""The training loss: cross-entropy over soft-capped logits, in one pass each way.

`GPT.forward` soft-caps its logits, ``s = cap · tanh(z / cap)``, before the cross-entropy. Written
as plain ops (``z.float()``, the cap, ``F.cross_entropy``) the compiled step keeps a float32 copy of
the whole (rows × vocab) logits tensor and runs a max pass, a sum pass and a separate backward
of the log-softmax over it: 8 ms of a 125 ms d12 step on an H200. Here the forward and backward
are written out by hand so the compiler emits one reduction that reads the bfloat16 logits once,
and one elementwise kernel that reads them again and writes their gradient in bfloat16:

- capped logits lie in [-cap, cap], so ``log Σ exp(s)`` needs no running maximum while
  vocab · e^cap stays far inside float32 (cap ≤ 50: any vocabulary below 10^16);
- only the logits (in their own dtype), the targets and one log-sum-exp per row are saved;
  the backward recomputes ``s`` and applies ``dL/dz = (softmax(s) − onehot) · (1 − tanh²)``.

Values and gradients equal `reference_softcapped_cross_entropy` (float32 rounding; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CAP_WITHOUT_MAX_PASS = 50.0  # e^50 · 2^53 < 3.4e38 (float32's largest), so no overflow in the sum


def reference_softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                                       reduction: str = "mean") -> torch.Tensor:
    """The plain formulation: float32 logits, soft cap, F.cross_entropy (ignore_index = -1)."""
    z = logits.float()
    if cap:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.view(-1, z.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction)


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-row losses of (N, V) logits against (N,) targets (-1: no loss, 0 there)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        s = cap * torch.tanh(logits.float() / cap)
        lse = torch.exp(s).sum(-1).log()
        valid = targets >= 0
        picked = s.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap = cap
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        cap = ctx.cap
        t = torch.tanh(logits.float() / cap)
        probs = torch.exp(cap * t - lse[:, None])
        vocab = torch.arange(logits.size(-1), device=logits.device)
        onehot = (vocab[None, :] == targets[:, None]).to(probs.dtype)
        scale = torch.where(targets >= 0, grad_rows, torch.zeros_like(grad_rows))[:, None]
        grad = (probs - onehot) * (1.0 - t * t) * scale
        return grad.to(logits.dtype), None, None


def softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                             reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``cap · tanh(logits / cap)`` against `targets` (-1 = ignored), like
    `F.cross_entropy(..., ignore_index=-1, reduction=reduction)` on the float32 capped logits.
    logits: (..., V) in any float dtype (bfloat16 stays bfloat16: no float32 copy is kept);
    targets: (...) long. Falls back to the reference for cap = 0 or cap > 50."""
    if not cap or cap > MAX_CAP_WITHOUT_MAX_PASS:
        return reference_softcapped_cross_entropy(logits, targets, cap, reduction)
    rows = _SoftcappedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), float(cap))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / (targets >= 0).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
