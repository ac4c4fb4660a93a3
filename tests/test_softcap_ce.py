"""The CPU's one-pass soft-capped cross-entropy equals the composed ops (value and gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from picochat.model.softcap_ce import softcap_cross_entropy


def reference(logits, targets, cap, reduction):
    return F.cross_entropy(cap * torch.tanh(logits / cap), targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n,v", [(1, 7), (130, 301), (257, 2112)])
def test_value_and_gradient_match_the_composed_ops(reduction, n, v):
    g = torch.Generator().manual_seed(n + v)
    logits = (torch.randn(n, v, generator=g) * 20).requires_grad_()  # many beyond the cap: tanh saturates
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1  # ignored positions: no loss, no gradient
    if n == 1:
        targets[0] = 3
    upstream = torch.rand(n, generator=g) if reduction == "none" else torch.tensor(0.37)
    ref = reference(logits, targets, 15.0, reduction)
    (ref_grad,) = torch.autograd.grad(ref, logits, upstream)
    out = softcap_cross_entropy(logits, targets, 15.0, reduction)
    (grad,) = torch.autograd.grad(out, logits, upstream)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert not grad[targets < 0].any()


def test_model_loss_on_cpu_equals_the_composed_ops():
    from picochat.config import ModelConfig
    from picochat.model.gpt import build_model

    model = build_model(ModelConfig(vocab_size=300, seq_len=32, n_layer=1, n_embd=64, n_head=1, n_kv_head=1),
                        torch.device("cpu"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # logits well past the cap
    x = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    loss = model(x, x, loss_reduction="sum")
    loss.backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ref = F.cross_entropy(model(x).view(-1, 300), x.view(-1), reduction="sum")  # model(x): capped logits
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(got, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 15.0, "max")
