"""`picochat bench rl`: seconds per RL step, split into rollout and update, batched vs eager rollouts.

The real `picochat rl` step (`RLTrainer.train_step`: rollouts with the calculator tool, rewards,
the policy-gradient update, the weight refresh) on the synthetic arithmetic prompts, timed per step
in two modes side by side in one process:
  eager    the `--eager-rollouts` baseline: the eager engine, one prompt's samples at a time, as
           upstream nanochat samples;
  batched  the default: every prompt of the step in one decode loop.
Without `--run`, a throwaway run is made: a tokenizer trained on the embedded corpus and a randomly
initialised model of `--depth` saved as its SFT checkpoint. A random model rarely stops early, so
nearly every sample decodes all `--new-tokens`: the worst case, and the same work in both modes.
Records: bench "rl", mode, rollout_s, update_s, step_s, rollout_tok_per_s (completion tokens per
second of rollout), tokens per step; the speedup of batched over eager rollouts.
"""

from __future__ import annotations

import argparse

from ..options import int_at_least
import os
import tempfile
import time
from pathlib import Path


def _throwaway_run(home: Path, depth: int, vocab_size: int, seed: int) -> str:
    """A run with a tokenizer on the embedded corpus and random weights saved as stage 'sft'."""
    import torch

    from ..config import DataConfig, ModelConfig, TokenizerConfig
    from ..model.gpt import build_model
    from ..runs import RunPaths
    from ..tokenizer_cli import train_tokenizer
    from ..train.checkpoint import save_checkpoint

    os.environ["PICOCHAT_HOME"] = str(home)
    run = "bench-rl"
    stats = train_tokenizer(run, DataConfig(), TokenizerConfig(vocab_size=vocab_size))
    cfg = ModelConfig.from_depth(depth, vocab_size=stats["vocab_size"], seq_len=2048)
    model = build_model(cfg, torch.device("cpu"), seed=seed)
    with torch.no_grad():  # zero-initialised output projections would make every layer a no-op
        g = torch.Generator().manual_seed(seed)
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02, generator=g)
            block.mlp.c_proj.weight.normal_(0, 0.02, generator=g)
    save_checkpoint(RunPaths.for_run(run).stage("sft"), 0, model, None, {"model": cfg.to_dict(), "stage": "sft"})
    return run


def run_rl_bench(run: str, modes: list[str], prompts: int, samples: int, new_tokens: int, steps: int,
                 device: str, device_batch_size: int) -> list[dict]:
    import torch

    from ..config import RLConfig
    from ..train.rl import RLTrainer

    records = []
    for mode in modes:
        cfg = RLConfig(run=run, prompts_per_step=prompts, samples_per_prompt=samples, max_new_tokens=new_tokens,
                       num_steps=steps + 1, eval_prompts=0, save_every=-1, device=device,
                       device_batch_size=device_batch_size, eager_rollouts=mode == "eager")
        trainer = RLTrainer(cfg)
        trainer.setup()
        times = []
        for step in range(steps + 1):  # step 0 warms up (graph capture, allocator), untimed
            stats = trainer.train_step(step, steps + 1)
            if step > 0:
                times.append(stats)
        n = len(times)
        rec = {"mode": mode, "prompts": prompts, "samples": samples, "new_tokens": new_tokens, "steps": n,
               "rollout_s": round(sum(t["rollout_s"] for t in times) / n, 3),
               "update_s": round(sum(t["update_s"] for t in times) / n, 3),
               "completion_tokens": round(sum(t["completion_tokens"] for t in times) / n),
               "vocab_size": trainer.model_cfg.vocab_size, "depth": trainer.model_cfg.n_layer,
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
               else None}
        rec["step_s"] = round(rec["rollout_s"] + rec["update_s"], 3)
        rec["rollout_tok_per_s"] = round(rec["completion_tokens"] / rec["rollout_s"], 1)
        records.append(rec)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def add_rl_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="RL step time: rollouts (batched vs eager baseline) and update")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--prompts", type=int_at_least(1), default=16, help="prompts per step")
    p.add_argument("--samples", type=int_at_least(1), default=16, help="samples per prompt")
    p.add_argument("--new-tokens", type=int_at_least(1), default=256)
    p.add_argument("--steps", type=int_at_least(1), default=2, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--modes", default="batched,eager", help="comma list of batched, eager")
    p.add_argument("--device-batch-size", type=int_at_least(1), default=64, help="rows per forward/backward of the update")
    p.add_argument("--vocab-size", type=int_at_least(1), default=32768, help="tokenizer of the throwaway run")
    p.add_argument("--run", help="use this run's SFT checkpoint instead of a throwaway random model")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_rl_bench)


def cmd_rl_bench(args: argparse.Namespace) -> int:
    from ..common import detect_device
    from .record import append_records, base_record, print_json_last

    device = detect_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("batched", "eager")]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}: pick from batched, eager")
    depth = args.depth
    with tempfile.TemporaryDirectory(prefix="picochat-bench-rl-") as tmp:
        old_home = os.environ.get("PICOCHAT_HOME")
        try:
            if args.run:
                run = args.run
            else:
                t0 = time.perf_counter()
                run = _throwaway_run(Path(tmp), depth, args.vocab_size, args.seed)
                print(f"throwaway run: tokenizer + random d{depth} model in {time.perf_counter() - t0:.0f}s")
            records = run_rl_bench(run, modes, args.prompts, args.samples, args.new_tokens, args.steps,
                                   str(device), args.device_batch_size)
        finally:
            if old_home is None:
                os.environ.pop("PICOCHAT_HOME", None)
            else:
                os.environ["PICOCHAT_HOME"] = old_home
    depth = records[0]["depth"] if records else depth
    base = base_record("rl", device, depth)
    records = [{**base, **r} for r in records]
    print(f"\nrl step · {base['gpu']} · d{depth} · {args.prompts} prompts x {args.samples} samples x "
          f"<= {args.new_tokens} new tokens · torch {base['torch']}")
    print(f"{'mode':<9}{'rollout s':>11}{'update s':>10}{'step s':>9}{'tokens':>9}{'rollout tok/s':>15}")
    for r in records:
        print(f"{r['mode']:<9}{r['rollout_s']:>11.2f}{r['update_s']:>10.2f}{r['step_s']:>9.2f}"
              f"{r['completion_tokens']:>9,}{r['rollout_tok_per_s']:>15,.0f}")
    by = {r["mode"]: r for r in records}
    summary = {**base, "records": records}
    if "batched" in by and "eager" in by:
        speedup = round(by["batched"]["rollout_tok_per_s"] / by["eager"]["rollout_tok_per_s"], 2)
        summary["rollout_speedup"] = speedup
        print(f"batched / eager rollout tok/s: {speedup}x")
    append_records(args.append, records)
    print_json_last(summary)
    return 0
