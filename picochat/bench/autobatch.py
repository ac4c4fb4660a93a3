"""`picochat bench autobatch`: is the automatic device batch size fast to find, fast to train with,
and safe?

On one CUDA GPU it builds the real model, the real optimizers (Muon + AdamW) and a compiled
micro-step, then:
1. runs the finder (`picochat.train.autobatch`) and records its time, the distinct shapes it ran
   ("compiles") and the chosen size;
2. sweeps real training throughput (tok/s of whole optimizer steps, grad accumulation included, so
   every size trains on the same `--total-batch-tokens`) at each `--sweep` size plus the chosen one,
   and reports chosen vs best (`frac_of_best`, goal ≥ 0.97);
3. trains `--steps` real optimizer steps at the chosen size and counts them until any OOM
   (`steps_without_oom`, goal: all of them).
`--memory-fraction F` calls torch.cuda.set_per_process_memory_fraction(F) first, standing in for a
smaller GPU; the finder's budget is then F × GPU memory.

Prints a human table and, as the last stdout line, one JSON record (`bench: "autobatch"`), also
appended to `--append` when given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..train.autobatch import is_oom_error
from .record import append_records, base_record, print_json_last

GiB = 1024**3


def add_autobatch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("autobatch", help="device-batch-size finder: time, compiles, chosen vs best throughput")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--total-batch-tokens", type=int, default=524288)
    p.add_argument("--sweep", default="8,16,32,64", help="comma list of device batch sizes to measure")
    p.add_argument("--sweep-steps", type=int, default=3, help="measured optimizer steps per swept size")
    p.add_argument("--sweep-warmup", type=int, default=1, help="optimizer steps left out per swept size")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps at the chosen size (OOM check)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process at F × GPU memory (stands in for a smaller GPU)")
    p.add_argument("--headroom-gib", type=float, default=None, help="finder headroom (default: its own)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-scope", default="model", choices=("model", "blocks"),
                   help="as training's --compile-scope: one whole-model graph, or each block and the head")
    p.add_argument("--eager-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="the finder's one probe without torch.compile, as pretraining runs it")
    p.add_argument("--use-cache", action="store_true", help="let the finder use its cache (default: search)")
    p.add_argument("--device", default="auto")
    p.add_argument("--append", help="append the JSON record to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_autobatch_bench)


class _Bench:
    """The real model, optimizers and compiled step, shared by the finder, the sweep and the run."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from ..config import ModelConfig, OptimConfig
        from ..model.gpt import build_model
        from ..train.optim import build_optimizers

        self.device, self.T, self.total = device, args.seq_len, args.total_batch_tokens
        if args.compile:
            from ..common import start_compile_workers, use_compile_cache

            use_compile_cache()  # as training does: a second run of the benchmark finds its graphs compiled
            start_compile_workers()  # as training does: while the model is built
        self.model_cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab_size, seq_len=args.seq_len)
        self.model = build_model(self.model_cfg, device, seed=0)
        self.optimizers = build_optimizers(self.model, OptimConfig(), device)
        # dynamic=False as in training: each batch shape is its own static graph, so the size the
        # finder verifies is compiled exactly as training will run it.
        self.train_model = self.model
        if args.compile and args.compile_scope == "blocks":
            self.model.compile_regions(dynamic=False)
        elif args.compile:
            self.train_model = torch.compile(self.model, dynamic=False)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def micro_step(self, b: int, scale: float) -> None:
        """Forward + backward of b random rows, called the same way for probing and for training."""
        row = torch.randint(0, self.model_cfg.vocab_size, (b, self.T + 1), device=self.device, generator=self.gen)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = self.train_model(row[:, :-1], row[:, 1:], loss_reduction="sum")
        (loss * scale).backward()

    def optimizer_step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def probe_step(self, b: int) -> None:
        """What the finder runs: one real micro-step and the optimizer step."""
        self.micro_step(b, 1.0 / (b * self.T))
        self.optimizer_step()

    def train_step(self, b: int) -> None:
        """One real optimizer step over the whole total batch at device batch b."""
        accum = self.total // (b * self.T)
        for _ in range(accum):
            self.micro_step(b, 1.0 / self.total)
        self.optimizer_step()


def _free(bench: _Bench) -> None:
    from ..train.snapshot import free_memory

    bench.model.zero_grad(set_to_none=True)
    free_memory()


def _tok_per_s(bench: _Bench, b: int, steps: int, warmup: int) -> tuple[float | None, float | None]:
    """Median tok/s of whole optimizer steps at device batch b, and its peak GiB; (None, None) on OOM."""
    times = []
    try:
        for _ in range(warmup):
            bench.train_step(b)
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        for _ in range(steps):
            t0 = time.perf_counter()
            bench.train_step(b)
            torch.cuda.synchronize(bench.device)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - only OOM is a result here; anything else is a bug
        if not is_oom_error(e):
            raise
        del e
        _free(bench)
        return None, None
    return bench.total / statistics.median(times), torch.cuda.max_memory_allocated(bench.device) / GiB


