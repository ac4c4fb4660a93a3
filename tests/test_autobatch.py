"""Tests for the device-batch-size finder on CPU, with a simulated memory budget.

`SimMemory` is the MemoryProbe: the train step reports the batch it ran and the simulated peak is
`fixed + per_sample · batch`; the step raises torch.OutOfMemoryError past a hard limit, as CUDA would.
The finder runs exactly the code it runs on CUDA; only the probe differs.
"""

from __future__ import annotations

import datetime
import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.config import ModelConfig
from picochat.model.gpt import build_model
from picochat.train import autobatch as ab
from picochat.train.autobatch import AutoBatchError, find_device_batch_size, is_oom_error, mark_bad

import forkrun

MiB = 2**20


class SimMemory:
    """peak = fixed + per_sample·b (+ quad·b²); OOM when it passes `hard_limit` (default: total)."""

    def __init__(self, fixed: int, per_sample: int, total: int, hard_limit: int | None = None,
                 quad: float = 0.0, oom_above: int | None = None):
        self.fixed, self.per_sample, self.total, self.quad = fixed, per_sample, total, quad
        self.hard_limit = total if hard_limit is None else hard_limit
        self.oom_above = oom_above  # OOM for batches above this whatever the formula says
        self.peak, self.batches = 0, []

    def need(self, b: int) -> int:
        return int(self.fixed + self.per_sample * b + self.quad * b * b)

    def step(self, b: int) -> None:
        self.batches.append(b)
        if self.need(b) > self.hard_limit or (self.oom_above is not None and b > self.oom_above):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {self.need(b)} bytes")
        self.peak = max(self.peak, self.need(b))

    # MemoryProbe
    def reset(self) -> None:
        self.peak = 0

    def peak_bytes(self) -> int:
        return self.peak

    def total_bytes(self) -> int:
        return self.total


def _dummy_model() -> nn.Module:
    return nn.Linear(2, 2)


def _find(sim: SimMemory, T: int, total: int, W: int = 1, **kw):
    kw.setdefault("use_cache", False)
    kw.setdefault("headroom_bytes", 0)
    kw.setdefault("accum_reserve_bytes", 0)
    return find_device_batch_size(sim.step, model=kw.pop("model", _dummy_model()), optimizers=kw.pop("optimizers", []),
                                  seq_len=T, total_batch_tokens=total, world_size=W, device="cpu", probe=sim, **kw)


def _optimum(sim: SimMemory, cands: list[int], budget: int) -> int:
    return max(c for c in cands if sim.need(c) <= budget and sim.need(c) <= sim.hard_limit)


# ---------------------------------------------------------------------------------------------------
# exactness and optimality


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 3, 16, 100, 2048]), W=st.integers(1, 8), rows=st.integers(1, 600),
       fixed=st.integers(0, 10_000), per=st.integers(1, 1000), room=st.integers(0, 200_000))
def test_exact_and_optimal(T, W, rows, fixed, per, room):
    total = rows * T * W
    sim = SimMemory(fixed, per, fixed + per + room)  # batch 1 always fits
    res = _find(sim, T, total, W)
    assert res.device_batch_size >= 1
    assert res.device_batch_size * res.grad_accum * W * T == total
    cands = ab.candidate_batch_sizes(total, T, W)
    assert all(total % (c * T * W) == 0 for c in cands)
    assert res.device_batch_size == _optimum(sim, cands, sim.total)
    assert res.compiles <= 3  # linear memory: 2 probes + 1 verify at most
    assert res.compiles == len({p.batch_size for p in res.probes})


