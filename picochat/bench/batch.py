"""`picochat bench batch`: many requests through the scheduler; continuous batching vs its baselines.

Engine level (no HTTP): random weights (bf16 on CUDA), random prompt tokens, greedy, stop tokens
and tools off, so every request generates exactly its asked `max_tokens`. Prompt and output
lengths are drawn from lognormals (medians `--prompt-median`/`--output-median`, like vLLM's random
dataset) and clipped to the context. Load is closed-loop (`--concurrency C`: C clients, each sends
its next request when the last one finished) or open-loop (`--request-rate R`: Poisson arrivals,
R requests/s; default request counts: max(64, 16 x C), max(64, 8 x R)). Modes, side by side in
one process on one scheduler (same cache, same kernels):
  continuous  the scheduler as built: requests join and leave the running batch between chunks;
  static      groups of C requests: wait for C, run them as one batch until the last finishes
              (a group starts when the previous one ended); and `static_fixed`, a static batch of C
              requests of exactly the median lengths: the pure decode rate at batch C;
  serial      one request at a time (upstream nanochat's web server).
Metrics per mode, as `vllm bench serve` defines them: TTFT = submit -> first token event read by
the client; ITL = gap between successive token events (tokens arrive a chunk at a time, so ITL
p99 is about a chunk's duration); TPOT = (E2E - TTFT) / (output tokens - 1); aggregate output
tok/s = all output tokens / wall time; slot occupancy = mean share of the cache's slots in use.
`--plot PNG` draws throughput against TTFT p99 and TPOT p50 for every mode and load (matplotlib).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Trace:
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # when each token event was read


def make_workload(n: int, prompt_median: int, output_median: int, sigma: float, vocab: int, context: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """n (prompt tokens, output length) pairs; lognormal lengths, prompt + output within context."""
    gen = torch.Generator().manual_seed(seed)

    def lengths(median: int) -> list[int]:
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        return [max(1, round(median * math.exp(sigma * float(v)))) for v in z]

    prompts, outputs = lengths(prompt_median), lengths(output_median)
    work = []
    for p, o in zip(prompts, outputs):
        p = min(p, context // 2)
        o = min(o, context - p)
        work.append((torch.randint(0, vocab, (p,), generator=gen).tolist(), o))
    return work


def _run_one(sched, prompt: list[int], out_len: int, trace: Trace) -> None:
    from ..infer.request import SamplingParams, TokenEvent

    params = SamplingParams(max_tokens=out_len, temperature=0.0, stop_token_ids=(), tools=False)
    trace.sent = time.perf_counter()
    handle = sched.submit(prompt, params)
    for event in handle.events():
        if isinstance(event, TokenEvent):
            trace.times.append(time.perf_counter())


class _Occupancy:
    """Samples the scheduler's slots in use every few milliseconds while a mode runs."""

    def __init__(self, sched, every: float = 0.002):
        self.sched, self.every, self.samples = sched, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            st = self.sched.stats()
            self.samples.append(st["slots_used"] / st["slots_total"])
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def closed_loop(sched, work, concurrency: int) -> list[Trace]:
    traces = [Trace() for _ in work]
    lock, nxt = threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(work):
                return
            _run_one(sched, *work[i], traces[i])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return traces


