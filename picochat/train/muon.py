"""picochat's Muon: momentum orthogonalised by a polynomial iteration, one batched call per shape.

The update of a hidden weight matrix W with gradient G is torch.optim.Muon's (same state, same
hyperparameters, so training behaves as before and its checkpoints load):

    B  <- lerp(B, G, 1 - momentum)                  momentum buffer ("momentum_buffer" in the state)
    U  <- lerp(G, B, momentum) if nesterov else B
    O  <- orthogonalize(U)                          ≈ the polar factor of U (singular values -> ~1)
    W  <- W · (1 - lr · weight_decay) - lr · sqrt(max(1, rows / cols)) · O

What differs is how O is computed:
- Matrices of the same shape (after turning tall ones on their side, so the Gram matrix is the
  small one) are stacked and orthogonalised in one batched call per shape, not one call each.
- The arithmetic is float32 on CPU (bfloat16 matrix products are emulated in software on AVX2-only
  CPUs: that was 2.6 of the demo's 3.2 s per step), bfloat16 on CUDA. Not compiled by default: on an
  H200 the compiled and eager steps took 5.53 and 5.57 ms at d12 (the work is batched cuBLAS
  matmuls), and every compile adds to a cold start (`compile=True` is there to re-measure).
- The polynomial is Keller Jordan's fixed quintic by default, the numbers torch.optim.Muon uses;
  `coefficients="polar_express"` selects the Polar Express sequence. It is not the default because,
  measured on the RL tests' from-scratch arithmetic fine-tune (depth 2, 200 steps at twice the
  reference rates, CPU float32), greedy held-out accuracy was 87% with Keller's quintic, 73% with
  torch.optim.Muon (bf16) and 18% with Polar Express: its larger steps overshoot at high rates.
- Under torchrun each rank orthogonalises its share of every stack and the results are all-gathered,
  so the per-GPU cost falls with world size. Momentum stays replicated: DDP hands every rank the
  whole averaged gradient already, so the state is identical on all ranks, a checkpoint written by
  rank 0 is complete, and it resumes exactly at any world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.distributed as dist

Coefficients = tuple[tuple[float, float, float], ...]

# Keller Jordan's quintic, five steps: https://kellerjordan.github.io/posts/muon/ (also torch.optim.Muon's default)
KELLER_COEFFICIENTS: Coefficients = ((3.4445, -4.7750, 2.0315),) * 5
NORM_EPS = 1e-7  # torch.optim.Muon's floor on the Frobenius norm before the iteration


def _minimax_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """The odd quintic p(x) = a·x + b·x³ + c·x⁵ closest to 1 in max-norm on [lo, hi].

    By Chebyshev's equioscillation theorem the error 1 - p alternates in sign, at equal size E, at
    four points: lo, the two interior extrema q < r of p, and hi. Remez exchange: solve the 4×4
    linear system for (a, b, c, E) at the current points, move q, r to the roots of
    p'(x) = a + 3b·x² + 5c·x⁴, repeat until E settles."""
    import numpy as np

    if lo / hi > 1 - 5e-6:  # the interval is a point: the limit polynomial, scaled to hi
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    previous = math.inf
    for _ in range(100):
        points = (lo, q, r, hi)
        system = np.array([[x, x**3, x**5, 1.0 if i % 2 == 0 else -1.0] for i, x in enumerate(points)])
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        root = math.sqrt(9 * b * b - 20 * a * c)
        q, r = sorted(math.sqrt((-3 * b + sign * root) / (10 * c)) for sign in (-1.0, 1.0))
        if abs(previous - err) < 1e-15:
            break
        previous = err
    return float(a), float(b), float(c)


@lru_cache(maxsize=None)
def polar_express_coefficients(steps: int = 5, lower: float = 1e-3, cushion: float = 0.02407327424182761,
                               safety: float = 1.01) -> Coefficients:
    """The Polar Express sequence (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal
    Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932), derived here.

    Greedy: after normalising by the Frobenius norm, singular values lie in [lower, 1]. Each step
    takes the minimax odd quintic on the current interval (its lower end raised to cushion·hi, which
    keeps the polynomial from growing large where bfloat16 would round badly), rescales it so the
    interval's two ends land symmetrically about 1, and maps the interval through it. `safety`
    evaluates each polynomial at x/safety so rounding that pushes a value past the interval stays
    bounded. lower, cushion and safety are the paper's; with them the first step is
    (8.28721…, -23.5959…, 17.3004…)/(1.01, 1.01³, 1.01⁵) as the paper lists."""
    lo, hi = lower, 1.0
    out = []
    for _ in range(steps):
        a, b, c = _minimax_odd_quintic(max(lo, cushion * hi), hi)
        scale = 2 / ((a * lo + b * lo**3 + c * lo**5) + (a * hi + b * hi**3 + c * hi**5))
        a, b, c = a * scale, b * scale, c * scale
        out.append((a / safety, b / safety**3, c / safety**5))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(out)


def coefficients_named(name: str) -> Coefficients:
    if name == "polar_express":
        return polar_express_coefficients()
    if name == "keller":
        return KELLER_COEFFICIENTS
    raise ValueError(f"Muon coefficients must be 'polar_express' or 'keller', got {name!r}")


