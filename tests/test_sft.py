"""Midtraining/SFT: packed + document-masked batches are exact, token weighting is exact, the stages
run end to end, truncation is never silent, compiled SFT does not recompile; eval and the benchmark."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from picochat.config import ModelConfig, TrainConfig
from picochat.data.chat import IGNORE, SFTBatcher, TaskMixture
from picochat.model.attention import document_mask
from picochat.model.gpt import build_model
from picochat.train.sft import PrerenderedTask, PrerenderedTokenizer

V = 64


def _tiny_gpt(seed: int = 0, seq_len: int = 64):
    cfg = ModelConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    model = build_model(cfg, torch.device("cpu"), seed=seed)
    # output projections start at zero, which would make attention irrelevant: give them weight
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1, generator=g)
            block.mlp.c_proj.weight.normal_(0, 0.1, generator=g)
    return model


def _docs(lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, V, size=n)
        ids[0] = 0  # bos
        mask = (rng.random(n) < 0.6).astype(np.int64)
        mask[0] = 0
        out.append((ids.tolist(), mask.tolist()))
    return out


def _batcher(docs, B: int, T: int, mode: str = "packed") -> SFTBatcher:
    return SFTBatcher(TaskMixture([PrerenderedTask(docs)], epochs=1), PrerenderedTokenizer(0), B, T, mode=mode)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _unpacked_reference(model, docs):
    """Each conversation alone, unpadded: sum of loss over all loss tokens / their count."""
    model.zero_grad(set_to_none=True)
    total, count = torch.zeros(()), 0
    for ids, mask in docs:
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
        y = torch.where(mask_t[1:] == 1, ids_t[1:], torch.tensor(IGNORE))
        total = total + model(ids_t[None, :-1], y[None], loss_reduction="sum")
        count += int((y != IGNORE).sum())
    loss = total / count
    loss.backward()
    return loss.detach(), _grads(model)


# ---------------------------------------------------------------------------------------------------
# (a) exactness of packing with document masking


@pytest.mark.parametrize("use_flex", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_packed_equals_unpacked(use_flex: bool) -> None:
    # the SDPA boolean mask runs on CPU; the FlexAttention block mask is the CUDA path (fp32 here)
    if use_flex and not torch.cuda.is_available():
        pytest.skip("FlexAttention's block-mask path needs CUDA")
    device = torch.device("cuda" if use_flex else "cpu")
    model = _tiny_gpt()
    docs = _docs([11, 17, 23, 6])
    batch = _batcher(docs, B=1, T=63).next_batch()
    assert batch["doc_ids"].max() == 3, "all four conversations must share the one row"
    assert (batch["doc_ids"] == -1).any(), "and leave some padding"
    ref_loss, ref_grads = _unpacked_reference(model, docs)

    model = model.to(device)
    model.zero_grad(set_to_none=True)
    mask = document_mask(batch["doc_ids"].to(device), use_flex=use_flex)
    x, y = batch["inputs"].to(device), batch["targets"].to(device)
    loss = model(x, y, attn_mask=mask, loss_reduction="sum") / batch["n_loss_tokens"]
    loss.backward()
    assert batch["n_loss_tokens"] == sum(sum(m[1:]) for _, m in docs)
    tol = dict(atol=1e-5, rtol=1e-4) if device.type == "cpu" else dict(atol=1e-4, rtol=1e-3)  # TF32-free, but
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, **tol)  # other kernels: looser on GPU
    for name, g in _grads(model).items():
        torch.testing.assert_close(g.cpu(), ref_grads[name], **tol, msg=name)


def test_packed_without_mask_differs_and_padded_is_exact_without_mask() -> None:
    model = _tiny_gpt()
    docs = _docs([11, 17, 23, 6], seed=1)
    ref_loss, ref_grads = _unpacked_reference(model, docs)
    packed = _batcher(docs, B=1, T=63).next_batch()
    with torch.no_grad():  # the mask matters: without it packed conversations see each other
        leaky = model(packed["inputs"], packed["targets"], loss_reduction="sum") / packed["n_loss_tokens"]
    assert abs(leaky - ref_loss) > 1e-4
    # padded rows (the baseline): padding only at the tail, so plain causal attention is exact
    padded = _batcher(docs, B=4, T=31, mode="padded").next_batch()
    model.zero_grad(set_to_none=True)
    loss = model(padded["inputs"], padded["targets"], loss_reduction="sum") / padded["n_loss_tokens"]
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------
# (b) exact token weighting through the Trainer


class _Rows:
    def __init__(self, rows: list[dict], B: int):
        self.rows, self.B, self.i = rows, B, 0

    def __next__(self) -> dict:
        part = self.rows[self.i:self.i + self.B]
        self.i += self.B
        return {k: torch.cat([r[k] for r in part]) for k in ("inputs", "targets", "doc_ids")}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _one_step(B: int, rows: list[dict], T: int):
    from picochat.train.loop import Trainer

    cfg = TrainConfig(run="weights", stage="sft", depth=1, seq_len=T, device_batch_size=B, total_batch_tokens=2 * T,
                      num_steps=1, eval_every=0, sample_every=0, save_every=-1, compile=False, device="cpu")
    model_cfg = ModelConfig(vocab_size=V, seq_len=T, n_layer=1, n_embd=64, n_head=4, n_kv_head=4)
    losses = []
    trainer = Trainer(cfg, model_cfg, None, lambda b, dist, d: _Rows(rows, b),
                      on_step=lambda s, t: losses.append(s.loss))
    trainer.train()
    return losses[0], {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_exact_token_weighting_across_micro_batches(home) -> None:
    T = 31
    rows = [_batcher(_docs([12], seed=2), 1, T).next_batch(),  # few loss tokens
            _batcher(_docs([20, 12], seed=3), 1, T).next_batch()]  # many more
    counts = [r["n_loss_tokens"] for r in rows]
    assert counts[0] * 2 < counts[1], counts
    loss_accum, w_accum = _one_step(1, rows, T)  # two micro-batches of uneven loss-token counts
    loss_big, w_big = _one_step(2, rows, T)  # one batch holding both rows
    # the reference: the mean over every loss token of the step, computed directly
    model = build_model(ModelConfig(vocab_size=V, seq_len=T, n_layer=1, n_embd=64, n_head=4, n_kv_head=4),
                        torch.device("cpu"), seed=42)
    with torch.no_grad():
        x = torch.cat([r["inputs"] for r in rows])
        y = torch.cat([r["targets"] for r in rows])
        ref = model(x, y, attn_mask=document_mask(torch.cat([r["doc_ids"] for r in rows])), loss_reduction="mean")
    assert loss_accum == pytest.approx(ref.item(), abs=1e-5)
    assert loss_big == pytest.approx(ref.item(), abs=1e-5)
    # a naive mean of per-micro-batch means would differ
    with torch.no_grad():
        naive = sum(model(r["inputs"], r["targets"], attn_mask=document_mask(r["doc_ids"])) for r in rows) / 2
    assert abs(naive.item() - ref.item()) > 1e-4  # (random init: per-token losses are all near ln V)
    for name in w_big:
        torch.testing.assert_close(w_accum[name], w_big[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------
# (c) end to end: pretrain -> midtrain -> sft -> eval


def test_midtrain_sft_end_to_end(home, tiny_run) -> None:
    from picochat.cli import main
    from picochat.runs import RunPaths
    from picochat.config import DataConfig
    from picochat.eval.chat_eval import evaluate_task, load_eval_task, trivial_baseline
    from picochat import runs as ckpt
    from picochat.train.cli import pretrain
    from picochat.train.sft import ChatDataConfig, chat_train

    pretrain(TrainConfig(run="tiny", depth=1, seq_len=64, device_batch_size=4, total_batch_tokens=512, num_steps=3,
                         eval_every=0, sample_every=0, save_every=0, device="cpu"), DataConfig(embedded_docs=2000))
    data = ChatDataConfig(synthetic_size=60, val_size=12)
    mid = chat_train(TrainConfig(run="tiny", stage="mid", depth=0, seq_len=128, device_batch_size=2,
                                 total_batch_tokens=512, num_steps=2, eval_every=2, sample_every=0, save_every=0,
                                 device="cpu"), data)
    assert mid["steps"] == 2 and mid["init_from"].endswith("step_000003") and mid["val_bpb"] > 0
    assert mid["padding_frac"] < 0.5  # packed rows are mostly real tokens
    # sft with the step count planned from the mixture (0.25 epoch), through the command line
    rc = main(["sft", "--run", "tiny", "--seq-len", "128", "--device-batch-size", "2", "--total-batch-tokens", "256",
               "--epochs", "0.25", "--synthetic-size", "60", "--eval-every", "0", "--device", "cpu"])
    assert rc == 0
    paths = RunPaths.for_run("tiny")
    for stage in ("base", "mid", "sft"):
        assert ckpt.latest_checkpoint(paths.stage(stage)) is not None, stage
    model, tokenizer, meta = ckpt.load_model("tiny", "sft")
    assert meta["stage"] == "sft" and meta["model"]["seq_len"] == 128
    steps = json.loads((paths.logs / "train_sft.jsonl").read_text().splitlines()[-1])["step"] + 1
    assert 1 <= steps <= 10

    task = load_eval_task("arithmetic", size=3)
    row = evaluate_task(model, tokenizer, task, max_examples=3, batch_size=2, max_tokens=16)
    assert row["n"] == 3 and 0.0 <= row["accuracy"] <= 1.0
    assert trivial_baseline(load_eval_task("identity", size=10)) == 1.0  # "picochat" always is right
    assert main(["eval", "--run", "tiny", "--tasks", "identity,spelling", "--max-examples", "2",
                 "--max-tokens", "8", "--device", "cpu"]) == 0
    report = paths.report.read_text()
    assert "## Chat evaluation (sft)" in report and "| spelling | 2 |" in report
    assert main(["eval", "--run", "tiny", "--tasks", "identity", "--max-examples", "2", "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    assert paths.report.read_text().count("## Chat evaluation (sft)") == 1  # replaced, not duplicated


def test_sft_without_checkpoint_says_what_to_do(home, tiny_run) -> None:
    from picochat.train.sft import ChatDataConfig, chat_train

    with pytest.raises(FileNotFoundError, match="picochat pretrain --run tiny"):
        chat_train(TrainConfig(run="tiny", stage="sft", depth=0, seq_len=64, device="cpu"), ChatDataConfig())


# ---------------------------------------------------------------------------------------------------
# (d) truncation is counted and warned


def test_overlong_conversation_is_truncated_with_warning(caplog) -> None:
    from picochat.tokenizer import Tokenizer
    from picochat.train.sft import ChatDataConfig, make_chat_batches

    tok = Tokenizer({bytes([b]): b for b in range(256)})

    class Long:
        name, eval_type = "long", "generative"

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            user = "x" * (10 if i else 500)  # item 0 is far longer than a row
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}

    make = make_chat_batches([Long()], [1.0], tok, ChatDataConfig(), seq_len=64)
    logger = logging.getLogger("picochat")
    logger.addHandler(caplog.handler)  # the project logger does not propagate once set up
    try:
        source = make(2, __import__("picochat.common", fromlist=["DistInfo"]).DistInfo(), torch.device("cpu"))
        batch = next(source)
    finally:
        logger.removeHandler(caplog.handler)
    assert batch["inputs"].shape == (2, 64)
    assert make.batchers[0].stats["truncated"] >= 1
    assert any("truncated" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------
# the benchmark on CPU (tiny)


def test_bench_sft_cpu(home, capsys) -> None:
    from picochat.cli import main

    out_file = home / "results.jsonl"
    rc = main(["bench", "sft", "--depth", "1", "--seq-len", "128", "--batch-size", "2", "--steps", "2",
               "--warmup", "1", "--vocab-size", "256", "--length-median", "40", "--device", "cpu",
               "--append", str(out_file)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_mode = {r["mode"]: r for r in last}
    assert set(by_mode) == {"packed", "padded", "pretrain"}
    for r in last:
        assert r["bench"] == "sft" and r["depth"] == 1 and r["useful_tok_per_s"] > 0
        for key in ("gpu", "torch", "date", "commit", "command", "loss_tok_per_s", "padding_frac"):
            assert key in r
    assert by_mode["packed"]["padding_frac"] < by_mode["padded"]["padding_frac"]
    assert "useful_vs_pretrain" in by_mode["packed"] and "useful_vs_padded" in by_mode["packed"]
    assert len(out_file.read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------------
# (e) compiled SFT: fixed shapes, no recompilation after warm-up (CUDA; and CPU, where the demo compiles)


def _packed_sft(device: str, compile: bool, T: int, B: int, steps: int, depth: int = 2):
    """Packed, document-masked SFT steps through the real Trainer: (trainer, losses, the compiler's
    count of unique graphs after each step)."""
    from torch._dynamo import reset as dynamo_reset
    from torch._dynamo.utils import counters

    from picochat.bench.sft import build_batches, synthetic_conversations
    from picochat.train.loop import Trainer

    dynamo_reset()
    docs = synthetic_conversations(512, V, median=T // 4, sigma=0.9, seed=0)
    batches, _ = build_batches("packed", docs, B, T, steps, None)
    cfg = TrainConfig(run="compiled", stage="sft", depth=depth, seq_len=T, device_batch_size=B,
                      total_batch_tokens=B * T, num_steps=steps, eval_every=0, sample_every=0, save_every=-1,
                      compile=compile, device=device)
    model_cfg = ModelConfig.from_depth(depth, vocab_size=V, seq_len=T)
    losses: list[float] = []
    graphs: list[int] = []

    class Source:
        i = 0

        def __next__(self):
            b = batches[self.i % len(batches)]
            self.i += 1
            return {k: b[k].to(device) for k in ("inputs", "targets", "doc_ids")}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def on_step(s, t):
        losses.append(s.loss)
        graphs.append(counters["stats"]["unique_graphs"])

    trainer = Trainer(cfg, model_cfg, None, lambda b, dist, d: Source(), on_step=on_step)
    trainer.train()
    return trainer, losses, graphs


@pytest.mark.gpu
def test_compiled_sft_does_not_recompile(home) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    trainer, _, seen = _packed_sft("cuda", True, T=256, B=4, steps=10)
    assert trainer.compiled
    assert seen[1] > 0, "nothing was compiled"
    assert seen[-1] == seen[1], f"recompiled after warm-up: unique graphs per step {seen}"


def test_compiled_cpu_sft_matches_eager(home, monkeypatch) -> None:
    """What `picochat demo` runs on a CPU: the compiled packed SFT step (C++ kernels) gives the eager
    losses to float32 rounding and compiles once; where compiling is impossible it trains eagerly,
    saying so, instead of failing at the first step."""
    from picochat import common

    if common.cpu_compile_problem():
        pytest.skip(f"torch.compile cannot run here: {common.cpu_compile_problem()}")
    shape = dict(T=64, B=2, steps=4, depth=1)
    _, eager, _ = _packed_sft("cpu", False, **shape)
    trainer, compiled, graphs = _packed_sft("cpu", True, **shape)
    assert trainer.compiled and graphs[0] > 0 and graphs[-1] == graphs[0], graphs
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5), (compiled, eager)

    # with no compiler to find, the probe says so (the real check, uncached) ...
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    problem = common.cpu_compile_problem.__wrapped__()
    assert problem and problem.startswith("no C++ compiler"), problem
    # ... and the trainer trains eagerly instead of failing at its first step
    monkeypatch.setattr(common, "cpu_compile_problem", lambda: problem)
    from picochat.train import loop

    monkeypatch.setattr(loop, "cpu_compile_problem", common.cpu_compile_problem)
    trainer, fallback, _ = _packed_sft("cpu", True, **{**shape, "steps": 1})
    assert not trainer.compiled and fallback == pytest.approx(eager[:1], rel=1e-6)


def test_sft_resume_is_exact(home, tiny_run) -> None:
    """Interrupted after step 2 of 4 (its later checkpoint lost), SFT resumes to the same losses and
    the same final weights: the packed-batch state (mixture position, pending conversations) resumes."""
    import shutil

    from safetensors.torch import load_file

    from picochat.runs import RunPaths
    from picochat.config import DataConfig
    from picochat import runs as ckpt
    from picochat.train.cli import pretrain
    from picochat.train.sft import ChatDataConfig, chat_train

    pretrain(TrainConfig(run="tiny", depth=1, seq_len=64, device_batch_size=4, total_batch_tokens=256, num_steps=2,
                         eval_every=0, sample_every=0, save_every=0, device="cpu"), DataConfig(embedded_docs=2000))
    cfg = TrainConfig(run="tiny", stage="sft", depth=0, seq_len=64, device_batch_size=2, total_batch_tokens=256,
                      num_steps=4, eval_every=0, sample_every=0, save_every=2, device="cpu")
    data = ChatDataConfig(synthetic_size=80)
    chat_train(cfg, data, start_from=("base",))
    paths = RunPaths.for_run("tiny")
    final = ckpt.latest_checkpoint(paths.stage("sft"))
    assert final.name == "step_000004"
    reference = load_file(str(final / "model.safetensors"))
    log_lines = (paths.logs / "train_sft.jsonl").read_text().splitlines()
    clean = {json.loads(l)["step"]: json.loads(l)["loss"] for l in log_lines}
    shutil.rmtree(final)  # the crash came before step 4 was saved

    cfg.resume = True
    chat_train(cfg, data, start_from=("base",))
    resumed_lines = (paths.logs / "train_sft.jsonl").read_text().splitlines()[len(log_lines):]
    resumed = {json.loads(l)["step"]: json.loads(l)["loss"] for l in resumed_lines}
    assert sorted(resumed) == [2, 3]
    assert all(resumed[s] == clean[s] for s in (2, 3)), (resumed, clean)
    again = load_file(str(ckpt.latest_checkpoint(paths.stage("sft")) / "model.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