def test_headroom_respected_and_table():
    sim = SimMemory(fixed=100 * MiB, per_sample=10 * MiB, total=1000 * MiB)
    res = _find(sim, 8, 8 * 256, headroom_bytes=300 * MiB)  # budget 700 MiB -> b ≤ 60 -> 32
    assert res.device_batch_size == 32 and res.grad_accum == 8
    assert res.budget_bytes == 700 * MiB and res.measured_peak == sim.need(32)
    assert res.fit_a == pytest.approx(100 * MiB) and res.fit_b == pytest.approx(10 * MiB)
    assert res.predicted_peak == pytest.approx(sim.need(32), rel=1e-6)
    d = res.to_dict()
    for k in ("chosen", "seconds", "compiles", "probes", "predicted_peak", "measured_peak", "cache_hit"):
        assert k in d
    json.dumps(d)
    table = res.table()
    assert "chosen" in table and "grad accum 8" in table and "miss" in table


def test_room_for_gradients_when_accumulating():
    # Micro-steps after the first start with a full set of gradients, which one probe never sees.
    sim = SimMemory(fixed=100, per_sample=10, total=500)  # 32 needs 420
    assert _find(sim, 4, 4 * 64, accum_reserve_bytes=50).device_batch_size == 32
    assert _find(sim, 4, 4 * 64, accum_reserve_bytes=150).device_batch_size == 16
    assert _find(sim, 4, 4 * 32, accum_reserve_bytes=150).device_batch_size == 32  # no accumulation at 32
    model = nn.Linear(10, 10, bias=False)  # default reserve: the model's gradient bytes
    sim = SimMemory(fixed=100, per_sample=10, total=10_000)
    res = find_device_batch_size(sim.step, model=model, optimizers=[], seq_len=4, total_batch_tokens=256,
                                 device="cpu", probe=sim, use_cache=False, headroom_bytes=0)
    assert res.accum_reserve_bytes == 400 and res.device_batch_size == 64


def test_convex_memory_steps_down_to_a_fitting_size():
    # Memory grows faster than the small probes suggest: the verify overshoots and steps down.
    sim = SimMemory(fixed=0, per_sample=10, total=2000, quad=1.0)
    res = _find(sim, 4, 4 * 256)
    cands = ab.candidate_batch_sizes(4 * 256, 4)
    assert res.device_batch_size == _optimum(sim, cands, sim.total)
    assert any(p.phase == "verify" and not p.fits for p in res.probes)


def test_flat_peak_with_hidden_oom_bisects():
    # Peaks do not grow (no slope), yet sizes above 16 OOM: the finder must still land on 16.
    sim = SimMemory(fixed=1000, per_sample=0, total=10_000, oom_above=16)
    res = _find(sim, 2, 2 * 1024)
    assert res.device_batch_size == 16
    assert all(p.oom for p in res.probes if p.batch_size > 16)


def test_not_divisible_and_batch_one_too_big():
    with pytest.raises(AutoBatchError, match="not divisible"):
        _find(SimMemory(0, 1, 100), 3, 100)
    sim = SimMemory(fixed=5 * 2**30, per_sample=2**30, total=4 * 2**30, hard_limit=100 * 2**30)
    with pytest.raises(AutoBatchError) as e:
        _find(sim, 2048, 2048 * 8)
    msg = str(e.value)
    assert "batch size 1 does not fit" in msg and "6.00 GiB" in msg and "4.00 GiB" in msg
    assert "seq_len 2048" in msg and "--depth" in msg and "--seq-len" in msg
    with pytest.raises(AutoBatchError, match="ran out of memory"):
        _find(SimMemory(fixed=5, per_sample=1, total=4), 16, 16 * 8)


# ---------------------------------------------------------------------------------------------------
# errors