def orthogonalize(stack: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """Approximate polar factors of a stack (N, m, n), m <= n, in the stack's dtype.

    Each step maps X to a·X + (b·A + c·A²)·X with A = X·Xᵀ, i.e. applies a·s + b·s³ + c·s⁵ to
    every singular value s; normalising by the Frobenius norm first puts them all in [0, 1]."""
    x = stack / stack.norm(dim=(-2, -1), keepdim=True).clamp(min=NORM_EPS)
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def orthogonalize_reference(matrix: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """One matrix at a time in float64: what the tests hold the batched versions to."""
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.double().mT if tall else matrix.double()
    x = x / x.norm().clamp(min=NORM_EPS)
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def default_ortho_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where its matrix products are native (CUDA with bf16 support), float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden matrices; see the module docstring for the update and what differs from
    torch.optim.Muon. `coefficients`: "keller" (default), "polar_express", or explicit (a, b, c)
    steps. `ortho_dtype`: None picks bfloat16 on CUDA, float32 elsewhere. `compile`: torch.compile
    the orthogonalisation (off by default: it measured no faster)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, coefficients: str | Sequence = "keller",
                 ortho_dtype: torch.dtype | None = None, compile: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon: lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})")
        name = coefficients if isinstance(coefficients, str) else "custom"
        steps = coefficients_named(coefficients) if isinstance(coefficients, str) else tuple(map(tuple, coefficients))
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "coefficients": name})
        self._steps = {name: steps}
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        self.ortho_dtype, self.compile = ortho_dtype, compile
        self._ortho_fns: dict[str, object] = {}
        self.share_work = True  # under torchrun: orthogonalise a share per rank and all-gather

    @contextlib.contextmanager
    def collectives_off(self):
        """Steps inside orthogonalise every matrix on this rank, with no collective: for the batch-size
        finder's probes, where a rank that ran out of memory mid-step must not leave the others
        waiting in an all-gather. Same result, the whole work per rank."""
        before, self.share_work = self.share_work, False
        try:
            yield self
        finally:
            self.share_work = before

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Also takes torch.optim.Muon's state: its per-parameter momentum buffers are this
        optimizer's, so only the group hyperparameters are translated (its Newton-Schulz settings
        give way to this optimizer's coefficients; a learning-rate rule other than its default
        "original" cannot be continued and is refused)."""
        groups = state_dict["param_groups"]
        names = [g["coefficients"] for g in self.param_groups]
        if any("ns_coefficients" in g for g in groups):
            converted = []
            for saved in groups:
                rule = saved.get("adjust_lr_fn")
                if rule not in (None, "original"):
                    raise ValueError(f"cannot continue torch.optim.Muon state with adjust_lr_fn={rule!r}: "
                                     "picochat's Muon scales the rate by sqrt(max(1, rows/cols)) only")
                converted.append({k: v for k, v in saved.items()
                                  if k in ("lr", "momentum", "nesterov", "weight_decay", "initial_lr", "params")})
            state_dict = {**state_dict, "param_groups": converted}
        super().load_state_dict(state_dict)
        for group, name in zip(self.param_groups, names):  # the configured polynomial, not the saved one
            group["coefficients"] = name

    # -- the step ------------------------------------------------------------------------------
    def _orthogonalizer(self, device: torch.device):
        key = str(device)
        if key not in self._ortho_fns:
            fn = orthogonalize
            if self.compile:
                fn = torch.compile(orthogonalize, dynamic=False)
            self._ortho_fns[key] = fn
        return self._ortho_fns[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = self._momentum(group, params)
            for shape, members in _shape_buckets(params).items():
                pending.append(self._orthogonalize_bucket(group, shape, [params[i] for i in members],
                                                          [updates[i] for i in members]))
        for apply in pending:  # every rank's collectives were queued above; now wait and apply in order
            apply()
        return loss

    def _momentum(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        return torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs

    def _orthogonalize_bucket(self, group: dict, shape: tuple[int, int], params: list[torch.Tensor],
                              updates: list[torch.Tensor]):
        """Orthogonalise this rank's share of one shape's stack; start gathering the others' shares.
        Returns the function that waits for the gather and applies every update of the bucket."""
        device = params[0].device
        dtype = self.ortho_dtype or default_ortho_dtype(device)
        shared = self.share_work and dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if shared else 1
        rank = dist.get_rank() if world > 1 else 0
        per_rank = -(-len(params) // world)
        mine = [_on_side(u) for u in updates[rank * per_rank:(rank + 1) * per_rank]]
        stack = torch.stack(mine).to(dtype) if mine else torch.empty((0, *shape), device=device, dtype=dtype)
        if len(mine) < per_rank:  # zero matrices pad the last share (they stay zero)
            stack = torch.cat([stack, stack.new_zeros((per_rank - len(mine), *shape))])
        name = group["coefficients"]
        steps = self._steps[name] if name in self._steps else coefficients_named(name)
        ortho = self._orthogonalizer(device)(stack, steps)
        work = None
        if world > 1:
            gathered = torch.empty((per_rank * world, *shape), device=device, dtype=dtype)
            work = dist.all_gather_into_tensor(gathered, ortho.contiguous(), async_op=True)
        else:
            gathered = ortho

        def apply() -> None:
            if work is not None:
                work.wait()
            result = gathered[:len(params)].to(params[0].dtype)
            lr, decay = group["lr"], group["weight_decay"]
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            for tall in (False, True):
                chosen = [i for i, p in enumerate(params) if (p.size(0) > p.size(1)) == tall]
                if not chosen:
                    continue
                rows, cols = params[chosen[0]].shape
                steps = [result[i].mT if tall else result[i] for i in chosen]
                torch._foreach_add_([params[i] for i in chosen], steps, alpha=-lr * math.sqrt(max(1.0, rows / cols)))

        return apply


def _on_side(matrix: torch.Tensor) -> torch.Tensor:
    """Tall matrices transposed, so every member of a stack is (short side, long side)."""
    return matrix.mT if matrix.size(0) > matrix.size(1) else matrix


def _shape_buckets(params: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Parameter indices by (short side, long side), in first-seen order (the same on every rank)."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((min(p.shape), max(p.shape)), []).append(i)
    return buckets
