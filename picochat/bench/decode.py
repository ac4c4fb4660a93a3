"""`picochat bench decode`: decode speed of the inference engine, its modes side by side.

Random weights (bf16 on CUDA), random prompt tokens, greedy decoding with stops and tools off, so
every row decodes exactly `new_tokens` tokens. Modes: `naive` (no cache, the prefix recomputed per
token), `eager` (static KV cache, eager step, one host sync per token) and `fast` (the same step,
q/k/v fused, replayed from a CUDA graph per batch bucket; the host reads tokens every 16 steps while
the device runs the next 16; `--compile` compiles the step first; `--kernels triton` runs it as
hand-fused Triton kernels instead, which `auto` picks up to batch 8). Each (mode, batch) is
warmed up first (graph capture and compilation are not timed), then timed once:
  ttft_ms          prefill + first token, until the host has it;
  tok_per_s_row    decode tokens after the first per second, per row; ×batch = tok_per_s_total;
  mbu              bytes a decode step must read / step time / peak bandwidth. Basis: matmul
                   weights in bf16 (all but the embedding table, lm_head included) + the KV cache
                   entries of the tokens in context (mean context over the run), bf16. The peak is
                   3.35e12 B/s (H100 SXM), 4.8e12 on an H200.
"""

from __future__ import annotations

import argparse

from ..options import int_at_least
import time

import torch

H100_BW = 3.35e12
H200_BW = 4.8e12


def _peak_bandwidth(gpu: str) -> float | None:
    if "H200" in gpu:
        return H200_BW
    if "H100" in gpu:
        return H100_BW
    return None


def run_decode_bench(depth: int = 12, batch_sizes: list[int] = (1, 8, 64), prompt_len: int = 512,
                     new_tokens: int = 256, modes: list[str] = ("naive", "eager", "fast"),
                     device: torch.device | str = "cuda", vocab_size: int = 32768, naive_max_batch: int = 8,
                     compile: bool | str = False, sync_every: int | None = None, seed: int = 0,
                     profile: bool = False, window_step: int | None = None, kernels: str = "auto") -> list[dict]:
    """One record per (mode, batch size) that was run; naive above `naive_max_batch` is skipped.
    `profile` prints the top kernels of 64 further `fast` decode steps at each batch size."""
    from ..common import compute_dtype
    from ..config import ModelConfig
    from ..infer.engine import Engine
    from ..model.gpt import build_model

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = compute_dtype(device)
    cfg = ModelConfig.from_depth(depth, vocab_size=vocab_size, seq_len=max(2048, prompt_len + new_tokens))
    model = build_model(cfg, device, seed=seed).to(dtype).eval()  # one bf16 copy shared by all modes
    gpu = torch.cuda.get_device_name(device) if cuda else device.type
    peak_bw = _peak_bandwidth(gpu)
    weight_bytes = model.num_params(matmul_only=True) * 2
    kv_bytes_per_token = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * 2
    mean_context = prompt_len + new_tokens / 2
    gen = torch.Generator().manual_seed(seed)
    records = []
    for mode in modes:
        if mode == "fast" and not cuda:
            print(f"skipping fast: it needs CUDA (device is {device.type})")
            continue
        fast = mode == "fast"
        engine = Engine(model, None, mode=mode, compile=compile if fast else False, sync_every=sync_every,
                        window_step=window_step if fast else None, kernels=kernels if fast else "auto")
        for B in batch_sizes:
            if mode == "naive" and B > naive_max_batch:
                print(f"skipping naive at batch {B} (> --naive-max-batch {naive_max_batch})")
                continue
            prompts = torch.randint(0, vocab_size, (B, prompt_len), generator=gen).tolist()
            kw = dict(max_tokens=new_tokens, temperature=0.0, stop_tokens=(), tools=False)
            # warm-up with the same shapes (captures the graph / compiles), a few steps only
            for i, _ in enumerate(engine.generate(prompts, **kw)):
                if i >= 3:
                    break
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            t_first = None
            n_steps = 0
            for step in engine.generate(prompts, **kw):
                if t_first is None:
                    t_first = time.perf_counter()
                n_steps += 1
            if cuda:
                torch.cuda.synchronize(device)
            t_end = time.perf_counter()
            assert n_steps == new_tokens, f"{mode}: {n_steps} steps for {new_tokens} tokens"
            if profile and engine.mode == "fast":
                print_decode_profile(engine, prompts, kw)
            decode_s = max(t_end - t_first, 1e-9)
            per_row = (new_tokens - 1) / decode_s
            step_bytes = weight_bytes + B * kv_bytes_per_token * mean_context
            mbu = step_bytes * per_row / peak_bw if peak_bw else None
            runner = engine.last_runner
            records.append({
                "bench": "decode", "gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "depth": depth, "mode": engine.mode, "batch_size": B, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "vocab_size": vocab_size, "dtype": str(dtype).replace("torch.", ""),
                "ttft_ms": round(1000 * (t_first - t0), 2), "tok_per_s_row": round(per_row, 1),
                "tok_per_s_total": round(per_row * B, 1), "mbu": round(mbu, 4) if mbu is not None else None,
                "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
                "cuda_graph": bool(getattr(runner, "graph", None) is not None),
                "compile": engine.compile or False, "kernels": runner.kernels,
                "window_step": engine.window_step, "fused_qkv": engine.fused,
                "sync_every": engine.sync_every,
                "mbu_basis": "bf16 matmul weights + KV of tokens in context (mean) per step / "
                             f"{peak_bw:.3g} B/s" if peak_bw else None,
            })
        del engine
        if cuda:
            torch.cuda.empty_cache()
    return records


