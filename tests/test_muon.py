"""picochat's Muon (train/muon.py): the coefficients, the batched orthogonalisation against a float64
reference, the update against torch.optim.Muon, loading torch.optim.Muon's state, and the sharded
step across two real gloo processes."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from picochat.train.muon import (KELLER_COEFFICIENTS, Muon, coefficients_named, orthogonalize,
                                 orthogonalize_reference, polar_express_coefficients)

import forkrun

# Shapes as in a model: square attention matrices, a tall MLP input and a wide MLP output matrix
# (these two share one stack, the tall one on its side), and an odd count so shares are uneven.
SHAPES = [(48, 48)] * 5 + [(192, 48), (48, 192), (192, 48)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params, steps: range) -> None:
    for step in steps:
        for p, g in zip(params, _grads(step)):
            p.grad = g.clone()
        opt.step()


def test_polar_express_coefficients_are_the_papers():
    """The derivation reproduces the first polynomial the paper lists (before its 1.01 safety factor)."""
    a, b, c = polar_express_coefficients()[0]
    assert (a * 1.01, b * 1.01**3, c * 1.01**5) == pytest.approx(
        (8.28721201814563, -23.595886519098837, 17.300387312530933), rel=1e-9)
    assert len(polar_express_coefficients()) == 5
    # Composed, the five steps map every singular value in [1e-3, 1] into [0.84, 1.13].
    x = torch.logspace(-3, 0, 1000, dtype=torch.float64)
    for a, b, c in polar_express_coefficients():
        x = a * x + b * x**3 + c * x**5
    assert 0.84 < x.min() and x.max() < 1.13
    with pytest.raises(ValueError, match="polar_express"):
        coefficients_named("chebyshev")


@pytest.mark.parametrize("name", ["polar_express", "keller"])
def test_batched_orthogonalisation_matches_float64_reference(name):
    """Tolerance: 2e-5 absolute on entries of size ~0.5 (float32 after five steps: ~2e-6 seen)."""
    coefficients = coefficients_named(name)
    g = torch.Generator().manual_seed(0)
    for shape in [(4, 64, 64), (3, 32, 96)]:
        stack = torch.randn(shape, generator=g)
        reference = torch.stack([orthogonalize_reference(m, coefficients) for m in stack])
        torch.testing.assert_close(orthogonalize(stack, coefficients).double(), reference, atol=2e-5, rtol=0)


def test_update_equals_reference_muon_in_float64():
    """Three steps of the optimizer = Nesterov momentum, float64 orthogonalisation, decay, LR scaling."""
    params = _params()
    opt = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1, coefficients="polar_express")
    _run(opt, params, range(3))
    for i, start in enumerate(_params()):
        w, buf = start.detach().double(), torch.zeros(SHAPES[i], dtype=torch.float64)
        for step in range(3):
            grad = _grads(step)[i].double()
            buf = buf.lerp(grad, 0.05)
            update = orthogonalize_reference(grad.lerp(buf, 0.95), polar_express_coefficients())
            rows, cols = SHAPES[i]
            w = w * (1 - 0.02 * 0.1) - 0.02 * max(1.0, rows / cols) ** 0.5 * update
        torch.testing.assert_close(params[i].detach().double(), w, atol=2e-6, rtol=0)


def test_keller_coefficients_in_bfloat16_match_torch_muon():
    """The same math as torch.optim.Muon (its quintic, its bfloat16): the same weights up to bf16
    rounding of the update (1e-4 absolute at lr 0.02, i.e. ~0.5% of an update entry)."""
    mine, theirs = _params(), _params()
    _run(Muon(mine, lr=0.02, coefficients="keller", ortho_dtype=torch.bfloat16), mine, range(3))
    _run(torch.optim.Muon(theirs, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0), theirs, range(3))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-4, rtol=0)


def test_float32_differs_from_torch_muon_only_by_its_bfloat16_rounding():
    """The deliberate difference on CPU: float32 instead of torch.optim.Muon's bfloat16. Per step the
    updates differ by ~1-2% of their size, which is bf16's own rounding error after five steps."""
    mine, theirs = _params(), _params()
    starts = [p.detach().clone() for p in mine]
    opt_mine = Muon(mine, lr=0.02, coefficients="keller")
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    _run(opt_mine, mine, range(1))
    _run(opt_theirs, theirs, range(1))
    for a, b, s in zip(mine, theirs, starts):
        da, db = a.detach() - s, b.detach() - s
        assert (da - db).norm() / db.norm() < 0.03


def test_loads_torch_muon_state_and_continues():
    """A checkpoint of torch.optim.Muon: momentum buffers carry over; the next step is the same one."""
    mine, theirs = _params(), _params()
    torch_opt = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    _run(torch_opt, theirs, range(2))
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            a.copy_(b)
    opt = Muon(mine, lr=0.5, coefficients="keller", ortho_dtype=torch.bfloat16)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as from a file: no shared buffers
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["coefficients"] == "keller"
    for a, b in zip(mine, theirs):
        assert torch.equal(opt.state[a]["momentum_buffer"], torch_opt.state[b]["momentum_buffer"])
    _run(opt, mine, range(2, 3))
    _run(torch_opt, theirs, range(2, 3))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-4, rtol=0)

    bad = torch.optim.Muon(_params(), lr=0.02, adjust_lr_fn="match_rms_adamw").state_dict()
    with pytest.raises(ValueError, match="adjust_lr_fn='match_rms_adamw'"):
        Muon(_params()).load_state_dict(bad)


def test_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = _params()
        opt = Muon(params, lr=0.02, weight_decay=0.1)
        _run(opt, params, range(3))
        torch.save([p.detach() for p in params], f"{out}.{rank}")
        if rank == 0:  # a probe step on one rank alone (the other "ran out of memory"): no collective, no hang
            with opt.collectives_off():
                _run(opt, params, range(3, 4))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_share_the_work_and_match_one(tmp_path):
    """Each rank orthogonalises half of each stack (5 squares: 3 + 2, the last share padded) and
    gathers the rest: both ranks end with exactly the same weights, equal to a single process's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "weights")
    forkrun.context()  # fresh processes, forked from a server that has torch imported
    mp.start_processes(_sharded_worker, args=(2, port, out), nprocs=2, join=True, start_method="forkserver")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    single = _params()
    _run(Muon(single, lr=0.02, weight_decay=0.1), single, range(3))
    for a, b, c in zip(ranks[0], ranks[1], single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), atol=1e-6, rtol=0)


def test_keller_constant_is_torchs_default():
    import torch.optim._muon as torch_muon

    assert KELLER_COEFFICIENTS[0] == (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
