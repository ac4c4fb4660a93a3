"""`picochat bench serve`: the HTTP server under load, continuous batching against a serial baseline.

For each mode (`continuous`: the scheduler batching every request in flight; `serial`: `picochat
serve --serial`, one request at a time as upstream nanochat's web server did) a real `picochat
serve` is started in its own process and driven by the load generator (`loadgen.py`) from this
one, at each concurrency level (closed loop) or request rate (Poisson). Prompts are random token
ids; every request produces exactly its output length (`ignore_eos`). With `--depth` the server
serves random weights (a run `bench-serve-d<depth>` with a synthetic byte-pair vocabulary is
written once under $PICOCHAT_HOME); `--run` serves a trained run; `--url` drives a server that is
already running. Each level is warmed up first (untimed), so CUDA-graph captures are not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import time

from ..options import float_in, int_at_least
from .loadgen import lengths, run_load, summarize

MODES = ("continuous", "serial")


def synthetic_run(depth: int, vocab_size: int, seq_len: int) -> str:
    """A run with random weights and a synthetic tokenizer (all bytes plus byte pairs), made once."""
    import torch

    from ..config import SPECIAL_TOKENS, ModelConfig
    from ..model.gpt import build_model
    from ..runs import RunPaths, latest_checkpoint
    from ..tokenizer import Tokenizer
    from ..train.checkpoint import save_checkpoint

    name = f"bench-serve-d{depth}-v{vocab_size}-s{seq_len}"
    paths = RunPaths.for_run(name)
    if latest_checkpoint(paths.stage("sft")) is not None:
        return name
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    ranks = {bytes([b]): b for b in range(256)}
    for a in range(256):
        for b in range(256):
            if len(ranks) >= n_bpe:
                break
            ranks.setdefault(bytes([a, b]), len(ranks))
    Tokenizer(ranks).save(paths.tokenizer)
    cfg = ModelConfig.from_depth(depth, vocab_size=vocab_size, seq_len=seq_len)
    model = build_model(cfg, torch.device("cpu"), seed=0)
    save_checkpoint(paths.stage("sft"), 0, model, None, {"model": cfg.to_dict(), "note": "random weights"})
    return name


class ServerProcess:
    """`picochat serve` in a subprocess, ready once /health says 200."""

    def __init__(self, run: str, port: int, serial: bool, extra: list[str]):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "picochat", "serve", "--run", run, "--port", str(port), *extra]
        if serial:
            cmd.append("--serial")
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return self
                if r.json().get("status") == "error":
                    raise RuntimeError(f"the server could not load the model: {r.json().get('detail')}")
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready within 10 minutes")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(n: int, args, vocab: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    ins = lengths(n, args.input_len, args.length_dist, args.sigma, 1, args.max_context - 1, rng)
    outs = lengths(n, args.output_len, args.length_dist, args.sigma, 2, args.max_context, rng)
    outs = [max(2, min(o, args.max_context - i)) for i, o in zip(ins, outs)]
    prompts = [[rng.randrange(vocab) for _ in range(i)] for i in ins]
    return prompts, outs


def measure(url: str, args, levels: list[tuple[str, float]], vocab: int) -> list[dict]:
    """One summary per load level: ("concurrency", C) or ("request_rate", R)."""
    out = []
    for kind, value in levels:
        rng = random.Random(args.seed)
        conc = int(value) if kind == "concurrency" else args.max_concurrency
        n = args.num_prompts or max(32, 4 * (conc or 8))
        warm_n = max(1, min(conc or 8, 64))
        warm_prompts, _ = _workload(warm_n, args, vocab, random.Random(args.seed + 1))
        asyncio.run(run_load(url, warm_prompts, [16] * warm_n, warm_n, None, args.temperature, args.api_key))
        prompts, outs = _workload(n, args, vocab, rng)
        rate = value if kind == "request_rate" else None
        timings, wall = asyncio.run(run_load(url, prompts, outs, conc, rate, args.temperature, args.api_key, args.seed))
        row = {kind: value, **summarize(timings, wall), "num_prompts": n, "input_len": args.input_len,
               "output_len": args.output_len, "length_dist": args.length_dist}
        if kind == "request_rate":
            row["max_concurrency"] = conc
        out.append(row)
        print(f"  {kind} {value}: {row['tok_per_s_total']} tok/s, TTFT p99 {row['ttft_p99_ms']} ms"
              + (f", {row['failed']} failed ({row['first_error']})" if row["failed"] else ""), flush=True)
    return out


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP serving: TTFT / ITL / TPOT / tok/s under load, continuous vs serial")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--depth", type=int_at_least(1), default=12, help="serve random weights of this depth (default 12)")
    src.add_argument("--run", default=None, help="serve this trained run instead")
    src.add_argument("--url", default=None, help="drive a server that is already running (mode as --label)")
    p.add_argument("--label", default="continuous", help="with --url: the mode recorded (continuous | serial)")
    p.add_argument("--modes", default="continuous,serial", help="comma list of continuous, serial")
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop levels (comma list)")
    p.add_argument("--request-rate", default=None, help="Poisson levels in requests/s (comma list); replaces "
                                                        "--concurrency")
    p.add_argument("--max-concurrency", type=int_at_least(1), default=None, help="with --request-rate: cap in flight")
    p.add_argument("--num-prompts", type=int_at_least(1), default=None, help="requests per level (default max(32, 4x level))")
    p.add_argument("--input-len", type=int_at_least(1), default=512, help="prompt tokens (the median if lognormal)")
    p.add_argument("--output-len", type=int_at_least(1), default=256, help="output tokens (the median if lognormal)")
    p.add_argument("--length-dist", choices=["fixed", "lognormal"], default="fixed")
    p.add_argument("--sigma", type=float_in(0.0), default=0.5, help="lognormal shape")
    p.add_argument("--max-context", type=int_at_least(1), default=2048, help="the served context (random weights: seq_len)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=32768)
    p.add_argument("--temperature", type=float_in(0.0), default=0.0)
    p.add_argument("--max-batch", type=int_at_least(1), default=None, help="server --max-batch (default: its own)")
    p.add_argument("--server-args", default="", help="more `picochat serve` options, e.g. '--kernels torch'")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--plot", default=None, help="write the latency-throughput plot here (PNG)")
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_serve_bench)


def cmd_serve_bench(args: argparse.Namespace) -> int:
    import torch

    from .record import append_records, base_record, print_json_last

    if args.request_rate:
        levels = [("request_rate", float(x)) for x in args.request_rate.split(",") if x.strip()]
    else:
        levels = [("concurrency", int(x)) for x in args.concurrency.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or not levels:
        raise ValueError(f"--modes must list {MODES} and at least one level must be given")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = base_record("serve", device, None if (args.run or args.url) else args.depth)
    from ..config import SPECIAL_TOKENS

    vocab = args.vocab_size - len(SPECIAL_TOKENS)  # random prompt tokens: ordinary ones only
    results: list[dict] = []
    if args.url:
        results += [{**r, "mode": args.label} for r in measure(args.url.rstrip("/"), args, levels, vocab)]
    else:
        run = args.run or synthetic_run(args.depth, args.vocab_size, args.max_context)
        if args.run:
            from ..runs import RunPaths
            from ..tokenizer import Tokenizer

            vocab = Tokenizer.load(RunPaths.for_run(args.run).tokenizer).n_bpe
        extra = ["--max-context", str(args.max_context), "--max-queue", "100000", "--log-level", "error"]
        extra += ["--max-batch", str(args.max_batch)] if args.max_batch else []
        extra += args.server_args.split()
        for mode in modes:
            print(f"mode {mode}: starting picochat serve --run {run}", flush=True)
            with ServerProcess(run, _free_port(), mode == "serial", extra) as server:
                results += [{**r, "mode": mode} for r in measure(server.url, args, levels, vocab)]
    records = [{**base, **r} for r in results]
    _print_table(base, args, records)
    if args.plot:
        from .batch import plot_records

        plot_records(records, args.plot, bench="serve")
    append_records(args.append, records)
    print_json_last({**base, "records": records, "speedup_continuous_vs_serial": _speedups(records)})
    return 0


def _speedups(records: list[dict]) -> dict:
    key = "concurrency" if "concurrency" in records[0] else "request_rate"
    by = {(r["mode"], r[key]): r["tok_per_s_total"] for r in records if r["tok_per_s_total"]}
    return {str(v): round(by[("continuous", v)] / by[("serial", v)], 2) for (m, v) in by
            if m == "continuous" and ("serial", v) in by}


def _print_table(base: dict, args, records: list[dict]) -> None:
    print(f"\nserve · {base['gpu']} · {args.input_len} prompt / {args.output_len} output tokens ({args.length_dist})"
          f" · torch {base['torch']}")
    key = "concurrency" if "concurrency" in records[0] else "request_rate"
    print(f"{'mode':<11}{key:>13}{'tok/s':>10}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
          f"{'ITL p99':>9}{'failed':>8}")
    for r in records:
        def ms(v):
            return f"{v:.1f}" if v is not None else "n/a"

        print(f"{r['mode']:<11}{r[key]:>13}{r['tok_per_s_total'] or 0:>10,.0f}{r['requests_per_s'] or 0:>8.2f}"
              f"{ms(r['ttft_p50_ms']):>10}{ms(r['ttft_p99_ms']):>10}{ms(r['tpot_p50_ms']):>10}"
              f"{ms(r['itl_p99_ms']):>9}{r['failed']:>8}")
    speed = _speedups(records)
    if speed:
        print("continuous / serial tok/s: " + ", ".join(f"{k}: {v}x" for k, v in speed.items()))
