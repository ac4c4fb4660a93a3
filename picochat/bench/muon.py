"""`picochat bench muon`: the Muon step alone, on a model's real matrix shapes, per implementation.

Modes: `torch` (torch.optim.Muon: one bfloat16 Newton-Schulz loop per matrix, the baseline),
`picochat` (train/muon.py at its defaults: batched per shape, float32 on CPU, bfloat16 on CUDA) and
`picochat-compiled` (the same with the orthogonalisation torch.compiled). Gradients are random; the model's own
parameters are stepped, so the shapes and their count are the real ones at that depth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..options import int_at_least
from .record import append_records, base_record, print_json_last

MODES = ("torch", "picochat", "picochat-compiled")


def add_muon_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("muon", help="the Muon optimizer step alone: torch.optim.Muon vs picochat's")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true", help="after timing, profile 3 steps: the top kernels")
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_muon_bench)


def build(mode: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from ..train.muon import Muon

    if mode == "torch":
        return torch.optim.Muon(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    if mode in ("picochat", "picochat-compiled"):
        return Muon(params, lr=0.02, compile=mode == "picochat-compiled")
    raise ValueError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")


def measure_muon(depth: int, mode: str, steps: int, device: str = "auto", profile: bool = False) -> dict:
    from ..common import detect_device, synchronize
    from ..config import ModelConfig
    from ..model.gpt import build_model

    dev = detect_device(device)
    model = build_model(ModelConfig.from_depth(depth), dev, seed=0)
    params = model.param_groups()["matrix"]
    opt = build(mode, params)
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, generator=gen)
    times, cpu = [], []  # wall and this process's CPU time (all threads): on a shared CPU the latter holds up
    for i in range(3 + steps):
        synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        synchronize(dev)
        if i >= 3:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    if profile:
        _print_profile(opt, dev)
    rec = base_record("muon", dev, depth)
    rec.update(mode=mode, matrices=len(params), matrix_params=sum(p.numel() for p in params),
               step_ms=round(1000 * statistics.median(times), 3), steps=steps)
    if dev.type == "cpu":
        rec["cpu_ms"] = round(1000 * statistics.median(cpu), 3)
    return rec


def _print_profile(opt: torch.optim.Optimizer, dev: torch.device, steps: int = 3) -> None:
    """Top kernels of a few more steps (where the step's device time goes)."""
    from torch.profiler import ProfilerActivity, profile

    from ..common import synchronize

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            opt.step()
        synchronize(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def cmd_muon_bench(args: argparse.Namespace) -> int:
    records = [measure_muon(args.depth, m.strip(), args.steps, args.device, args.profile)
               for m in args.modes.split(",")]
    print(f"\n{'device':<34}{'depth':>6}{'mode':>18}{'matrices':>10}{'step ms':>10}{'CPU ms':>10}")
    for r in records:
        cpu = f"{r['cpu_ms']:.2f}" if "cpu_ms" in r else "-"
        print(f"{r['gpu'][:33]:<34}{r['depth']:>6}{r['mode']:>18}{r['matrices']:>10}{r['step_ms']:>10.2f}{cpu:>10}")
    append_records(args.append, records)
    print_json_last(records if len(records) > 1 else records[0])
    return 0
