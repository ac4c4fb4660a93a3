"""Inference engine: cached decode equals full forwards, sampling, stops, tool use, overflow,
UTF-8 streaming, the chat CLI's one-shot mode, and (CUDA only) the fast path against eager."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.config import ModelConfig
from picochat.infer import engine as engine_mod
from picochat.infer.engine import ContextOverflowError, Engine
from picochat.infer import batch as batch_mod
from picochat.infer.sampling import StreamDecoder, sample_next, sample_rows
from picochat.model.gpt import build_model
from picochat.tokenizer import Tokenizer

CPU = torch.device("cpu")
gpu = pytest.mark.gpu


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)})


def random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab=265, seq_len=64, device=CPU, seed=0):
    """A random GPT whose every weight matters (the default init zeroes the output projections,
    which would make each token's logits depend on that token alone)."""
    cfg = ModelConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                      n_kv_head=n_kv_head)
    model = build_model(cfg, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.3, generator=gen)
        model.lm_head.weight.normal_(0.0, 0.5, generator=gen)
    return model.eval()


class MarkovModel(nn.Module):
    """A model-free stand-in: the next token is a fixed function of the current one, so tests can
    script exactly what a row emits (tool calls, stops) through the real engine."""

    def __init__(self, table: dict[int, int], vocab: int = 265, seq_len: int = 64, default: int = ord("z")):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, seq_len=seq_len, n_layer=1, n_embd=8, n_head=1, n_kv_head=1)
        self.rotary_len = 4 * seq_len
        self.w = nn.Parameter(torch.zeros(1))
        nxt = torch.full((vocab,), default, dtype=torch.long)
        for a, b in table.items():
            nxt[a] = b
        self.register_buffer("nxt", nxt)

    def forward(self, idx, targets=None, *, attn_mask=None, kv_cache=None, logits_at=None):
        B, T = idx.shape
        if kv_cache is not None:
            kv_cache.pos += T
        if logits_at is not None:
            idx = idx[torch.arange(B), logits_at][:, None]
        return F.one_hot(self.nxt[idx], self.config.vocab_size).float() * 10.0


def chain(*tokens: int) -> dict[int, int]:
    return dict(zip(tokens[:-1], tokens[1:]))


# ---------------------------------------------------------------------------------------------------
# cached decode == full forward


@pytest.mark.parametrize("n_layer,n_head,n_kv_head,sync_every,fuse",
                         [(1, 2, 2, 1, False), (2, 4, 2, 1, False), (2, 4, 1, 3, False), (2, 4, 2, 3, True)])
def test_cached_logits_match_full_forward(monkeypatch, n_layer, n_head, n_kv_head, sync_every, fuse):
    torch.manual_seed(0)
    model = random_model(n_layer, n_head, n_kv_head)
    seen: list[torch.Tensor] = []

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample_rows(logits, *args, **kwargs)

    monkeypatch.setattr(batch_mod, "sample_rows", recording)  # the scheduler's sampler
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    eng = Engine(model, None, mode="eager", sync_every=sync_every, fuse=fuse)
    eng.window_step = 4  # attention windows switch every 4 positions: exercise the switching
    out = eng.generate_batch(prompts, max_tokens=8, temperature=1.0, seed=3)
    assert [len(o) for o in out] == [8, 8, 8]
    # call i gives the logits that chose each row's token i
    assert len(seen) == 8
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            seq = prompt + out[r]
            full = model(torch.tensor([seq]))[0]
            for i in range(8):
                torch.testing.assert_close(seen[i][r], full[len(prompt) - 1 + i], rtol=1e-4, atol=1e-4)


def test_naive_eager_and_chunked_agree_greedy():
    model = random_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    ref = Engine(model, None, mode="naive").generate_batch(prompts, max_tokens=10, temperature=0)
    assert Engine(model, None, mode="eager").generate_batch(prompts, max_tokens=10, temperature=0) == ref
    chunked = Engine(model, None, mode="eager", sync_every=4)
    chunked.window_step = 8
    assert chunked.generate_batch(prompts, max_tokens=10, temperature=0) == ref


