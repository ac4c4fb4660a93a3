"""`picochat bench sft`: SFT throughput, packed vs padded, beside pretraining at the same shape.

The length distribution (stated because every figure depends on it): conversation lengths in tokens
are lognormal with median `--length-median` (400) and log-sd `--length-sigma` (0.9), i.e. mean ~600,
~5% above 1500 and ~3.5% above 2048 (truncated to the row, counted), at least 16 tokens. This is the
shape of chat SFT data such as SmolTalk: mostly a few hundred tokens with a long tail. Each
conversation is <|bos|> then 1-3 user/assistant turn pairs of random tokens, the assistant share of a
pair drawn uniformly in [0.3, 0.7] (about half the tokens carry loss, as in real chat data).

Every mode runs real forward + backward + optimizer steps through the `Trainer` (same model,
optimizers, compile, exact token weighting and document mask as `picochat sft`), one process, side
by side:
  packed    whole conversations best-fit packed into (B, T) rows, document-masked attention
            (FlexAttention block mask on CUDA);
  padded    the seed's method: one conversation per row, padded to T, plain causal attention;
  pretrain  random tokens in every position, no mask: the pretraining step at the same shape.
Batches are packed on the CPU before timing (their packing cost is reported separately as
`pack_ms_per_batch`), so the figures measure the training step, as a prefetching loader would see it.
Reported per mode: raw tok/s (all positions), useful tok/s (non-padding), loss tok/s (loss-bearing),
padding fraction and peak memory; plus packed useful tok/s / pretraining tok/s, and packed / padded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ..options import float_in, int_at_least
from .record import append_records, base_record, print_json_last

MODES = ("packed", "padded")


def add_sft_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="SFT useful tokens/s: packed vs padded, and pretraining at the same shape")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--seq-len", type=int_at_least(1), default=2048)
    p.add_argument("--batch-size", default="32",
                   help="rows per forward pass (device batch size), or 'auto' to let the finder pick it")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1)
    p.add_argument("--vocab-size", type=int_at_least(1), default=32768)
    p.add_argument("--steps", type=int_at_least(1), default=20, help="measured steps per mode (after warm-up)")
    p.add_argument("--warmup", type=int_at_least(0), default=5, help="steps left out of the figures (compile, autotune)")
    p.add_argument("--modes", default="packed,padded", help="comma list of packed, padded")
    p.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the pretraining step at the same shape (for the 0.9x goal)")
    p.add_argument("--length-dist", default="lognormal", choices=("lognormal",),
                   help="conversation length distribution (see --length-median/--length-sigma)")
    p.add_argument("--length-median", type=float_in(0.0, lo_open=True), default=400.0, help="median conversation length in tokens")
    p.add_argument("--length-sigma", type=float_in(0.0), default=0.9, help="log-space standard deviation")
    p.add_argument("--buffer-size", type=int_at_least(1), default=None, help="packing buffer (conversations)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_sft_bench)


# ---------------------------------------------------------------------------------------------------
# data


def synthetic_conversations(n: int, vocab_size: int, median: float, sigma: float, seed: int = 0,
                            bos_id: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` (ids, loss mask) pairs with lognormal lengths; see the module docstring."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(16, rng.lognormal(np.log(median), sigma, size=n)).astype(np.int64)
    docs = []
    for length in lengths:
        ids = rng.integers(1, vocab_size, size=int(length), dtype=np.int64)
        ids[0] = bos_id
        mask = np.zeros(int(length), dtype=np.int64)
        pairs = int(rng.integers(1, 4))
        bounds = np.linspace(1, length, pairs + 1).astype(np.int64)
        for a, b in zip(bounds[:-1], bounds[1:]):
            user = a + int(round((b - a) * (1 - rng.uniform(0.3, 0.7))))
            mask[user:b] = 1  # the assistant half of the pair
        docs.append((ids, mask))
    return docs


def build_batches(mode: str, docs: list, B: int, T: int, n: int, buffer_size: int | None) -> tuple[list[dict], dict]:
    """`n` batches from the real `SFTBatcher` over an endless stream of `docs` (CPU, pinned on CUDA
    machines so the copy to the GPU is asynchronous); and the batcher's stats plus packing time."""
    from ..data.chat import SFTBatcher, TaskMixture
    from ..train.sft import PrerenderedTask, PrerenderedTokenizer

    mixture = TaskMixture([PrerenderedTask(docs)], seed=1, epochs=None)
    batcher = SFTBatcher(mixture, PrerenderedTokenizer(0), B, T, mode=mode, buffer_size=buffer_size)
    t0 = time.perf_counter()
    batches = [batcher.next_batch() for _ in range(n)]
    pack_s = time.perf_counter() - t0
    pin = torch.cuda.is_available()
    for b in batches:
        if mode == "padded":
            b.pop("doc_ids")  # padding sits at the row tail: plain causal attention is exact
        for k in ("inputs", "targets", "doc_ids"):
            if k in b and pin:
                b[k] = b[k].pin_memory()
    stats = dict(batcher.stats)
    stats["pack_ms_per_batch"] = 1000 * pack_s / max(1, n)
    return batches, stats