def print_decode_profile(engine, prompts: list[list[int]], kw: dict, steps: int = 64) -> None:
    """Kernels of prefill + `steps` decode steps on the already captured runner, by device time,
    with kernels per step and device-busy time per step: at batch 1 the step is launch-bound, so
    these are the numbers to bring down."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, _ in enumerate(engine.generate(prompts, **kw)):
            if i >= steps:
                break
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels, busy_us = sum(e.count for e in cuda), sum(e.self_device_time_total for e in cuda)
    print(f"\nprofile: fast, batch {len(prompts)}, prefill + {steps} decode steps: {kernels} device kernels "
          f"(~{kernels / steps:.0f} per step), device busy {busy_us / steps:.0f} us per step")
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=80))


def add_decode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode tok/s, TTFT and MBU: naive vs eager (KV cache) vs fast (CUDA graphs)")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--batch-sizes", default="1,8,64", help="comma list")
    p.add_argument("--prompt-len", type=int_at_least(1), default=512)
    p.add_argument("--new-tokens", type=int_at_least(1), default=256)
    p.add_argument("--modes", default="naive,eager,fast", help="comma list of naive, eager, fast")
    p.add_argument("--vocab-size", type=int_at_least(1), default=32768)
    p.add_argument("--naive-max-batch", type=int_at_least(1), default=8, help="skip naive above this batch size (slow)")
    p.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                   help="torch.compile the fast step before graph capture (without MODE: Inductor's "
                        "defaults plus coordinate-descent tuning; or a torch.compile mode such as "
                        "max-autotune-no-cudagraphs)")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="fast mode's step: hand-fused Triton kernels, the model's torch forward (graphed, "
                        "compiled with --compile), or auto (Triton up to batch 8)")
    p.add_argument("--window-step", type=int_at_least(1), default=None, help="attention window granularity (cache slots)")
    p.add_argument("--sync-every", type=int_at_least(1), default=None, help="fast mode: decode steps per host sync")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--profile", action="store_true", help="print the top kernels of the fast step per batch size")
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_decode_bench)


def cmd_decode_bench(args: argparse.Namespace) -> int:
    from ..common import detect_device
    from .record import append_records, base_record, print_json_last

    device = detect_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    records = run_decode_bench(args.depth, sizes, args.prompt_len, args.new_tokens, modes, device,
                               args.vocab_size, args.naive_max_batch, args.compile, args.sync_every, args.seed,
                               args.profile, args.window_step, args.kernels)
    base = base_record("decode", device, args.depth)
    records = [{**base, **r, "commit": base["commit"], "command": base["command"]} for r in records]
    print(f"\ndecode · {base['gpu']} · d{args.depth} · prompt {args.prompt_len} random tokens · "
          f"{args.new_tokens} new tokens · greedy · torch {base['torch']}")
    print(f"{'mode':<7}{'step':>8}{'batch':>6}{'TTFT ms':>10}{'tok/s row':>11}{'tok/s total':>13}{'MBU':>8}"
          f"{'peak GiB':>10}")
    for r in records:
        mbu = f"{100 * r['mbu']:.1f}%" if r["mbu"] is not None else "n/a"
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        step = r["kernels"] if r["mode"] == "fast" else "torch"
        step += "+c" if r["compile"] and step == "torch" else ""
        print(f"{r['mode']:<7}{step:>8}{r['batch_size']:>6}{r['ttft_ms']:>10.1f}{r['tok_per_s_row']:>11,.0f}"
              f"{r['tok_per_s_total']:>13,.0f}{mbu:>8}{peak:>10}")
    if records and records[0]["mbu_basis"]:
        print(f"MBU basis: {records[0]['mbu_basis']}")
    by = {(r["mode"], r["batch_size"]): r["tok_per_s_total"] for r in records}
    speedup = {str(b): round(by[("fast", b)] / by[("eager", b)], 2) for b in sizes
               if ("fast", b) in by and ("eager", b) in by}
    if speedup:
        print("fast / eager speedup by batch: " + ", ".join(f"{b}: {s}x" for b, s in speedup.items()))
    append_records(args.append, records)
    print_json_last({**base, "records": records, "speedup_fast_vs_eager": speedup})
    return 0
