"""Runs model/loss.py's `triton` strategy against the reference on DEVICE (argv[1]) and prints, as
its last line, one JSON object of relative errors per case. On CPU it needs TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import sys

import torch

from picochat.model.loss import reference_softcapped_cross_entropy, softcapped_cross_entropy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def case(device: str, n: int, v: int, dtype: torch.dtype, reduction: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 12).to(dtype).to(device)  # many far into the cap's flat part
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::3] = -1  # ignored rows
    targets[1] = v - 1  # the last column, in the last (partial) block
    targets = targets.to(device)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = softcapped_cross_entropy(ours, targets, 15.0, reduction, strategy="triton")
    want = reference_softcapped_cross_entropy(ref, targets, 15.0, reduction)
    weights = torch.randn(want.shape, generator=gen).to(device)  # a non-uniform upstream gradient
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    return {"value": rel(out.detach(), want.detach()), "grad": rel(ours.grad, ref.grad),
            "ignored_grad": float(ours.grad[::3].abs().max()), "grad_dtype": str(ours.grad.dtype),
            "shape_ok": out.shape == want.shape}


def main() -> None:
    device = sys.argv[1]
    cases = {}
    for n, v, dtype, reduction in [(7, 300, torch.float32, "none"), (5, 5000, torch.float32, "sum"),
                                   (6, 4096, torch.bfloat16, "mean")]:
        cases[f"{n}x{v}-{str(dtype)[6:]}-{reduction}"] = case(device, n, v, dtype, reduction, n + v)
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