class CycledBatches:
    """The Trainer's BatchSource over prebuilt batches; records each batch's token counts."""

    def __init__(self, batches: list[dict], device: torch.device):
        self.batches, self.device, self.i = batches, device, 0
        self.used: list[tuple[int, int, int]] = []  # (slots, real, loss) per micro-batch served

    def __next__(self) -> dict:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        x = b["inputs"]
        real = b.get("n_real_tokens", x.numel())
        loss = b.get("n_loss_tokens", x.numel())
        self.used.append((x.numel(), real, loss))
        out = {k: b[k].to(self.device, non_blocking=True) for k in ("inputs", "targets", "doc_ids") if k in b}
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def random_batches(B: int, T: int, vocab_size: int, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    out = []
    for _ in range(n):
        row = torch.randint(0, vocab_size, (B, T + 1), generator=g)
        x, y = row[:, :-1].contiguous(), row[:, 1:].contiguous()
        out.append({"inputs": x.pin_memory() if pin else x, "targets": y.pin_memory() if pin else y})
    return out


# ---------------------------------------------------------------------------------------------------
# measuring


def measure(mode: str, batches: list[dict], depth: int, B: int, T: int, vocab_size: int, steps: int, warmup: int,
            grad_accum: int, compile: bool | None, device: str) -> dict:
    """Run warmup + steps real training steps over `batches`; figures over the timed steps."""
    from ..common import detect_device
    from ..config import ModelConfig, TrainConfig
    from ..train.loop import Trainer

    dev = detect_device(device)
    model_cfg = ModelConfig.from_depth(depth, vocab_size=vocab_size, seq_len=T)
    cfg = TrainConfig(run="bench", stage="sft", depth=depth, seq_len=T, device_batch_size=B,
                      total_batch_tokens=B * T * grad_accum, num_steps=warmup + steps, eval_every=0,
                      sample_every=0, save_every=-1, compile=compile, device=device)
    source = CycledBatches(batches, dev)
    per_step: list[tuple] = []

    def on_step(s, trainer) -> None:
        used, source.used = source.used, []
        per_step.append((s, sum(u[0] for u in used), sum(u[1] for u in used), sum(u[2] for u in used)))

    trainer = Trainer(cfg, model_cfg, None, lambda b, dist, d: source, on_step=on_step)
    trainer.train()
    timed = per_step[warmup:]
    seconds = sum(s.seconds for s, *_ in timed)
    slots, real, loss = (sum(t[i] for t in timed) for i in (1, 2, 3))
    mfus = [s.mfu for s, *_ in timed if s.mfu is not None]
    rec = {"mode": mode, "device_batch_size": B, "grad_accum": grad_accum, "seq_len": T, "vocab_size": vocab_size,
           "raw_tok_per_s": round(slots / seconds), "useful_tok_per_s": round(real / seconds),
           "loss_tok_per_s": round(loss / seconds), "padding_frac": round(1 - real / max(1, slots), 4),
           "step_ms_median": round(1000 * statistics.median(s.seconds for s, *_ in timed), 2),
           "mfu_raw": round(statistics.median(mfus), 4) if mfus else None,
           "peak_mem_gib": round(max(s.peak_mem_gib for s, *_ in timed), 2), "steps": steps,
           "compile": trainer.compiled, "params": trainer.model.num_params(),
           "dtype": "bf16" if dev.type == "cuda" else "fp32"}
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def find_batch_size(args: argparse.Namespace, T: int, largest: int = 128) -> int:
    """The autobatch finder on the real SFT step (compiled or not, document-masked) of this model."""
    from ..config import ModelConfig, TrainConfig
    from ..train.loop import Trainer
    from ..train.snapshot import free_memory

    model_cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab_size, seq_len=T)
    cfg = TrainConfig(run="bench", stage="sft", depth=args.depth, seq_len=T, device_batch_size="auto",
                      total_batch_tokens=largest * T, compile=args.compile, device=args.device)
    trainer = Trainer(cfg, model_cfg, None, None)
    trainer._setup()
    B = trainer._choose_device_batch()
    del trainer
    torch._dynamo.reset()
    free_memory()
    return B


