"""Helpers for the evaluation tests: a GPT whose knowledge is set by hand, and a loopback file server.

`bigram_model(vocab, successors)`: every block's output projections are zero (as at initialisation),
so each block passes its input through unchanged and the network computes
logits = lm_head(rms_norm(rms_norm(wte[token]))): a bigram model. Embeddings are random unit-RMS
vectors (nearly orthogonal in 256 dimensions), and lm_head's row for token b is the sum of the
normalised embeddings of the tokens whose successor is b, scaled: after token a, its successor's
logit is about `strength` * 256 while the others stay near zero. So the model "knows" exactly the
token chains it is given, and nothing else.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn.functional as F

from picochat.config import ModelConfig
from picochat.model.gpt import build_model


def bigram_model(vocab_size: int, successors: dict[int, int], seq_len: int = 256, strength: float = 0.05,
                 n_embd: int = 256):
    config = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1, n_embd=n_embd, n_head=4, n_kv_head=4)
    model = build_model(config, torch.device("cpu"), seed=0)
    with torch.no_grad():
        for block in model.blocks:  # zero residual branches: each block is the identity
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        emb = torch.randn(vocab_size, n_embd, generator=torch.Generator().manual_seed(0))
        model.wte.weight.copy_(emb)
        normed = F.rms_norm(F.rms_norm(emb, (n_embd,)), (n_embd,))
        head = torch.zeros(vocab_size, n_embd)
        for a, b in successors.items():
            head[b] += strength * normed[a]
        model.lm_head.weight.copy_(head)
    return model.eval()


def chain(tokens: list[int]) -> dict[int, int]:
    """Successor pairs along a token sequence (each token followed by the next)."""
    return {a: b for a, b in zip(tokens, tokens[1:])}


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1; yields the base URL (ending in '/')."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def teach(model, a: int, b: int, weight: float = 0.05) -> None:
    """Raise the bigram model's logit of token b after token a by about weight * n_embd."""
    with torch.no_grad():
        e = model.wte.weight[a]
        normed = F.rms_norm(F.rms_norm(e, (e.numel(),)), (e.numel(),))
        model.lm_head.weight[b] += weight * normed


def teach_text(model, tokenizer, after: int, text: str, end: int | None = None) -> list[int]:
    """Make the model say `text` (then token `end`) greedily after token `after`; returns the chain.
    Fails if the chain repeats a token with two different successors."""
    ids = [after, *tokenizer.encode(text)] + ([end] if end is not None else [])
    seen: dict[int, int] = {}
    for x, y in zip(ids, ids[1:]):
        assert seen.get(x, y) == y, f"token {x} would need two successors in {text!r}"
        seen[x] = y
        teach(model, x, y)
    return ids


def save_as_checkpoint(model, run: str, stage: str, step: int = 1) -> None:
    """Write `model` as the run's checkpoint of `stage` (what training would have written)."""
    from picochat.runs import RunPaths
    from picochat.train.checkpoint import save_checkpoint

    save_checkpoint(RunPaths.for_run(run).stage(stage), step, model, None,
                    {"model": model.config.to_dict(), "stage": stage})