def test_oom_classification():
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom_error(torch.cuda.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_oom_error(wrapped)
    assert not is_oom_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom_error(ValueError("out of memory"))  # only RuntimeError messages count
    assert not is_oom_error(KeyError("x"))


def test_non_oom_errors_propagate_and_leave_no_trace():
    model = _dummy_model()
    before = [p.detach().clone() for p in model.parameters()]
    sim = SimMemory(0, 1, 1000)

    def step(b: int) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a probe that changes weights, then fails for an unrelated reason
        if b >= 2:
            raise ValueError("shape mismatch in user code")
        sim.step(b)

    with pytest.raises(ValueError, match="shape mismatch"):
        find_device_batch_size(step, model=model, optimizers=[], seq_len=4, total_batch_tokens=64,
                               device="cpu", probe=sim, use_cache=False, headroom_bytes=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_cpu_skip_uses_validated_default(caplog):
    kw = dict(model=_dummy_model(), optimizers=[], seq_len=8, total_batch_tokens=8 * 16, device="cpu")
    res = find_device_batch_size(lambda b: None, default=8, **kw)
    assert (res.device_batch_size, res.grad_accum, res.compiles) == (8, 2, 0) and res.skipped
    res = find_device_batch_size(lambda b: None, default=6, **kw)  # 6 does not divide 16 rows
    assert res.device_batch_size == 4 and "instead" in res.skipped
    with pytest.raises(AutoBatchError, match="needs CUDA"):
        find_device_batch_size(lambda b: None, default=None, **kw)


# ---------------------------------------------------------------------------------------------------
# no side effects with a real model and real optimizers


def _tiny(seed: int = 0):
    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=1)
    model = build_model(cfg, torch.device("cpu"), seed=seed)
    groups = model.param_groups()
    adam = torch.optim.AdamW([{"params": groups["embedding"], "lr": 0.2}, {"params": groups["unembedding"]},
                              *([{"params": groups["scalar"]}] if groups["scalar"] else [])],
                             lr=0.004, betas=(0.8, 0.95), weight_decay=0.0)
    muon = torch.optim.Muon(groups["matrix"], lr=0.02, weight_decay=0.0)
    return model, [adam, muon]


def _make_step(model, optimizers, sim: SimMemory | None = None):
    V, T = model.config.vocab_size, model.config.seq_len

    def step(b: int) -> None:
        model.train()
        idx = torch.randint(0, V, (b, T + 1))
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        random.random(), np.random.rand()  # consume the other generators too
        if sim is not None:
            sim.step(b)

    return step


@pytest.mark.parametrize("warm_state", [False, True])
def test_first_step_identical_with_and_without_finder(warm_state):
    def run(use_finder: bool):
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        model, opts = _tiny()
        step = _make_step(model, opts)
        if warm_state:  # optimizer state already allocated (e.g. a resumed run)
            step(2)
        model.eval()  # the finder must hand the mode back as it found it
        if use_finder:
            sim = SimMemory(fixed=1000, per_sample=100, total=1000 + 100 * 8 + 50)
            res = find_device_batch_size(_make_step(model, opts, sim), model=model, optimizers=opts,
                                         seq_len=16, total_batch_tokens=16 * 16, device="cpu", probe=sim,
                                         use_cache=False, headroom_bytes=0, accum_reserve_bytes=0)
            assert res.device_batch_size == 8 and res.compiles == 3
            assert sim.batches  # the real step did run
            assert not model.training and not any(m.training for m in model.modules())
            assert all(p.grad is None for p in model.parameters())
            assert bool(opts[0].state) == warm_state and bool(opts[1].state) == warm_state
        step(4)  # the first training step
        state = {"weights": [p.detach().clone() for p in model.parameters()],
                 "rng": torch.get_rng_state(), "py": random.getstate(), "np": np.random.get_state()[1].copy(),
                 "opt": [[t.clone() for s in o.state.values() for t in s.values() if torch.is_tensor(t)] for o in opts],
                 "lr": [[g["lr"] for g in o.param_groups] for o in opts]}
        return state

    a, b = run(False), run(True)
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert torch.equal(a["rng"], b["rng"]) and a["py"] == b["py"] and np.array_equal(a["np"], b["np"])
    assert len(a["opt"]) == len(b["opt"])
    for xs, ys in zip(a["opt"], b["opt"]):
        assert len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))
    assert a["lr"] == b["lr"]