def run_bench(args: argparse.Namespace) -> list[dict]:
    from ..common import detect_device

    dev = detect_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; pick from {', '.join(MODES)}")
    T, ga = args.seq_len, args.grad_accum
    B = find_batch_size(args, T) if args.batch_size == "auto" else int(args.batch_size)
    n_batches = (args.warmup + args.steps) * ga
    # enough conversations that the padded mode (one per row) never repeats within the run
    docs = synthetic_conversations(max(4096, n_batches * B + 256), args.vocab_size, args.length_median,
                                   args.length_sigma, args.seed)
    records = []
    for mode in modes:
        batches, stats = build_batches(mode, docs, B, T, n_batches, args.buffer_size)
        rec = measure(mode, batches, args.depth, B, T, args.vocab_size, args.steps, args.warmup, ga, args.compile,
                      args.device)
        rec.update(pack_ms_per_batch=round(stats["pack_ms_per_batch"], 2), truncated=stats["truncated"],
                   conversations_per_row=round(stats["conversations"] / max(1, stats["rows"]), 3))
        records.append(rec)
    pretrain = None
    if args.pretrain:
        pretrain = measure("pretrain", random_batches(B, T, args.vocab_size, min(n_batches, 8), args.seed),
                           args.depth, B, T, args.vocab_size, args.steps, args.warmup, ga, args.compile,
                           args.device)
    by_mode = {r["mode"]: r for r in records}
    length = {"dist": args.length_dist, "median": args.length_median, "sigma": args.length_sigma, "min": 16}
    out = []
    for r in records:
        rec = base_record("sft", dev, args.depth)
        rec.update(r, length_dist=length)
        if pretrain:
            rec["pretrain_tok_per_s"] = pretrain["raw_tok_per_s"]
            rec["useful_vs_pretrain"] = round(r["useful_tok_per_s"] / pretrain["raw_tok_per_s"], 3)
        if r["mode"] == "packed" and "padded" in by_mode:
            rec["useful_vs_padded"] = round(r["useful_tok_per_s"] / max(1, by_mode["padded"]["useful_tok_per_s"]), 3)
        out.append(rec)
    if pretrain:
        rec = base_record("sft", dev, args.depth)
        rec.update(pretrain, useful_tok_per_s=pretrain["raw_tok_per_s"])
        out.append(rec)
    return out


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    print(f"\nSFT step, depth {r0['depth']}, {r0['gpu']}, batch {r0['device_batch_size']} x {r0['seq_len']} "
          f"(x{r0['grad_accum']} accum), vocab {r0['vocab_size']}, {r0['dtype']}, compile {r0['compile']}")
    print(f"{'mode':<10}{'raw tok/s':>12}{'useful tok/s':>14}{'loss tok/s':>12}{'padding':>9}{'conv/row':>9}"
          f"{'step ms':>9}{'peak GiB':>9}{'vs pretrain':>12}")
    for r in records:
        vs = f"{r['useful_vs_pretrain']:.2f}x" if "useful_vs_pretrain" in r else ("1.00x" if r["mode"] == "pretrain"
                                                                                 else "")
        cpr = r.get("conversations_per_row", "")
        print(f"{r['mode']:<10}{r['raw_tok_per_s']:>12,}{r['useful_tok_per_s']:>14,}{r['loss_tok_per_s']:>12,}"
              f"{100 * r['padding_frac']:>8.1f}%{cpr:>9}{r['step_ms_median']:>9}{r['peak_mem_gib']:>9}{vs:>12}")
    packed = next((r for r in records if "useful_vs_padded" in r), None)
    if packed:
        print(f"packed useful tok/s = {packed['useful_vs_padded']:.2f}x padded")


def cmd_sft_bench(args: argparse.Namespace) -> int:
    records = run_bench(args)
    print_table(records)
    append_records(args.append, records)
    print_json_last(records if len(records) > 1 else records[0])
    return 0