def open_loop(sched, work, rate: float, seed: int) -> list[Trace]:
    gen = torch.Generator().manual_seed(seed + 1)
    gaps = torch.empty(len(work), dtype=torch.float64).exponential_(rate, generator=gen).tolist()
    traces = [Trace() for _ in work]
    threads = []
    start = time.perf_counter()
    due = 0.0
    for i, (prompt, out_len) in enumerate(work):
        due += gaps[i]
        time.sleep(max(0.0, start + due - time.perf_counter()))
        t = threading.Thread(target=_run_one, args=(sched, prompt, out_len, traces[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return traces


def static_groups(sched, work, batch: int) -> list[Trace]:
    traces = [Trace() for _ in work]
    for g in range(0, len(work), batch):
        group = list(range(g, min(g + batch, len(work))))
        threads = [threading.Thread(target=_run_one, args=(sched, *work[i], traces[i])) for i in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return traces


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def steady_rate(traces: list[Trace], start: float) -> float | None:
    """Output tok/s while the load was whole: from the start until the last request was sent (in
    a closed loop every client then has a request in the system; after it the clients run out of
    work one by one and the batch drains). None when that window holds no token."""
    end = max(t.sent for t in traces)
    tokens = sum(1 for t in traces for x in t.times if x <= end)
    return tokens / (end - start) if tokens and end > start else None


def summarize(traces: list[Trace], wall: float, start: float | None = None) -> dict:
    ttft = [1000 * (t.times[0] - t.sent) for t in traces if t.times]
    tpot = [1000 * (t.times[-1] - t.times[0]) / (len(t.times) - 1) for t in traces if len(t.times) > 1]
    itl = [1000 * (b - a) for t in traces for a, b in zip(t.times, t.times[1:])]
    tokens = sum(len(t.times) for t in traces)

    def r(x):
        return round(x, 2) if x is not None else None

    steady = steady_rate(traces, start) if start is not None and traces else None
    return {"requests": len(traces), "output_tokens": tokens, "seconds": round(wall, 3),
            "tok_per_s_total": round(tokens / max(wall, 1e-9), 1),
            "tok_per_s_steady": round(steady, 1) if steady is not None else None,
            "ttft_p50_ms": r(_pct(ttft, 0.5)), "ttft_p99_ms": r(_pct(ttft, 0.99)),
            "tpot_p50_ms": r(_pct(tpot, 0.5)), "tpot_p99_ms": r(_pct(tpot, 0.99)),
            "itl_p50_ms": r(_pct(itl, 0.5)), "itl_p99_ms": r(_pct(itl, 0.99))}


def _measure(sched, name: str, run, steady: bool = True) -> dict:
    """Run one load; `steady`: also report the rate before the drain (see `steady_rate`; not for
    one static batch, whose requests are all sent at once)."""
    with _Occupancy(sched) as occ:
        t0 = time.perf_counter()
        traces = run()
        wall = time.perf_counter() - t0
    rec = summarize(traces, wall, t0 if steady else None)
    rec["slot_occupancy"] = round(occ.mean, 3)
    steady = f" ({rec['tok_per_s_steady']:,.0f} steady)" if rec["tok_per_s_steady"] else ""
    print(f"  {name}: {rec['tok_per_s_total']:,.0f} tok/s{steady}, TTFT p99 {rec['ttft_p99_ms']} ms, "
          f"occupancy {rec['slot_occupancy']}", flush=True)
    return rec


@dataclass
class Load:
    """What every scheduler of one bench run is measured with."""

    concurrency: list[int]
    request_rates: list[float]
    modes: list[str]
    num_requests: list[int | None]
    prompt_median: int
    output_median: int
    sigma: float
    serial_requests: int
    seed: int
    variants: list[dict]  # settings continuous mode runs with: prefill_graphs, compact, followup_wait, prefill_stream
    profile: bool


def _as_list(value) -> list:
    """A setting that may be given once or as a list of values to measure each with."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_batch_bench(depth: int = 12, concurrency: list[int] = (1, 32), request_rates: list[float] = (),
                    modes: list[str] = ("continuous", "static", "serial"),
                    num_requests: int | None | list[int | None] = None,
                    prompt_median: int = 256, output_median: int = 256, sigma: float = 0.5,
                    slots: int | None = None, device: str | torch.device = "cuda", vocab_size: int = 32768,
                    seq_len: int = 2048, serial_requests: int = 16, seed: int = 0,
                    sync_every: int | None | list[int | None] = None,
                    kernels: str = "auto", prefill_budget: int | None = None,
                    compile: bool | str = False, triton_max_rows: int | None = None,
                    profile: bool = False, prefill_graphs: bool | None | list[bool] = None,
                    followup_wait: float | None | list[float] = None, chunk_graphs: bool = True,
                    take_by_request: bool = True, compact: bool | list[bool] = True,
                    prefill_stream: bool | list[bool] = False) -> list[dict]:
    """Records of every mode and load. `num_requests` a list: every load point runs with each
    count (the closed loop's drain at the end weighs less in longer runs). `sync_every` a list: one
    scheduler per value, one after the other on the same model. `prefill_graphs`, `compact`,
    `followup_wait`, `prefill_stream` lists: continuous mode is measured with each combination on
    one scheduler (built with them, then toggled; static and serial with the first), so an A/B
    shares the build, the kernels and the warm-up."""
    from ..common import compute_dtype
    from ..config import ModelConfig
    from ..infer.scheduler import SchedulerConfig
    from ..model.gpt import build_model

    device = torch.device(device)
    cuda = device.type == "cuda"
    graph_variants, compacts = _as_list(prefill_graphs), _as_list(compact)
    waits, streams = _as_list(followup_wait), _as_list(prefill_stream)
    dtype = compute_dtype(device)
    cfg = ModelConfig.from_depth(depth, vocab_size=vocab_size, seq_len=seq_len)
    model = build_model(cfg, device, seed=seed).to(dtype).eval()
    top = max(list(concurrency) + [1])
    slots = slots or max(top, 1)
    counts = _as_list(num_requests)
    load = Load(list(concurrency), list(request_rates), list(modes), counts, prompt_median, output_median,
                sigma, serial_requests, seed,
                [{"prefill_graphs": g, "compact": c, "followup_wait": w, "prefill_stream": st}
                 for g in graph_variants for c in compacts for w in waits for st in streams], profile)
    records = []
    for k in _as_list(sync_every):
        config = SchedulerConfig(slots=slots, sync_every=k, kernels=kernels, prefill_budget=prefill_budget,
                                 max_queue=100_000, compile=compile if cuda else False,
                                 triton_max_rows=triton_max_rows,
                                 prefill_graphs=True if any(graph_variants) else graph_variants[0],
                                 chunk_graphs=chunk_graphs, take_by_request=take_by_request, compact=compacts[0],
                                 prefill_stream=any(streams),
                                 **({} if waits[0] is None else {"followup_wait": waits[0]}))
        records += _bench_scheduler(model, config, load)
        if cuda:
            torch.cuda.empty_cache()  # the next scheduler's cache and graphs
    return records


def _bench_scheduler(model, config, load: Load) -> list[dict]:
    from ..infer.scheduler import Scheduler

    t0 = time.perf_counter()
    sched = Scheduler(model, None, config).start()
    build_s = time.perf_counter() - t0
    c0, vocab = model.config, model.config.vocab_size
    common = {"prompt_median": load.prompt_median, "output_median": load.output_median, "length_sigma": load.sigma,
              "slots": sched.slots, "mode_step": sched.mode, "sync_every": sched.sync_every,
              "dtype": str(sched.dtype)[6:], "vocab_size": vocab, "seq_len": c0.seq_len,
              "scheduler_build_s": round(build_s, 2), "compile": config.compile or False, "kernels": config.kernels,
              "prefill_graphs": sched.batch.fresh is not None and sched.batch.fresh.graph,
              "followup_wait_ms": round(1000 * config.followup_wait, 3), "take_by_request": config.take_by_request,
              "chunk_graphs": sorted({b for b, _ in sched.batch.chunk_graphs}) if sched.mode != "naive" else [],
              "step_kernels": {b: r.kernels for b, r in sched.batch.runners.items()} if sched.mode == "fast" else None}
    print(f"scheduler: {sched.slots} slots x {sched.max_context} context, {sched.mode} decode, chunks of "
          f"{sched.sync_every}, built in {build_s:.1f} s")
    top = max(load.concurrency + [1])
    # warm-up: every bucket size the runs will use, prefill shapes, the host paths
    warm = make_workload(max(8, 2 * top), load.prompt_median, min(load.output_median, 32), 0.0, vocab,
                         sched.max_context, load.seed + 99)
    closed_loop(sched, warm, top)
    closed_loop(sched, warm[:2], 1)
    try:
        return _run_loads(sched, load, common)
    finally:
        sched.close()


def _show(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) or value is None else f"{1000 * value:g} ms"


def _run_loads(sched, load: Load, common: dict) -> list[dict]:
    built_fresh, built_side, variants = sched.batch.fresh, sched.batch.side, load.variants
    vocab, seed = common["vocab_size"], load.seed
    varying = [k for k in variants[0] if len({v[k] for v in variants}) > 1]
    default_wait = sched.config.followup_wait

    def use(variant) -> dict:
        if "prefill_graphs" in varying:
            sched.batch.fresh = built_fresh if variant["prefill_graphs"] else None
        if "prefill_stream" in varying:
            sched.batch.side = built_side if variant["prefill_stream"] else None
        sched.config.compact = variant["compact"]  # both read by every step
        sched.config.followup_wait = default_wait if variant["followup_wait"] is None else variant["followup_wait"]
        # asked: this run's setting; prefill_graphs: whether graphs replayed (off CUDA the same
        # scratch-cache prefill runs eagerly)
        return {"prefill_graphs_asked": bool(variant["prefill_graphs"]), "compact": variant["compact"],
                "prefill_stream": sched.batch.side is not None,
                "followup_wait_ms": round(1000 * sched.config.followup_wait, 3),
                "prefill_graphs": sched.batch.fresh is not None and sched.batch.fresh.graph}

    def each_variant(name: str, run, **where) -> None:
        for variant in variants:
            extra = use(variant)
            label = name + "".join(f" ({k.replace('_', ' ')} {_show(variant[k])})" for k in varying)
            moves, side = sched.counters["moves"], sched.batch.side
            before = (side.overlapped, side.waited) if side is not None else None
            rec = _measure(sched, label, run)
            if side is not None:  # replays run beside the chunk in flight / after it
                extra = {**extra, "prefill_overlapped": side.overlapped - before[0],
                         "prefill_waited": side.waited - before[1]}
            records.append({**common, **rec, **extra, "rows_moved": sched.counters["moves"] - moves,
                            "mode": "continuous", **where})
        use(variants[0])

    records = []
    for c, count in [(c, count) for c in load.concurrency for count in load.num_requests]:
        n = count or max(64, 16 * c)
        work = make_workload(n, load.prompt_median, load.output_median, load.sigma, vocab, sched.max_context, seed + c)
        print(f"concurrency {c}: {n} requests")
        for mode in load.modes:
            if mode == "continuous":
                each_variant(mode, lambda: closed_loop(sched, work, c), concurrency=c)
                continue
            if mode == "static":
                rec = _measure(sched, mode, lambda: static_groups(sched, work, c))
                fixed = make_workload(c, load.prompt_median, load.output_median, 0.0, vocab, sched.max_context, seed)
                frec = _measure(sched, "static_fixed", lambda: static_groups(sched, fixed, c), steady=False)
                records.append({**common, **frec, "mode": "static_fixed", "concurrency": c})
            elif mode == "serial":
                rec = _measure(sched, mode, lambda: closed_loop(sched, work[:load.serial_requests], 1))
            else:
                raise ValueError(f"unknown mode {mode!r}")
            records.append({**common, **rec, "mode": mode, "concurrency": c})
    for rate, count in [(r, count) for r in load.request_rates for count in load.num_requests]:
        n = count or max(64, int(8 * rate))
        work = make_workload(n, load.prompt_median, load.output_median, load.sigma, vocab, sched.max_context, seed)
        print(f"request rate {rate}/s: {n} requests")
        each_variant("continuous", lambda: open_loop(sched, work, rate, seed), request_rate=rate)
    if load.profile:
        for c in load.concurrency:
            work = make_workload(max(2 * c, 16), load.prompt_median, load.output_median, load.sigma, vocab,
                                 sched.max_context, seed + c)
            print(f"\nprofile: continuous, concurrency {c}, {len(work)} requests (not recorded)")
            profile_run(sched, lambda: closed_loop(sched, work, c))
    return records


def profile_run(sched, run, rows: int = 30) -> None:
    """Run once under torch.profiler (kernels and ops, every thread) and cProfile (the scheduler's
    steps; on Python 3.12 it records the other threads' Python too); print both tables and the
    kernel time summed over the run's wall time."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    cuda = sched.device.type == "cuda"
    py = cProfile.Profile()
    step = sched.step

    def profiled_step():
        py.enable()
        try:
            return step()
        finally:
            py.disable()

    sched.step = profiled_step  # the loop calls self.step(): the instance attribute wins
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            traces = run()
            wall = time.perf_counter() - t0
    finally:
        del sched.step
    rec = summarize(traces, wall)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    if cuda:
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
        print(f"GPU kernel time {busy:.3f} s over {wall:.3f} s wall ({100 * busy / wall:.0f}%: kernels that overlap, "
              f"as programmatic dependent launch makes them, count twice), {rec['tok_per_s_total']:,.0f} tok/s "
              "while profiled")
    out = io.StringIO()
    pstats.Stats(py, stream=out).sort_stats("tottime").print_stats(rows)
    print("scheduler thread (cProfile, inflates Python-heavy parts):\n" + out.getvalue()[-6000:])


def plot_records(records: list[dict], path: str, bench: str = "batch") -> None:
    """Throughput against TTFT p99 and TPOT p50, a line per mode across the loads measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ttft_p99_ms", "TTFT p99 (ms)"), (axes[1], "tpot_p50_ms", "TPOT p50 (ms)")):
        def line(r: dict) -> str:
            return r["mode"] + (" (Poisson arrivals)" if "request_rate" in r else "")

        for name in sorted({line(r) for r in records}):
            pts = sorted((r["tok_per_s_total"], r[key], r.get("concurrency") or r.get("request_rate"))
                         for r in records if line(r) == name and r.get(key) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, load in pts:
                ax.annotate(str(load), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("aggregate output tok/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    r0 = records[0] if records else {}
    fig.suptitle(f"picochat bench {bench} · {r0.get('gpu', '')} · d{r0.get('depth', '')} · points labelled by "
                 "concurrency (or request rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    from ..options import int_at_least

    p = sub.add_parser("batch", help="many requests through the scheduler: continuous vs static vs serial")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--concurrency", default="1,32", help="comma list of closed-loop client counts ('' for none)")
    p.add_argument("--request-rate", default="", help="comma list of open-loop Poisson rates (requests/s)")
    p.add_argument("--modes", default="continuous,static,serial", help="comma list")
    p.add_argument("--num-requests", default=None, metavar="N[,N...]",
                   help="per load point (default max(64, 16 x concurrency), so the closed loop's drain at the end "
                        "weighs little; max(64, 8 x rate) open-loop); a list runs every load point with each")
    p.add_argument("--serial-requests", type=int, default=16, help="requests in serial mode")
    p.add_argument("--prompt-median", type=int, default=256)
    p.add_argument("--output-median", type=int, default=256)
    p.add_argument("--length-sigma", type=float, default=0.5, help="lognormal sigma of both lengths (0 = fixed)")
    p.add_argument("--slots", type=int, default=None, help="cache slots (default: the largest concurrency)")
    p.add_argument("--seq-len", type=int, default=2048, help="the model's context")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--sync-every", default=None, metavar="K[,K...]",
                   help="decode steps per chunk (default: the scheduler's, 8 on CUDA); a list builds one "
                        "scheduler per value, one after the other")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="padded prompt tokens per prefill forward (default 8192 on CUDA, 2048 elsewhere)")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="the decode step of each batch bucket (auto: Triton up to --triton-max-rows, torch above)")
    p.add_argument("--triton-max-rows", type=int_at_least(1), default=None,
                   help="with --kernels auto: the largest bucket the Triton step runs (default: the scheduler's)")
    p.add_argument("--prefill-graphs", default=None, metavar="on|off|on,off",
                   help="prompts' first chunks replayed from CUDA graphs (default: the scheduler's, on in fast "
                        "mode); a list such as on,off measures continuous mode with each on one scheduler (static, "
                        "serial: the first)")
    p.add_argument("--compact", default="on", metavar="on|off|on,off",
                   help="move running rows down into free slots when they fit a smaller batch bucket (default on); "
                        "a list measures continuous mode with each on one scheduler")
    p.add_argument("--prefill-stream", default="off", metavar="on|off|on,off",
                   help="first-chunk replays on a second CUDA stream beside the decode chunk (experimental, default "
                        "off); a list measures continuous mode with each on one scheduler")
    p.add_argument("--chunk-graphs", choices=("on", "off"), default="on",
                   help="Triton buckets launch a whole decode chunk as one CUDA graph (default on)")
    p.add_argument("--followup-wait", default=None, metavar="SECONDS[,SECONDS...]",
                   help="how long the loop waits for follow-up submissions after a finish (0 = off; default: the "
                        "scheduler's); a list measures continuous mode with each on one scheduler")
    p.add_argument("--take-by-request", choices=("on", "off"), default="on",
                   help="the loop reads a chunk's tokens request by request (default on; off: the first per-step loop)")
    p.add_argument("--profile", action="store_true",
                   help="after the measured runs, profile one short continuous run per concurrency and print "
                        "the kernel table (torch.profiler) and the scheduler thread's Python (cProfile)")
    p.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                   help="torch.compile the torch step of the larger buckets before capture (minutes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the latency-throughput plot here (PNG)")
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_batch_bench)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _on_off_list(option: str, text: str) -> list[bool]:
    """`on`, `off` or a comma list of them, as booleans; anything else ends the command with why."""
    words = [w.strip() for w in text.split(",")]
    if not words or any(w not in ("on", "off") for w in words):
        raise SystemExit(f"--{option} takes on, off or a comma list of them (got {text!r})")
    return [w == "on" for w in words]


def cmd_batch_bench(args: argparse.Namespace) -> int:
    from ..common import detect_device
    from .record import append_records, base_record, print_json_last

    device = detect_device(args.device)
    try:
        conc = _ints(args.concurrency)
        rates = [float(x) for x in args.request_rate.split(",") if x.strip()]
        syncs = _ints(args.sync_every) if args.sync_every is not None else [None]
        counts = _ints(args.num_requests) if args.num_requests is not None else [None]
    except ValueError:
        raise SystemExit("--concurrency, --request-rate and --sync-every take comma lists of numbers") from None
    for name, values in (("sync-every", syncs), ("num-requests", counts)):
        if not values or any(k is not None and k < 1 for k in values):
            raise SystemExit(f"--{name} takes values >= 1 (got {getattr(args, name.replace('-', '_'))!r})")
    if any(c < 1 for c in conc) or any(r <= 0 for r in rates) or not (conc or rates):
        raise SystemExit("give --concurrency values >= 1 and/or --request-rate values > 0")
    for name, low in (("slots", 1), ("serial_requests", 1), ("prompt_median", 1),
                      ("output_median", 1), ("seq_len", 2), ("prefill_budget", 1), ("depth", 1),
                      ("vocab_size", 2)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low} (got {value})")
    if args.length_sigma < 0:
        raise SystemExit(f"--length-sigma must be >= 0 (got {args.length_sigma})")
    graph_variants = None if args.prefill_graphs is None else _on_off_list("prefill-graphs", args.prefill_graphs)
    compacts = _on_off_list("compact", args.compact)
    streams = _on_off_list("prefill-stream", args.prefill_stream)
    waits = [None]
    if args.followup_wait is not None:
        try:
            waits = [float(w) for w in args.followup_wait.split(",") if w.strip()]
        except ValueError:
            waits = []
        if not waits or any(not 0 <= w <= 1 for w in waits):
            raise SystemExit(f"--followup-wait takes seconds in [0, 1] or a comma list of them "
                             f"(got {args.followup_wait!r})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("continuous", "static", "serial")]
    if bad:
        raise SystemExit(f"unknown --modes {bad}; pick from continuous, static, serial")
    records = run_batch_bench(args.depth, conc, rates, modes, counts, args.prompt_median,
                              args.output_median, args.length_sigma, args.slots, device, args.vocab_size,
                              args.seq_len, args.serial_requests, args.seed, syncs, args.kernels,
                              args.prefill_budget, args.compile, args.triton_max_rows, args.profile,
                              graph_variants,
                              waits, args.chunk_graphs == "on",
                              take_by_request=args.take_by_request == "on", compact=compacts, prefill_stream=streams)
    base = base_record("batch", device, args.depth)
    records = [{**base, **r} for r in records]
    print(f"\nbatch · {base['gpu']} · d{args.depth} · prompt/output medians {args.prompt_median}/"
          f"{args.output_median} (lognormal sigma {args.length_sigma}) · greedy · torch {base['torch']}")
    ratios = _print_table(records, conc, len(syncs) > 1, [k for k, n in (("prefill_graphs", len(graph_variants or [0])),
                                                                       ("compact", len(compacts)),
                                                                       ("followup_wait", len(waits)),
                                                                       ("prefill_stream", len(streams))) if n > 1])
    if args.plot:
        plot_records(records, args.plot)
        print(f"plot: {args.plot}")
    append_records(args.append, records)
    print_json_last({**base, "records": records, "ratios": ratios})
    return 0


def _print_table(records: list[dict], conc: list[int], by_sync: bool, varying: list[str]) -> dict:
    """The human table; returns continuous's ratios to the baselines per concurrency (and per chunk
    length and request count when several were run; with several prefill-graph settings, the
    first's): aggregate tok/s over the whole run, and `steady_vs_static_fixed`, continuous's
    steady-state rate (before the drain) over `static_fixed`'s."""
    width = 13 + (6 if by_sync else 0) + 17 * len(varying)
    print(f"{'mode':<{width}}{'load':>7}{'reqs':>6}{'tok/s':>10}{'steady':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT p50':>10}{'ITL p99':>9}{'occupancy':>11}")
    for r in records:
        load = f"c{r['concurrency']}" if "concurrency" in r else f"r{r['request_rate']:g}"
        label = r["mode"] + (f" k{r['sync_every']}" if by_sync else "")
        if r["mode"] == "continuous":
            shown = {"prefill_graphs": ("prefill gr.", _show(r.get("prefill_graphs_asked"))),
                     "compact": ("compact", _show(r.get("compact"))),
                     "followup_wait": ("wait", f"{r['followup_wait_ms']:g} ms"),
                     "prefill_stream": ("prefill stream", _show(r.get("prefill_stream")))}
            label += "".join(f" ({shown[k][0]} {shown[k][1]})" for k in varying)
        steady = f"{r['tok_per_s_steady']:,.0f}" if r.get("tok_per_s_steady") else "-"
        print(f"{label:<{width}}{load:>7}{r['requests']:>6}{r['tok_per_s_total']:>10,.0f}{steady:>9}"
              f"{r['ttft_p50_ms']:>10}{r['ttft_p99_ms']:>10}{r['tpot_p50_ms']:>10}{r['itl_p99_ms']:>9}"
              f"{r['slot_occupancy']:>11.2f}")
    ratios = {}
    counts = {}
    for r in records:
        if r["mode"] == "continuous" and "concurrency" in r:
            counts.setdefault(r["concurrency"], set()).add(r["requests"])
    several_counts = any(len(n) > 1 for n in counts.values())
    for k in sorted({r["sync_every"] for r in records}):
        for c in conc:
            by, fixed = {}, None
            for r in records:
                if r.get("concurrency") == c and r["sync_every"] == k:
                    if r["mode"] == "static_fixed":
                        fixed = fixed or r
                    by.setdefault((r["mode"], r["requests"]), r)
            for (mode, n), cont in by.items():
                if mode != "continuous":
                    continue
                key = str(c) + (f"@k{k}" if by_sync else "") + (f"x{n}" if several_counts else "")
                rs = {f"vs_{m}": round(cont["tok_per_s_total"] / b["tok_per_s_total"], 2)
                      for m in ("static", "serial") for b in [by.get((m, n))] if b}
                if fixed:
                    rs["vs_static_fixed"] = round(cont["tok_per_s_total"] / fixed["tok_per_s_total"], 2)
                    if cont.get("tok_per_s_steady"):
                        rs["steady_vs_static_fixed"] = round(cont["tok_per_s_steady"] / fixed["tok_per_s_total"], 2)
                ratios[key] = rs
    for c, rs in [(c, rs) for c, rs in ratios.items() if rs]:
        print(f"continuous at concurrency {c}: " + ", ".join(f"{v}x {k[3:] if k.startswith('vs_') else k}"
                                                             for k, v in rs.items()))
    return ratios