# ---------------------------------------------------------------------------------------------------
# cache


def test_cache_keys_hits_and_bad_entries(tmp_path):
    path = tmp_path / "autobatch_cache.json"
    sim = SimMemory(fixed=100, per_sample=10, total=100 + 10 * 40)  # fits ≤ 40 -> 32

    def find(key=None, total=None, W=1):
        s = SimMemory(sim.fixed, sim.per_sample, total or sim.total)
        return _find(s, 4, 4 * 128 * W, W, use_cache=True, cache_path=path, cache_key=key or {"depth": 2}), s

    r1, _ = find()
    assert not r1.cache_hit and r1.device_batch_size == 32 and r1.compiles == 3
    r2, s2 = find()
    assert r2.cache_hit and r2.device_batch_size == 32 and r2.cache_key == r1.cache_key
    assert [p.phase for p in r2.probes] == ["cache-verify"] and r2.compiles == 1 and s2.batches == [32, 32]
    # Everything that changes memory changes the key.
    keys = {r1.cache_key, find({"depth": 3})[0].cache_key, find({"depth": 2, "compile": "off"})[0].cache_key,
            find(total=100 + 10 * 20)[0].cache_key, find(W=2)[0].cache_key}
    assert len(keys) == 5
    assert len(json.loads(path.read_text())["entries"]) == 5
    # A cached size that no longer fits fails its verification, is marked bad, and a search follows.
    data = json.loads(path.read_text())
    data["entries"][r1.cache_key]["device_batch_size"] = 64
    path.write_text(json.dumps(data))
    r3, _ = find()
    assert not r3.cache_hit and r3.device_batch_size == 32
    assert r3.probes[0].phase == "cache-verify" and not r3.probes[0].fits
    assert 64 in json.loads(path.read_text())["entries"][r1.cache_key]["bad_sizes"]
    # The trainer hit an OOM at 32 during training: the entry is ignored, and 32+ are out from then on.
    mark_bad(r1.cache_key, path=path)
    r4, _ = find()
    assert not r4.cache_hit and r4.device_batch_size == 16
    r5, _ = find()
    assert r5.cache_hit and r5.device_batch_size == 16


# ---------------------------------------------------------------------------------------------------
# ranks: gloo processes with different budgets agree and never hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    T, total, out = 4, 4 * world * 64, {}
    try:
        # 1) different budgets: rank r fits ≤ 8·(r+1)+3 rows, so all must pick 8.
        sim = SimMemory(fixed=1000, per_sample=100, total=1000 + 100 * (8 * (rank + 1) + 3))
        res = _find(sim, T, total, world, use_cache=True, cache_path=Path(out_dir) / "cache.json")
        out["budgets"] = res.device_batch_size
        res = _find(SimMemory(1000, 100, sim.total), T, total, world, use_cache=True,
                    cache_path=Path(out_dir) / "cache.json")
        out["cached"] = [res.device_batch_size, res.cache_hit]
        # 2) the last rank claims plenty of memory but OOMs above 4: the OOM counts for every rank.
        liar = rank == world - 1
        sim = SimMemory(1000, 100, 10**9, oom_above=4 if liar else None)
        out["oom"] = _find(sim, T, total, world).device_batch_size
        # 3) rank 0 fails for a non-memory reason: it re-raises, the others get an error, nobody hangs.
        sim = SimMemory(1000, 100, 10**9)

        def step(b: int) -> None:
            if rank == 0 and b >= 2:
                raise ValueError("boom")
            sim.step(b)

        try:
            find_device_batch_size(step, model=_dummy_model(), optimizers=[], seq_len=T, total_batch_tokens=total,
                                   world_size=world, device="cpu", probe=sim, use_cache=False, headroom_bytes=0)
            out["error"] = "none"
        except ValueError:
            out["error"] = "ValueError"
        except RuntimeError as e:
            out["error"] = "RuntimeError" if "another rank" in str(e) else repr(e)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [3])
