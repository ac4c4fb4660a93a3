"""The training forward's fused paths compute what the plain ops compute.

- model/loss.py's one-pass soft-capped cross-entropy against F.cross_entropy on float32 capped
  logits: values and gradients, every strategy (fused, chunked, blocked), every reduction, ignored
  targets, bfloat16 logits, odd sizes; what the compiler sees is the whole rows;
- GPT with ForwardOptions() (fused loss, one q/k/v matmul) against ForwardOptions.reference():
  same loss and same gradient for every parameter (float32, CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from picochat.config import ModelConfig
from picochat.model.gpt import ForwardOptions, build_model
from picochat.model import loss as loss_mod
from picochat.model.loss import reference_softcapped_cross_entropy, softcapped_cross_entropy


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp(min=1e-30))


STRATEGIES = ("fused", "chunked", "blocked")  # under the compiler; eager off CPU; eager on CPU


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cap", [15.0, 30.0])
def test_loss_values_and_gradients_match_the_reference(strategy, reduction, cap):
    gen = torch.Generator().manual_seed(int(cap) + len(reduction))
    logits = torch.randn(96, 1000, generator=gen) * 12  # many values far into the cap's flat part
    targets = torch.randint(0, 1000, (96,), generator=gen)
    targets[::5] = -1  # ignored rows
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = softcapped_cross_entropy(ours, targets, cap, reduction, strategy=strategy)
    want = reference_softcapped_cross_entropy(ref, targets, cap, reduction)
    weights = torch.randn(want.shape, generator=gen)  # a non-uniform upstream gradient
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    assert out.shape == want.shape
    assert _rel(out, want) < 1e-6  # float32 rounding only
    assert _rel(ours.grad, ref.grad) < 1e-5
    assert ours.grad[::5].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n,v", [(1, 7), (130, 301), (257, 2112)])  # one row; blocks of 64 with a short last one
def test_loss_matches_the_composed_ops_at_odd_sizes(strategy, n, v):
    g = torch.Generator().manual_seed(n + v)
    logits = (torch.randn(n, v, generator=g) * 20).requires_grad_()  # many beyond the cap: tanh saturates
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1
    if n == 1:
        targets[0] = 3
    for reduction in ("sum", "mean", "none"):
        upstream = torch.rand(n, generator=g) if reduction == "none" else torch.tensor(0.37)
        want = F.cross_entropy(15.0 * torch.tanh(logits / 15.0), targets, ignore_index=-1, reduction=reduction)
        (want_grad,) = torch.autograd.grad(want, logits, upstream)
        out = softcapped_cross_entropy(logits, targets, 15.0, reduction, strategy=strategy)
        (grad,) = torch.autograd.grad(out, logits, upstream)
        torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
        assert not grad[targets < 0].any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_keeps_bf16_logits_bf16_and_stays_close(strategy):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 4096, generator=gen) * 8).bfloat16()
    targets = torch.randint(0, 4096, (64,), generator=gen)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = softcapped_cross_entropy(ours, targets, 15.0, "sum", strategy=strategy)
    want = reference_softcapped_cross_entropy(ref, targets, 15.0, "sum")
    out.backward()
    want.backward()
    assert out.dtype == torch.float32 and ours.grad.dtype == torch.bfloat16
    assert _rel(out, want) < 1e-6  # the same float32 arithmetic on the same bf16 inputs
    assert _rel(ours.grad, ref.grad) < 1e-2  # bf16 gradients: rounding of the output only


def test_strategy_per_device_and_bad_arguments():
    cpu = torch.zeros(2, 3)
    assert loss_mod.pick_strategy(cpu) == "blocked"
    assert loss_mod.pick_strategy(torch.zeros(2, 3, device="meta")) == "chunked"  # eager, not a CPU
    targets = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        softcapped_cross_entropy(cpu, targets, 15.0, "max")
    with pytest.raises(ValueError, match="strategy"):
        softcapped_cross_entropy(cpu, targets, 15.0, "sum", strategy="tiled")
    with torch.no_grad():  # no gradient wanted: the blocked forward makes none, and the value is the same
        assert torch.equal(softcapped_cross_entropy(cpu, targets, 15.0, "none"),
                           softcapped_cross_entropy(cpu.requires_grad_(), targets, 15.0, "none"))


def test_loss_without_cap_or_with_a_huge_cap_is_the_reference():
    logits, targets = torch.randn(8, 50), torch.randint(0, 50, (8,))
    for cap in (0.0, 100.0):
        assert torch.equal(softcapped_cross_entropy(logits, targets, cap),
                           reference_softcapped_cross_entropy(logits, targets, cap))
    with pytest.raises(ValueError, match="reduction"):
        softcapped_cross_entropy(logits, targets, 15.0, "avg")


def test_model_loss_on_cpu_is_the_fused_loss_and_equals_the_composed_ops():
    """On CPU the model uses the one function (blocked) even with the reference options."""
    model = build_model(ModelConfig(vocab_size=300, seq_len=32, n_layer=1, n_embd=64, n_head=1, n_kv_head=1),
                        torch.device("cpu"), seed=0)
    assert model.options == ForwardOptions.reference()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # logits well past the cap
    x = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    loss = model(x, x, loss_reduction="sum")
    assert loss.grad_fn.next_functions[0][0].name().startswith("_SoftcappedCrossEntropy")  # sum of its rows
    loss.backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ref = F.cross_entropy(model(x).view(-1, 300), x.view(-1), reduction="sum")  # model(x): capped logits
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(got, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_model_options_give_the_same_loss_and_gradients():
    cfg = ModelConfig.from_depth(2, vocab_size=512, seq_len=32)
    fused = build_model(cfg, torch.device("cpu"), seed=0).set_options(ForwardOptions())
    plain = build_model(cfg, torch.device("cpu"), seed=0)
    assert plain.options == ForwardOptions.reference()  # CPU default: the plain ops
    with torch.no_grad():  # output projections start at zero: give them weight so every gradient is non-trivial
        for a, b in zip(fused.parameters(), plain.parameters()):
            a.add_(0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())))
            b.copy_(a)
    x = torch.randint(0, 512, (3, 33), generator=torch.Generator().manual_seed(1))
    targets = x[:, 1:].clone()
    targets[0, :5] = -1
    lf, lp = fused(x[:, :-1], targets), plain(x[:, :-1], targets)
    lf.backward()
    lp.backward()
    assert abs(lf.item() - lp.item()) < 1e-5
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert _rel(a.grad, b.grad) < 1e-4, name
    with torch.no_grad():  # logits (no targets) are the same too
        assert _rel(fused(x), plain(x)) < 1e-5


def test_forward_options_parse():
    assert ForwardOptions.parse("default") == ForwardOptions()
    assert ForwardOptions.parse("reference") == ForwardOptions.reference()
    assert ForwardOptions.parse("loss+bf16res") == ForwardOptions(fused_loss=True, fused_qkv=False, bf16_residual=True)
    with pytest.raises(ValueError, match="unknown forward lever"):
        ForwardOptions.parse("loss+fp8")


def test_eager_chunks_give_the_same_values_and_gradients(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 300, generator=gen) * 10
    targets = torch.randint(0, 300, (50,), generator=gen)
    targets[3] = -1
    whole = logits.clone().requires_grad_()
    softcapped_cross_entropy(whole, targets, 15.0, "sum", strategy="fused").backward()
    monkeypatch.setattr(loss_mod, "EAGER_CHUNK_ELEMENTS", 7 * 300)  # 8 chunks, the last one short
    seen = _spy_on_slices(monkeypatch)
    chunked = logits.clone().requires_grad_()
    out = softcapped_cross_entropy(chunked, targets, 15.0, "sum", strategy="chunked")
    out.backward()
    assert seen == [8, 8]  # forward and backward
    assert abs(out.item() - reference_softcapped_cross_entropy(logits, targets, 15.0, "sum").item()) < 1e-3
    assert torch.allclose(chunked.grad, whole.grad, rtol=0, atol=1e-7)


def _spy_on_slices(monkeypatch) -> list[int]:
    """Record how many row slices each pass of the loss works through."""
    seen = []
    original = loss_mod._row_slices

    def spy(n_rows, rows_per_slice):
        slices = original(n_rows, rows_per_slice)
        seen.append(len(slices))
        return slices

    monkeypatch.setattr(loss_mod, "_row_slices", spy)
    return seen


def test_compiled_loss_is_one_pass_forward_and_backward(monkeypatch):
    """The compiler must see the whole rows (one fused kernel each way), never chunks or blocks,
    in the backward too (dynamo's is_compiling() is False while the backward is traced)."""
    monkeypatch.setattr(loss_mod, "EAGER_CHUNK_ELEMENTS", 1000)
    seen = _spy_on_slices(monkeypatch)
    torch._dynamo.reset()
    fn = torch.compile(lambda z, t: softcapped_cross_entropy(z, t, 15.0, "sum"), dynamic=False)
    z = torch.randn(64, 500, requires_grad=True)
    t = torch.randint(0, 500, (64,))
    fn(z, t).backward()
    torch._dynamo.reset()
    assert len(seen) >= 2 and set(seen) == {1}  # eagerly this CPU call would run 1 blocked pass of 64 rows...
    eager = softcapped_cross_entropy(z.detach().requires_grad_(), t, 15.0, "sum", strategy="chunked")
    assert seen[-1] == 32  # ...and chunked, 32 chunks of 2 rows: the patch was in force
    ref = z.detach().clone().requires_grad_()
    reference_softcapped_cross_entropy(ref, t, 15.0, "sum").backward()
    assert _rel(z.grad, ref.grad) < 1e-5
    assert abs(eager.item() - fn(z, t).item()) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_default_matches_the_plain_path():
    """On the GPU, compiled, under bf16 autocast: the default forward (fused loss, one q/k/v matmul,
    bf16 residual) and the plain ops give the same loss and gradients within bf16 rounding."""
    device = torch.device("cuda")
    cfg = ModelConfig.from_depth(4, vocab_size=4096, seq_len=256)
    models = []
    for options in (ForwardOptions(), ForwardOptions.reference()):
        model = build_model(cfg, device, seed=0).set_options(options)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, device=device, generator=torch.Generator(device).manual_seed(p.numel())))
        models.append(model)
    x = torch.randint(0, 4096, (8, 257), device=device, generator=torch.Generator(device).manual_seed(1))
    losses = []
    for model in models:
        step = torch.compile(model, dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[1])
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert _rel(a.grad, b.grad) < 5e-2, name