def test_fused_qkv_copy_computes_the_same_function():
    model = random_model(n_layer=2, n_head=4, n_kv_head=2)
    idx = torch.randint(0, 265, (3, 12), generator=torch.Generator().manual_seed(0))
    eng = Engine(model, None, mode="eager", fuse=True)
    assert eng.model is not model and eng.model.blocks[0].attn.c_qkv is not None
    assert model.blocks[0].attn.c_qkv is None and hasattr(model.blocks[0].attn, "c_q")  # caller's model untouched
    with torch.no_grad():
        torch.testing.assert_close(eng.model(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_matches_eager():
    """The compiled step writes the cache in place (per-layer tensors); on CPU it runs through
    Inductor's C++ backend, without graphs: same greedy tokens and same cache as eager."""
    model = random_model(n_layer=2, n_head=4, n_kv_head=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    kw = dict(max_tokens=12, temperature=0)
    ref = Engine(model, None, mode="eager", sync_every=4)
    compiled = Engine(model, None, mode="eager", sync_every=4, compile=True, fuse=True)
    compiled.window_step = 8  # windows 8, 16, 22: one compilation with a dynamic window length
    assert compiled.generate_batch(prompts, **kw) == ref.generate_batch(prompts, **kw)
    a, b = ref.last_runner.cache, compiled.last_runner.cache.view(length=ref.last_runner.max_len)
    for layer in range(2):  # (the compiled runner's cache has one spare slot at the end)
        torch.testing.assert_close(b.k[layer], a.k[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.v[layer], a.v[layer], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sync_every", [2, 3, 5])
def test_chunked_speculative_decode_matches_step_by_step(sync_every):
    """Rows stop at different steps (stop tokens, max tokens) while the next chunk already runs:
    the tokens are those of one-step-at-a-time decoding, and no row writes past its cache."""
    model = random_model(seed=11)
    prompts = [[(5 * i + j) % 265 for j in range(3 + 4 * i)] for i in range(6)]
    kw = dict(max_tokens=23, temperature=0)
    ref = Engine(model, None, mode="eager").generate_batch(prompts, **kw)
    stops = [ref[i][2 + 3 * i] for i in range(5)]  # each row meets one of these at its own step
    ref = Engine(model, None, mode="eager").generate_batch(prompts, stop_tokens=stops, **kw)
    assert len({len(r) for r in ref}) > 2
    chunked = Engine(model, None, mode="eager", sync_every=sync_every)
    chunked.window_step = 8
    assert chunked.generate_batch(prompts, stop_tokens=stops, **kw) == ref
    assert chunked.generate_batch(prompts[:2], num_samples=3, stop_tokens=stops, **kw) == [
        ref[0], ref[0], ref[0], ref[1], ref[1], ref[1]]


def test_greedy_is_argmax_of_full_forward():
    model = random_model(seed=5)
    prompt = [10, 20, 30, 40]
    out = Engine(model, None).generate_batch([prompt], max_tokens=6, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for tok in out:
            assert tok == int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(tok)


# ---------------------------------------------------------------------------------------------------
# sampling


def flat_model():
    """Near-uniform next-token distribution: every first token is a fresh draw from ~265 choices."""
    model = random_model(seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)
    return model


def test_num_samples_rows_differ_from_the_first_token():
    eng = Engine(flat_model(), None)
    firsts = [step.tokens for step in eng.generate([[1, 2, 3]], num_samples=16, max_tokens=1, temperature=1.0,
                                                   seed=0)][0]
    assert len(firsts) == 16 and len(set(firsts)) > 1


def test_seed_reproducible_and_seeds_differ():
    eng = Engine(flat_model(), None)
    kw = dict(num_samples=4, max_tokens=6, temperature=1.0, top_k=None)
    a = eng.generate_batch([[1, 2], [3, 4, 5]], seed=11, **kw)
    assert a == eng.generate_batch([[1, 2], [3, 4, 5]], seed=11, **kw)
    assert a != eng.generate_batch([[1, 2], [3, 4, 5]], seed=12, **kw)


@pytest.mark.parametrize("top_k", [0, None])
def test_top_k_zero_or_none_means_no_filtering(top_k):
    eng = Engine(flat_model(), None)
    out = eng.generate_batch([[1, 2, 3]], num_samples=8, max_tokens=3, temperature=1.0, top_k=top_k, seed=0)
    assert all(len(o) == 3 for o in out)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = random_model(seed=2)
    eng = Engine(model, None)
    greedy = eng.generate_batch([[7, 8, 9]], max_tokens=6, temperature=0)
    assert eng.generate_batch([[7, 8, 9]], max_tokens=6, temperature=1.0, top_k=1, seed=1) == greedy
    assert eng.generate_batch([[7, 8, 9]], max_tokens=6, temperature=1.0, top_p=1e-6, seed=1) == greedy


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(k2.tolist()) == {0, 1}
    p = sample_next(logits, 1.0, top_p=0.5, generator=gen)  # 0.4 < 0.5, so token 1 is still in
    assert set(p.tolist()) == {0, 1}
    full = sample_next(logits, 1.0, top_k=0, top_p=1.0, generator=gen)
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert abs((full == 0).float().mean().item() - 0.4) < 0.05
    assert sample_next(logits[:3], 0.0).tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# stops, tools, overflow (scripted through MarkovModel)


TOK = byte_tokenizer()
A_END, BOS = TOK.special("<|assistant_end|>"), TOK.bos_id
PY_S, PY_E = TOK.special("<|python_start|>"), TOK.special("<|python_end|>")
OUT_S, OUT_E = TOK.special("<|output_start|>"), TOK.special("<|output_end|>")


def b(text: str) -> list[int]:
    return TOK.encode(text)


def test_stops_on_assistant_end_bos_and_max_tokens():
    model = MarkovModel({**chain(*b("ab"), A_END), **chain(*b("cd"), BOS)})
    eng = Engine(model, TOK)
    steps = list(eng.generate([b("a"), b("c"), b("x")], max_tokens=5, temperature=0))
    assert steps[0].tokens == [ord("b"), ord("d"), ord("z")]
    assert steps[1].tokens == [A_END, BOS, ord("z")] and steps[1].finished == [True, True, False]
    assert steps[2].tokens == [None, None, ord("z")]
    assert len(steps) == 5 and steps[-1].reasons == ["stop", "stop", "length"]
    assert eng.generate_batch([b("a"), b("c")], max_tokens=5, temperature=0) == [[ord("b")], [ord("d")]]


def test_stop_strings():
    model = MarkovModel(chain(*b("hi world!")))
    out = Engine(model, TOK).generate_batch([b("h")], max_tokens=20, temperature=0, stop_strings=["wor"])
    assert TOK.decode(out[0]) == "i wor"


@pytest.mark.parametrize("sync_every", [1, 3])
def test_tool_output_is_forced_into_the_calling_row(monkeypatch, sync_every):
    calls = []

    def fake_tool(expr: str) -> str:
        calls.append(expr)
        return str(eval(expr, {}))  # test-only: fixed, trusted input

    monkeypatch.setattr(engine_mod, "_run_tool", fake_tool)
    # row 0: "=" -> <|python_start|> 2+3 <|python_end|> ... then after the forced output: "ok" <|assistant_end|>
    table = {**chain(ord("="), PY_S, *b("2+3"), PY_E, ord("Q")), **chain(OUT_E, *b("ok"), A_END),
             **chain(*b("xyxyxy"))}
    eng = Engine(MarkovModel(table), TOK, sync_every=sync_every)
    out = eng.generate_batch([b("="), b("x")], max_tokens=14, temperature=0)
    assert calls == ["2+3"]
    assert out[0] == [PY_S, *b("2+3"), PY_E, OUT_S, *b("5"), OUT_E, *b("ok")]
    assert out[1] == b("yx" * 7)  # the other row kept decoding undisturbed


def test_tool_failure_injects_error_text(monkeypatch):
    import picochat.infer.tools as tools

    def broken(expr, timeout=1.0):
        raise RuntimeError("sandbox exploded")

    monkeypatch.setattr(tools, "run_python_tool", broken)
    table = {**chain(ord("="), PY_S, *b("1/0"), PY_E), **chain(OUT_E, A_END)}
    out = Engine(MarkovModel(table), TOK).generate_batch([b("=")], max_tokens=62, temperature=0)[0]
    text = TOK.decode(out[out.index(OUT_S) + 1:out.index(OUT_E)])
    assert text.startswith("Error:") and "sandbox exploded" in text


def test_real_tool_division_by_zero():
    table = {**chain(ord("="), PY_S, *b("1/0"), PY_E), **chain(OUT_E, A_END)}
    out = Engine(MarkovModel(table), TOK).generate_batch([b("=")], max_tokens=62, temperature=0)[0]
    assert TOK.decode(out[out.index(OUT_S) + 1:out.index(OUT_E)]).startswith("Error")


def test_context_overflow_error_names_the_counts():
    eng = Engine(MarkovModel({}, seq_len=64), TOK)
    with pytest.raises(ContextOverflowError) as info:
        eng.generate_batch([[1] * 60], max_tokens=10)
    msg = str(info.value)
    assert "60" in msg and "10" in msg and "70" in msg and "64" in msg
    eng.generate_batch([[1] * 54], max_tokens=10, temperature=0)  # exactly fits
    # no max_tokens: as many as fit (at most 256); a prompt that fills the context still raises
    assert [len(r) for r in eng.generate_batch([[1] * 50, [1] * 3], temperature=0, stop_tokens=())] == [14, 14]
    with pytest.raises(ContextOverflowError):
        eng.generate_batch([[1] * 64])


def test_stream_decoder_holds_back_split_characters():
    dec = StreamDecoder(TOK)
    text = "héllo ✓ 🙂"
    pieces = [dec.feed(t) for t in TOK.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    ids = TOK.encode("é")
    dec = StreamDecoder(TOK)
    assert dec.feed(ids[0]) == "" and dec.feed(ids[1]) == "é"
    assert dec.feed(A_END) == "" and StreamDecoder(TOK, show_special=True).feed(A_END) == "<|assistant_end|>"


# ---------------------------------------------------------------------------------------------------
# chat CLI


def test_chat_cli_one_shot(home, capsys):
    import argparse

    from picochat.runs import RunPaths
    from picochat.infer import chat_cli
    from picochat.train.checkpoint import save_checkpoint

    paths = RunPaths.for_run("tiny")
    TOK.save(paths.tokenizer)
    model = random_model(n_layer=1, n_head=2, n_kv_head=2, n_embd=16, seq_len=64)
    save_checkpoint(paths.stage("sft"), 1, model, None, {"model": model.config.to_dict()})
    # the chat command's own parser (picochat.cli's full registry may list stages not built yet)
    parser = argparse.ArgumentParser()
    chat_cli.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--run", "tiny", "-p", "hi there", "--max-tokens", "5", "--temperature", "0"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "5 tokens" in captured.err and "tok/s" in captured.err
    assert len(captured.out) > 0
    # an over-long one-shot prompt is a clear error (the CLI entry point reports it, exit 1)
    args = parser.parse_args(["chat", "--run", "tiny", "-p", "x" * 200, "--max-tokens", "5"])
    with pytest.raises(ContextOverflowError, match="context of 64 tokens"):
        args.func(args)


@pytest.mark.parametrize("stage,warns", [("rl", False), ("mid", False), ("base", True)])
def test_chat_cli_names_the_stage_it_loaded_and_warns_only_for_base(home, capsys, caplog, stage, warns):
    import argparse

    from picochat.runs import RunPaths
    from picochat.infer import chat_cli
    from picochat.train.checkpoint import save_checkpoint

    paths = RunPaths.for_run("tiny")
    TOK.save(paths.tokenizer)
    model = random_model(n_layer=1, n_head=2, n_kv_head=2, n_embd=16, seq_len=64)
    save_checkpoint(paths.stage(stage), 3, model, None, {"model": model.config.to_dict()})
    parser = argparse.ArgumentParser()
    chat_cli.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--run", "tiny", "-p", "hi", "--max-tokens", "2", "--temperature", "0"])
    caplog.set_level(logging.INFO, logger="picochat")
    logger = logging.getLogger("picochat")
    logger.addHandler(caplog.handler)  # picochat's logger may not propagate to the root
    try:
        assert args.func(args) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert f"stage {stage}, step 3" in caplog.text
    assert "SFT" not in caplog.text  # the old note blamed a missing SFT checkpoint whatever was loaded
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == warns
    if warns:
        assert "no chat checkpoint" in warnings[0].getMessage()


def test_chat_session_drops_oldest_turns(capsys):
    from picochat.config import SamplingConfig
    from picochat.infer.chat_cli import ChatSession

    eng = Engine(MarkovModel(chain(TOK.special("<|assistant_start|>"), ord("b"), A_END), seq_len=64), TOK)
    session = ChatSession(eng, TOK, SamplingConfig(temperature=0, max_tokens=8))
    for _ in range(4):
        assert session.reply("a" * 12) == "b"
    err = capsys.readouterr().err
    assert "dropped the oldest turn" in err
    assert len(TOK.render_for_completion(session.messages + [{"role": "user", "content": "a"}])) <= 64
    assert session.command("/temperature 0.5") and session.sampling.temperature == 0.5
    assert session.command("/topk 0") and session.sampling.top_k is None
    assert not session.command("/quit")


# ---------------------------------------------------------------------------------------------------
# CUDA fast path


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,kernels", [(False, "torch"), (True, "torch"), (False, "triton")])
def test_fast_path_matches_eager_greedy(compile, kernels):
    dev = torch.device("cuda")
    model = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=512, seq_len=256, device=dev)
    prompts = [[(7 * i + j) % 500 for j in range(5 + 3 * i)] for i in range(5)]
    kw = dict(max_tokens=40, temperature=0)
    # compiled and Triton kernels round differently from eager bf16 ones: compare in fp32 so greedy
    # near-ties of a random model are moot
    dtype = torch.bfloat16 if kernels == "torch" and not compile else torch.float32
    eager = Engine(model, None, mode="eager", dtype=dtype).generate_batch(prompts, **kw)
    fast = Engine(model, None, mode="fast", compile=compile, dtype=dtype, window_step=16, kernels=kernels)
    assert fast.generate_batch(prompts, **kw) == eager
    assert fast.last_runner.graph is not None  # really replayed a graph
    assert fast.last_runner.kernels == kernels
    assert fast.generate_batch(prompts[:1], num_samples=3, **kw) == [eager[0]] * 3


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_auto_kernels_by_batch_and_sampling_on_triton():
    """auto: Triton up to TRITON_MAX_ROWS rows, torch above; sampling (temperature, top-k, seeds)
    works on the Triton step exactly as on the torch step, from the same logits."""
    from picochat.infer.engine import TRITON_MAX_ROWS

    dev = torch.device("cuda")
    model = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=512, seq_len=256, device=dev)
    eng = Engine(model, None, mode="fast", dtype=torch.float32)
    assert eng.kernels_for(1) == "triton" and eng.kernels_for(2 * TRITON_MAX_ROWS) == "torch"
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(max_tokens=24, temperature=1.0, top_k=50, seed=3)
    torch_rows = Engine(model, None, mode="fast", dtype=torch.float32, kernels="torch").generate_batch(prompts, **kw)
    assert eng.generate_batch(prompts, **kw) == torch_rows
    assert eng.last_runner.kernels == "triton"


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_tools_and_stops(monkeypatch):
    monkeypatch.setattr(engine_mod, "_run_tool", lambda expr: str(eval(expr, {})))
    table = {**chain(ord("="), PY_S, *b("2+3"), PY_E, ord("Q")), **chain(OUT_E, *b("ok"), A_END),
             **chain(*b("xyxyxy"))}
    model = MarkovModel(table).cuda()
    eng = Engine(model, TOK, mode="fast", sync_every=4, dtype=torch.float32)
    out = eng.generate_batch([b("="), b("x")], max_tokens=14, temperature=0)
    assert out[0] == [PY_S, *b("2+3"), PY_E, OUT_S, *b("5"), OUT_E, *b("ok")]
    assert out[1] == b("yx" * 7)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_auto_falls_back_to_torch_when_triton_fails(monkeypatch, caplog):
    from picochat.infer import triton_decode

    def broken(self, *args):
        raise RuntimeError("kernel does not build on this GPU")

    monkeypatch.setattr(triton_decode.TritonDecoder, "__call__", broken)
    model = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=512, seq_len=256,
                         device=torch.device("cuda"))
    kw = dict(max_tokens=12, temperature=0)
    eng = Engine(model, None, mode="fast", dtype=torch.float32)
    logger = logging.getLogger("picochat")
    logger.addHandler(caplog.handler)  # picochat's logger may not propagate to the root
    try:
        out = eng.generate_batch([[1, 2, 3]], **kw)
    finally:
        logger.removeHandler(caplog.handler)
    assert eng.last_runner.kernels == "torch" and "using the torch step" in caplog.text
    assert out == Engine(model, None, mode="eager", dtype=torch.float32).generate_batch([[1, 2, 3]], **kw)
    with pytest.raises(RuntimeError, match="does not build"):  # asked for Triton explicitly: no silent swap
        Engine(model, None, mode="fast", dtype=torch.float32, kernels="triton").generate_batch([[1, 2, 3]], **kw)


# ---------------------------------------------------------------------------------------------------
# decode benchmark (CPU smoke test; the real run is on a GPU)


def test_decode_bench_smoke(capsys):
    import argparse
    import json

    from picochat.bench.decode import add_decode_parser, run_decode_bench

    recs = run_decode_bench(depth=1, batch_sizes=[1, 2], prompt_len=8, new_tokens=4, modes=["naive", "eager"],
                            device="cpu", vocab_size=300, naive_max_batch=1)
    assert [(r["mode"], r["batch_size"]) for r in recs] == [("naive", 1), ("eager", 1), ("eager", 2)]
    assert all(r["tok_per_s_total"] > 0 and r["ttft_ms"] > 0 for r in recs)
    pytest.importorskip("picochat.bench.record")
    parser = argparse.ArgumentParser()
    add_decode_parser(parser.add_subparsers())
    args = parser.parse_args(["decode", "--depth", "1", "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens",
                              "3", "--modes", "eager", "--vocab-size", "300", "--device", "cpu"])
    assert args.func(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "decode" and last["records"][0]["mode"] == "eager"


# ---------------------------------------------------------------------------------------------------
# Triton decode kernels (on CPU through the Triton interpreter, where triton is installed)


def _run_triton_worker(device: str, env_extra: dict) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "workers" / "triton_decode_worker.py"
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, str(worker), device], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_triton_cases(cases: dict, tol: float) -> None:
    for name, worst in cases.items():
        assert worst["tokens_equal"] and worst["pos_equal"], (name, worst)
        assert worst["logits"] < tol and worst["cache"] < tol, (name, worst)
        assert worst.get("runner_kernels", ["torch", "triton"]) == ["torch", "triton"], (name, worst)


def test_triton_decode_step_matches_torch_step_interpreted():
    """The hand-fused kernels compute what the model's forward computes: logits, greedy tokens,
    the cache they write and the positions, for rows of different lengths across chunk bounds."""
    pytest.importorskip("triton")
    _check_triton_cases(_run_triton_worker("cpu", {"TRITON_INTERPRET": "1"}), tol=1e-4)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_step_matches_torch_step_cuda():
    _check_triton_cases(_run_triton_worker("cuda", {}), tol=1e-3)


def test_bench_tiles_needs_cuda(monkeypatch):
    import argparse

    from picochat.bench.tiles import add_tiles_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    add_tiles_parser(parser.add_subparsers())
    args = parser.parse_args(["tiles", "--batch-sizes", "1"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        args.func(args)