def test_ranks_agree_without_hanging(tmp_path, world):
    ctx = forkrun.context()  # fresh processes, forked from a server that has torch imported
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, o in enumerate(outs):
        assert o["budgets"] == 8
        assert o["cached"] == [8, True]
        assert o["oom"] == 4
        assert o["error"] == ("ValueError" if r == 0 else "RuntimeError")


def test_trainer_marks_the_chosen_size_bad_after_an_oom_in_training(home):
    """An OOM in training at the finder's size marks its cache entry, so the next search goes below it."""
    from picochat.config import TrainConfig
    from picochat.train.autobatch_cache import default_cache_path, load_cache
    from picochat.train.loop import Trainer

    sim = SimMemory(fixed=100, per_sample=10, total=100 + 10 * 40)
    first = _find(sim, 4, 4 * 128, 1, use_cache=True, cache_key={"depth": 2})
    assert first.device_batch_size == 32
    trainer = Trainer(TrainConfig(run="oom"), ModelConfig.from_depth(1), None, make_batches=None)
    trainer.autobatch_key = first.cache_key
    trainer._mark_batch_bad_on_oom(ValueError("not memory"), 32)  # other errors leave the cache alone
    assert not load_cache(default_cache_path())["entries"][first.cache_key].get("bad")
    trainer._mark_batch_bad_on_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 32)
    assert load_cache(default_cache_path())["entries"][first.cache_key]["bad_sizes"] == [32]
    again = _find(SimMemory(sim.fixed, sim.per_sample, sim.total), 4, 4 * 128, 1, use_cache=True,
                  cache_key={"depth": 2})
    assert not again.cache_hit and again.device_batch_size == 16


# ---------------------------------------------------------------------------------------------------
# one probe: the resting memory is the intercept


class SimMemoryAtRest(SimMemory):
    """SimMemory whose `fixed` splits into memory held at rest (weights, optimizer state) and a
    per-step buffer that does not grow with the batch; reports the resting part like CUDA does."""

    def __init__(self, rest: int, step_buffer: int, per_sample: int, total: int, **kw):
        super().__init__(rest + step_buffer, per_sample, total, **kw)
        self.rest = rest

    def current_bytes(self) -> int:
        return self.rest


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 16, 2048]), rows=st.integers(1, 300).map(lambda r: 2 * r), rest=st.integers(0, 10_000),
       buffer=st.integers(0, 2_000), per=st.integers(1, 1000), room=st.integers(0, 200_000))
def test_one_probe_is_exact_near_optimal_and_compiles_at_most_three(T, rows, rest, buffer, per, room):
    total = rows * T
    sim = SimMemoryAtRest(rest, buffer, per, rest + buffer + 4 * per + room)  # batch 4 always fits
    res = _find(sim, T, total)
    cands = ab.candidate_batch_sizes(total, T, 1)
    assert res.device_batch_size * res.grad_accum * T == total
    assert sim.need(res.device_batch_size) <= sim.total  # it fits
    # optimal, except that a second verify needs its predicted peak 5% under the budget
    near = [c for c in cands if sim.need(c) <= ab.EXTRAPOLATION_SLACK * sim.total]
    assert max(near, default=cands[0]) <= res.device_batch_size
    assert res.compiles <= 3 and res.compiles == len({p.batch_size for p in res.probes})
    assert res.probes[0].phase == "probe" and res.probes[0].rest_bytes == rest
    assert sum(p.phase == "probe" for p in res.probes) == 1