def _run_triton_loss_worker(device: str, env_extra: dict) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "workers" / "triton_loss_worker.py"
    out = subprocess.run([sys.executable, str(worker), device], env={**os.environ, **env_extra},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_triton_loss(cases: dict, value_tol: float, grad_tol: float) -> None:
    assert len(cases) == 3
    for name, c in cases.items():
        assert c["shape_ok"] and c["ignored_grad"] == 0.0, (name, c)
        bf16 = "bfloat16" in name  # bf16 gradients: the rounding of the output (as the reference's) dominates
        assert c["value"] < value_tol and c["grad"] < (max(grad_tol, 1e-2) if bf16 else grad_tol), (name, c)
        assert c["grad_dtype"] == ("torch.bfloat16" if "bfloat16" in name else "torch.float32"), (name, c)


def test_triton_loss_kernels_match_the_reference_interpreted():
    """The Triton strategy's kernels (interpreted on CPU, tanh written with exp there): values and
    gradients of several rows, a vocabulary over two blocks, ignored rows, bf16 logits."""
    pytest.importorskip("triton")
    _check_triton_loss(_run_triton_loss_worker("cpu", {"TRITON_INTERPRET": "1"}), value_tol=1e-5, grad_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_loss_kernels_match_the_reference_cuda():
    """On the GPU tanh is tanh.approx.f32 (relative error <= 2^-10.9): looser than float32 rounding."""
    _check_triton_loss(_run_triton_loss_worker("cuda", {}), value_tol=1e-3, grad_tol=5e-3)
