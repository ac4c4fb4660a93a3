"""The training loss: cross-entropy over soft-capped logits, one autograd function for every device.

`GPT.forward` soft-caps its logits, ``s = cap · tanh(z / cap)``, before the cross-entropy. Written as
plain ops (``z.float()``, the cap, ``F.cross_entropy``) that walks the (rows × vocab) logits about ten
times each way and keeps a float32 copy of them. Here the forward and backward are written out by
hand, with two facts that make one pass enough:

- capped logits lie in [-cap, cap], so ``log Σ exp(s)`` needs no running maximum while
  vocab · e^cap stays far inside float32 (cap ≤ 50: any vocabulary below 10^16);
- the gradient is ``dL/dz = (softmax(s) − onehot) · (1 − tanh²)``, from the same softmax.

How the rows are worked through depends on where the function runs (`strategy`, picked per call):

- ``fused`` (under torch.compile, e.g. CUDA training): all rows at once; the compiler emits one
  reduction that reads the bfloat16 logits once and one elementwise backward kernel that recomputes
  the cap and writes bfloat16 gradients. Only the logits, targets and one log-sum-exp per row are
  saved: no float32 (rows × vocab) tensor (8 ms → 5.3 ms of a 121 ms d12 step on an H200);
- ``chunked`` (eager, not CPU: e.g. the batch-size finder's eager probe on CUDA): the same row
  functions over chunks of ≤ 2^26 logits, so the float32 temporaries stay small and the eager probe
  sees the memory a compiled step needs, not five float32 copies of the logits;
- ``blocked`` (eager on CPU: the demo): 64 rows at a time while they sit in a core's cache, and the
  forward computes the gradient too (it needs the same softmax), so the backward is one multiply.
  The composed ops streamed the 2048 × 2112 float32 logits through memory ~10 times: ~11% of the
  demo's step on 2 cores;
- ``triton`` (CUDA, only when asked for: `ForwardOptions.triton_loss`): the two passes as hand-written
  Triton kernels with the GPU's one-instruction tanh (`triton_loss.py`); outside any compiled graph
  (`triton_softcapped_cross_entropy` is a graph break), since the compiler would not look inside.
  Measured on an H200 at d12 batch 32, side by side with `fused`: the loss's kernels 5.25 → ~3.5 ms,
  the step +0.6% (inside the spread between processes), peak memory +4 GiB (compiled, the gradient
  reuses the saved logits' buffer; this eager function cannot): an option, not the default.

Values and gradients equal `reference_softcapped_cross_entropy` to float32 rounding, every strategy
(tests/test_train_kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CAP_WITHOUT_MAX_PASS = 50.0  # e^50 · 2^53 < 3.4e38 (float32's largest), so no overflow in the sum
EAGER_CHUNK_ELEMENTS = 2**26  # `chunked`: ≤ 64M logits per chunk (256 MB of float32 temporaries)
ROWS_PER_BLOCK = 64  # `blocked`: 64 rows of a few thousand float32 logits stay in a core's L2 cache
STRATEGIES = ("auto", "fused", "chunked", "blocked", "triton")


def reference_softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                                       reduction: str = "mean") -> torch.Tensor:
    """The plain formulation: float32 logits, soft cap, F.cross_entropy (ignore_index = -1)."""
    z = logits.float()
    if cap:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.view(-1, z.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction)


def pick_strategy(logits: torch.Tensor) -> str:
    """fused under the compiler, blocked eagerly on CPU, chunked eagerly elsewhere."""
    if torch.compiler.is_compiling():
        return "fused"
    return "blocked" if logits.device.type == "cpu" else "chunked"


def _row_slices(n_rows: int, rows_per_slice: int) -> list[slice]:
    return [slice(i, min(n_rows, i + rows_per_slice)) for i in range(0, n_rows, rows_per_slice)]


# -- fused and chunked: save the logits, recompute the softmax in the backward --------------------


def _forward_rows(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = cap * torch.tanh(logits.float() / cap)
    lse = torch.exp(s).sum(-1).log()
    picked = s.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return lse, picked


def _backward_rows(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                   cap: float) -> torch.Tensor:
    t = torch.tanh(logits.float() / cap)
    probs = torch.exp(cap * t - lse[:, None])
    vocab = torch.arange(logits.size(-1), device=logits.device)
    onehot = (vocab[None, :] == targets[:, None]).to(probs.dtype)
    scale = torch.where(targets >= 0, grad_rows, torch.zeros_like(grad_rows))[:, None]
    return ((probs - onehot) * (1.0 - t * t) * scale).to(logits.dtype)


# -- blocked: the gradient is made in the forward, block by block ---------------------------------


def _blocked_forward(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                     want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses and (if wanted) d loss_row / d logits, 64 rows at a time, in place where it can."""
    n = logits.size(0)
    losses = torch.zeros(n, device=logits.device, dtype=torch.float32)
    grad = torch.empty_like(logits) if want_grad else None
    for rows in _row_slices(n, ROWS_PER_BLOCK):
        t = torch.tanh(logits[rows].float() * (1.0 / cap))  # the capped logits are cap · t
        e = (t * cap).exp_()
        total = e.sum(-1, keepdim=True)
        y = targets[rows]
        keep = y >= 0
        y_safe = y.clamp(min=0)[:, None]
        losses[rows] = torch.where(keep, total.squeeze(1).log() - t.gather(1, y_safe).squeeze(1) * cap, 0.0)
        if grad is not None:  # softmax(s) − onehot(y), times d s / d z = 1 − t²
            p = e.div_(total)
            p.scatter_add_(1, y_safe, torch.full_like(y_safe, -1.0, dtype=p.dtype))
            p.mul_(t.square_().neg_().add_(1.0)).mul_(keep[:, None])
            grad[rows] = p
    return losses, grad


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-row losses of (N, V) logits against (N,) targets (-1: no loss, 0 there)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float, strategy: str) -> torch.Tensor:
        # decided here, where dynamo's is_compiling() is reliable (it is False while the compiler traces backward)
        strategy = pick_strategy(logits) if strategy == "auto" else strategy
        ctx.cap, ctx.strategy = cap, strategy
        if strategy == "blocked":
            losses, grad = _blocked_forward(logits, targets, cap, ctx.needs_input_grad[0])
            ctx.save_for_backward(grad)
            return losses
        if strategy == "triton":
            from . import triton_loss

            logits, targets = logits.contiguous(), targets.contiguous()
            losses, lse = triton_loss.forward(logits, targets, cap)
            ctx.save_for_backward(logits, targets, lse)
            return losses
        step = max(1, logits.size(0)) if strategy == "fused" else max(1, EAGER_CHUNK_ELEMENTS // max(1, logits.size(1)))
        parts = [_forward_rows(logits[c], targets[c], cap) for c in _row_slices(logits.size(0), step)]
        lse = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        picked = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        ctx.save_for_backward(logits, targets, lse)
        ctx.step = step
        return torch.where(targets >= 0, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        if ctx.strategy == "blocked":
            (grad,) = ctx.saved_tensors
            return grad * grad_rows[:, None].to(grad.dtype), None, None, None
        logits, targets, lse = ctx.saved_tensors
        if ctx.strategy == "triton":
            from . import triton_loss

            return triton_loss.backward(logits, targets, lse, grad_rows, ctx.cap), None, None, None
        slices = _row_slices(logits.size(0), ctx.step)
        if len(slices) == 1:
            return _backward_rows(logits, targets, lse, grad_rows, ctx.cap), None, None, None
        grad = torch.empty_like(logits)
        for c in slices:
            grad[c] = _backward_rows(logits[c], targets[c], lse[c], grad_rows[c], ctx.cap)
        return grad, None, None, None


def softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                             reduction: str = "mean", strategy: str = "auto") -> torch.Tensor:
    """Cross-entropy of ``cap · tanh(logits / cap)`` against `targets` (-1 = ignored), like
    `F.cross_entropy(..., ignore_index=-1, reduction=reduction)` on the float32 capped logits.
    logits: (..., V) in any float dtype (bfloat16 stays bfloat16: no float32 copy is kept);
    targets: (...) long. `strategy`: auto (see the module docstring), or one of fused, chunked,
    blocked on any device (the tests hold each to the reference). Falls back to the reference for
    cap = 0 or cap > 50."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not cap or cap > MAX_CAP_WITHOUT_MAX_PASS:
        return reference_softcapped_cross_entropy(logits, targets, cap, reduction)
    rows = _SoftcappedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), float(cap),
                                         strategy)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (targets >= 0).sum()


@torch.compiler.disable
def triton_softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                                    reduction: str = "mean") -> torch.Tensor:
    """`softcapped_cross_entropy` with the Triton kernels, always run eagerly: inside a compiled
    model this call is a graph break (the graph ends at the logits; the kernels run between it and
    the backward graph)."""
    return softcapped_cross_entropy(logits, targets, cap, reduction, strategy="triton")
