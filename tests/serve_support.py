"""What the server tests share: tiny models, a real uvicorn server on a free loopback port in a
thread, and small HTTP helpers.

`ScriptedModel` is a model-free stand-in for a GPT (as `MarkovModel` in test_engine): the token
after absolute position p is `script[(p + 1) % len(script)]`, so a test decides exactly what the
model writes (markup to sanitize, a calculator call) while the real scheduler, server and browser
do everything else. `delay` slows each forward down so a stream lasts long enough to stop it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.config import ModelConfig
from picochat.model.gpt import build_model
from picochat.tokenizer import Tokenizer

CPU = torch.device("cpu")


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)})


def random_model(vocab: int, seq_len: int = 128, seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A random GPT whose every weight matters (the default init zeroes the output projections)."""
    cfg = ModelConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=4, n_kv_head=2)
    model = build_model(cfg, CPU, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.3, generator=gen)
        model.lm_head.weight.normal_(0.0, 0.5, generator=gen)
    return model.eval()


class ScriptedModel(nn.Module):
    """Writes `script` as every reply: the token after position p is script[k], k = p minus the
    position of the row's latest `anchor` token (default <|assistant_start|>; before any anchor, k =
    p + 1), modulo the script's length. Like attention, it reads the row's history from its KV cache
    (token ids stored in the first key channel), so it works with any scheduling of rows."""

    def __init__(self, script: list[int], vocab: int, seq_len: int = 256, delay: float = 0.0, anchor: int = 259):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, seq_len=seq_len, n_layer=1, n_embd=8, n_head=1, n_kv_head=1)
        self.rotary_len = 4 * seq_len
        self.delay, self.anchor = delay, anchor
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("script", torch.tensor(script, dtype=torch.long))

    def forward(self, idx, targets=None, *, attn_mask=None, kv_cache=None, logits_at=None, **_):
        B, T = idx.shape
        if self.delay:
            time.sleep(self.delay)
        if kv_cache is not None:
            positions = kv_cache.positions(T)
            keys = idx.to(kv_cache.k[0].dtype)[:, None, :, None].expand(B, 1, T, self.config.head_dim)
            kv_cache.write(0, keys, keys, positions)
            history = kv_cache.k[0][:, 0, :, 0].round().long()  # (B, cache length)
            kv_cache.pos += T
        else:
            positions = torch.arange(T, device=idx.device)[None, :].expand(B, T)
            history = idx
        slots = torch.arange(history.size(1), device=idx.device)
        seen = (history == self.anchor)[:, None, :] & (slots[None, None, :] <= positions[:, :, None])
        last_anchor = torch.where(seen, slots, -1).amax(-1)  # (B, T); -1: no anchor yet
        k = torch.where(last_anchor >= 0, positions - last_anchor, positions + 1)
        if logits_at is not None:
            k = k[torch.arange(B), logits_at][:, None]
        nxt = self.script[k % self.script.numel()]
        return F.one_hot(nxt, self.config.vocab_size).float() * 40.0


def script_tokens(tokenizer, pieces: list[str | int]) -> list[int]:
    """Text pieces as byte tokens, special tokens by name (e.g. "<|python_start|>") or id."""
    out: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
        elif piece in tokenizer.special_ids:
            out.append(tokenizer.special(piece))
        else:
            out.extend(tokenizer.encode(piece))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server for `app` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn-test")

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serving(model, tokenizer, serve_config=None, scheduler_config=None, name: str = "picochat-test"):
    """The real scheduler over `model` behind the real app on a live server: yields (server, scheduler)."""
    from picochat.infer.scheduler import Scheduler, SchedulerConfig
    from picochat.serve.api import create_app
    from picochat.serve.config import ServeConfig
    from picochat.serve.generation import Backend

    # One intra-op thread: with the test process's pool (conftest sets 2) plus the scheduler thread's
    # own, OpenMP workers spin on the 2 CI cores and every step waits ten times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scheduler = Scheduler(model, tokenizer, scheduler_config or SchedulerConfig(slots=8)).start()
    try:
        backend = Backend(scheduler, tokenizer, model, name, scheduler.max_context)
        app = create_app(serve_config or ServeConfig(), backend)
        with LiveServer(app) as server:
            yield server, scheduler
    finally:
        scheduler.close()
        torch.set_num_threads(threads)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