def measure_autobatch(args: argparse.Namespace) -> dict:
    from ..common import detect_device, setup_logging
    from ..train.autobatch import CudaMemoryProbe, candidate_batch_sizes, find_device_batch_size, mark_bad

    device = detect_device(args.device)
    if device.type != "cuda":  # fail before building anything: the finder measures real GPU memory
        raise RuntimeError(f"bench autobatch needs a CUDA GPU (device is {device.type}); on CPU/MPS the finder "
                           f"is skipped by design and `pytest tests/test_autobatch.py` covers it with a simulated budget")
    setup_logging()
    torch.cuda.set_device(device)
    if args.memory_fraction is not None:
        if not 0 < args.memory_fraction <= 1:
            raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    candidates = candidate_batch_sizes(args.total_batch_tokens, args.seq_len, 1)
    bench = _Bench(args, device)
    torch.manual_seed(0)

    # 1. the finder, exactly as the trainer calls it
    result = find_device_batch_size(
        bench.probe_step, model=bench.model, optimizers=bench.optimizers, seq_len=args.seq_len,
        total_batch_tokens=args.total_batch_tokens, world_size=1, device=device,
        cache_key={"model": bench.model_cfg.to_dict(), "dtype": "bfloat16", "compile": bool(args.compile),
                   "compile_scope": args.compile_scope,
                   "step": "bench-autobatch"},
        probe=CudaMemoryProbe(device, memory_fraction=args.memory_fraction),
        headroom_bytes=None if args.headroom_gib is None else int(args.headroom_gib * GiB),
        use_cache=args.use_cache, eager_probe=args.eager_probe)
    chosen = result.device_batch_size  # the finder has logged its table

    # 2. the throughput sweep: every valid swept size plus the chosen one
    wanted = sorted({int(s) for s in str(args.sweep).split(",") if s.strip()} | {chosen})
    sweep = []
    for b in wanted:
        if b not in candidates:
            print(f"sweep: skipping batch {b}: it does not divide the total batch exactly")
            continue
        tok_s, peak = _tok_per_s(bench, b, args.sweep_steps, args.sweep_warmup)
        sweep.append({"batch": b, "tok_per_s": None if tok_s is None else round(tok_s),
                      "peak_mem_gib": None if peak is None else round(peak, 2), "oom": tok_s is None})
        print(f"sweep: batch {b:>4}: " + ("OOM" if tok_s is None else f"{tok_s:,.0f} tok/s, peak {peak:.2f} GiB"))
    ok = [s for s in sweep if not s["oom"]]
    best = max(ok, key=lambda s: s["tok_per_s"]) if ok else None
    at_chosen = next((s for s in sweep if s["batch"] == chosen), None)
    frac = (at_chosen["tok_per_s"] / best["tok_per_s"]
            if best and at_chosen and at_chosen["tok_per_s"] else 0.0)

    # 3. real training steps at the chosen size
    done, oom, t0 = 0, False, time.perf_counter()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(args.steps):
            bench.train_step(chosen)
            done += 1
            if (i + 1) % 50 == 0:
                torch.cuda.synchronize(device)
                print(f"run: {i + 1}/{args.steps} steps at batch {chosen}, "
                      f"peak {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB")
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001
        if not is_oom_error(e):
            raise
        del e
        oom = True
        _free(bench)
        if args.use_cache and result.cache_key:
            mark_bad(result.cache_key, chosen)  # what the trainer does after an OOM in training
    run_s = time.perf_counter() - t0

    rec = base_record("autobatch", device, args.depth)
    rec.update(
        chosen=chosen, seconds=round(result.seconds, 2), compiles=result.compiles, frac_of_best=round(frac, 4),
        steps_without_oom=done, steps=args.steps, oom=oom, grad_accum=result.grad_accum,
        seq_len=args.seq_len, total_batch_tokens=args.total_batch_tokens, vocab_size=args.vocab_size,
        params=bench.model.num_params(), memory_fraction=args.memory_fraction, compile=bool(args.compile),
        compile_scope=args.compile_scope, eager_probe=args.eager_probe,
        dtype="bf16", best_batch=best["batch"] if best else None,
        best_tok_per_s=best["tok_per_s"] if best else None,
        tok_per_s=at_chosen["tok_per_s"] if at_chosen else None, sweep=sweep,
        budget_gib=round(result.budget_bytes / GiB, 2) if result.budget_bytes else None,
        total_gib=round(result.total_bytes / GiB, 2) if result.total_bytes else None,
        predicted_peak_gib=round(result.predicted_peak / GiB, 2) if result.predicted_peak else None,
        measured_peak_gib=round(result.measured_peak / GiB, 2) if result.measured_peak else None,
        run_peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2), run_seconds=round(run_s, 1),
        cache_hit=result.cache_hit,
        probes=[{"batch": p.batch_size, "peak_gib": None if p.peak_bytes is None else round(p.peak_bytes / GiB, 2),
                 "reserved_gib": None if p.reserved_bytes is None else round(p.reserved_bytes / GiB, 2),
                 "ok": p.fits, "oom": p.oom, "phase": p.phase, "seconds": round(p.seconds, 2)}
                for p in result.probes])
    return rec


def cmd_autobatch_bench(args: argparse.Namespace) -> int:
    rec = measure_autobatch(args)
    print(f"\n{'gpu':<28}{'depth':>6}{'cap':>6}{'chosen':>8}{'best':>6}{'of best':>9}{'find s':>8}"
          f"{'shapes':>8}{'steps ok':>10}")
    cap = "-" if rec["memory_fraction"] is None else f"{rec['memory_fraction']:.2f}"
    print(f"{rec['gpu'][:27]:<28}{rec['depth']:>6}{cap:>6}{rec['chosen']:>8}{str(rec['best_batch']):>6}"
          f"{100 * rec['frac_of_best']:>8.1f}%{rec['seconds']:>8.1f}{rec['compiles']:>8}"
          f"{rec['steps_without_oom']:>6}/{rec['steps']:<4}")
    append_records(args.append, [rec])
    print_json_last(rec)
    return 0 if not rec["oom"] else 1