def test_one_probe_saves_a_compile_on_a_large_gpu():
    # d12 on an H200, roughly: 1.3 GiB at rest, 1.3 GiB of per-step buffers, 1.06 GiB per row.
    GiB = 2**30
    sim = SimMemoryAtRest(int(1.3 * GiB), int(1.3 * GiB), int(1.06 * GiB), 139 * GiB)
    res = _find(sim, 2048, 2048 * 256, headroom_bytes=7 * GiB)
    assert res.device_batch_size == 64 and res.compiles == 2
    assert [p.batch_size for p in res.probes] == [4, 64]
    # the probe run eagerly: the verified shape is the only one compiled (and training reuses it)
    eager = _find(sim, 2048, 2048 * 256, headroom_bytes=7 * GiB, eager_probe=True)
    assert eager.device_batch_size == 64 and eager.compiles == 1
    assert [(p.batch_size, p.phase) for p in eager.probes] == [(4, "eager-probe"), (64, "verify")]


def test_one_probe_falls_back_to_two_when_batch_four_does_not_fit():
    sim = SimMemoryAtRest(100, 0, 60, 200)  # batch 1 fits (160), batch 2 does not (220)
    res = _find(sim, 4, 4 * 8)
    assert res.device_batch_size == 1
    assert [p.batch_size for p in res.probes] == [4, 1, 2]


@torch.compile(backend="eager", dynamic=False)
def _compiled_or_not(x: torch.Tensor) -> torch.Tensor:
    """1 when torch.compile traced this call, 0 when it ran eagerly (the finder's eager probe)."""
    return x + 1 if torch.compiler.is_compiling() else x


class SimEagerVsCompiled(SimMemoryAtRest):
    """Eager steps keep more activations per row than compiled ones (on the H200 at d12: 1.78 vs
    0.95 GiB per row); the finder's eager probe runs under set_stance("force_eager"), which the
    step detects through a real torch.compile'd function."""

    def __init__(self, rest: int, per_row_compiled: int, per_row_eager: int, total: int, **kw):
        super().__init__(rest, 0, per_row_compiled, total, **kw)
        self.per_row_compiled, self.per_row_eager = per_row_compiled, per_row_eager

    def step(self, b: int) -> None:
        compiled = bool(_compiled_or_not(torch.zeros(())).item())
        self.per_sample = self.per_row_compiled if compiled else self.per_row_eager
        super().step(b)


GiB = 2**30


def test_no_second_verify_that_doubles_one_compiled_measurement_near_the_budget():
    # The H200 at d12 (2db4a3a): 1.28 GiB at rest, 0.95 GiB per row compiled, 1.78 eager; 139.2 GiB usable.
    # The eager line verifies 64 (62 GiB); the line through it puts 128 at 123 of a 132 GiB budget, and
    # 128 ran out of memory on the real GPU (fragmentation after the 64 verify): no verify of 128.
    sim = SimEagerVsCompiled(int(1.28 * GiB), int(0.95 * GiB), int(1.78 * GiB), int(139.2 * GiB), oom_above=64)
    res = _find(sim, 2048, 2048 * 256, headroom_bytes=None, eager_probe=True)
    assert res.device_batch_size == 64 and res.compiles == 1
    assert [(p.batch_size, p.phase) for p in res.probes] == [(4, "eager-probe"), (64, "verify")]
    assert 128 not in sim.batches
    assert res.probes[0].peak_bytes > sim.need(4)  # the probe really ran eagerly (more per row)


def test_second_verify_still_taken_with_room_to_spare():
    # The same model on an 80 GB GPU: the eager line verifies 32 (31.7 GiB), and the line through it
    # puts 64 at 62.1 GiB, 83% of the 74.6 GiB budget: worth one more compile, and it fits.
    sim = SimEagerVsCompiled(int(1.28 * GiB), int(0.95 * GiB), int(1.78 * GiB), int(78.57 * GiB))
    res = _find(sim, 2048, 2048 * 256, headroom_bytes=None, eager_probe=True)
    assert [(p.batch_size, p.phase, p.fits) for p in res.probes] == [
        (4, "eager-probe", True), (32, "verify", True), (64, "verify", True)]
    assert res.device_batch_size == 64 and res.compiles == 2
    assert all(p.seconds >= 0 for p in res.probes) and "seconds" in res.table()
