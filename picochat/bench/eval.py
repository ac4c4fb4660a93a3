"""`picochat bench eval`: how long each evaluation takes (items, seconds, score), batched vs eager.

Modes, side by side in one process:
- `fast`: what `picochat eval` runs: CORE options of many items per forward padded to a few shapes
  (compiled on CUDA), letters of many questions per forward, generation in batches through the
  decode loop, HumanEval programs in parallel sandboxes;
- `eager` (with --eager): the per-item loop as nanochat runs it, on the first --eager-items items
  of each task: one item's options per forward, one question per forward, one prompt at a time.
The fast mode is also timed on the same subset so the two compare item for item.

Records (`bench: "eval"`): task, mode, items, seconds, score (CORE: centered accuracy; chat tasks:
accuracy). Use a trained run (`--run`); `--depth N` times an untrained model of that depth with
the run's tokenizer instead (the scores are then meaningless, the timings are not).
"""

from __future__ import annotations

import argparse
import time

from ..options import int_at_least
from .record import append_records, base_record, print_json_last

CHAT_TASKS = "arc-easy,arc-challenge,mmlu,gsm8k,humaneval"


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="time CORE and the chat benchmarks per task (batched vs --eager)")
    p.add_argument("--run", "--run-name", dest="run", default="default", help="run whose checkpoint is timed")
    p.add_argument("--stage", default=None, help="checkpoint stage (default: base for CORE, latest for chat)")
    p.add_argument("--depth", type=int_at_least(1), default=None, help="time an untrained model of this depth instead")
    p.add_argument("--tasks", default="core," + CHAT_TASKS, help="comma list: core and/or chat benchmarks")
    p.add_argument("--bundle", default=None, help="CORE eval bundle (URL, zip or folder)")
    p.add_argument("--max-per-task", type=int_at_least(1), default=500, help="CORE items per task")
    p.add_argument("--max-examples", type=int_at_least(1), default=None, help="chat items per task (default: all)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH_OR_URL", help="chat task data")
    p.add_argument("--standin", type=int_at_least(0), default=0, metavar="N",
                   help="time on generated stand-in data of the real layouts and shapes, N items per set, for tasks "
                        "without --bundle/--data (machines without network; scores meaningless)")
    p.add_argument("--eager", action="store_true", help="also run the eager per-item baseline on a subset")
    p.add_argument("--eager-items", type=int_at_least(1), default=50, help="items per task in the eager comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--append", default=None, help="append the records to this JSONL file")
    p.set_defaults(func=cmd_bench_eval)


def _model(args, stage: str | None, device):
    from ..runs import RunPaths, load_model

    if args.depth is None:
        return load_model(args.run, stage, device)[:2]
    from ..config import ModelConfig
    from ..model.gpt import build_model
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(RunPaths.for_run(args.run).tokenizer)
    return build_model(ModelConfig.from_depth(args.depth, vocab_size=tok.vocab_size), device, seed=0).eval(), tok


def _standin(args) -> set[str]:
    """Write stand-in data for the tasks given none; returns their names (see eval_standin.py)."""
    import tempfile
    from pathlib import Path

    from .eval_standin import write_chat_sets, write_core_bundle

    root = Path(tempfile.mkdtemp(prefix="picochat-eval-standin-"))
    used = set()
    if args.bundle is None and "core" in args.tasks.split(","):
        args.bundle = str(write_core_bundle(root / "bundle", args.standin))
        used.add("core")
    given = {pair.partition("=")[0] for pair in args.data}
    for name, path in write_chat_sets(root / "chat", args.standin).items():
        if name not in given and name in args.tasks.split(","):
            args.data.append(f"{name}={path}")
            used.add(name)
    return used


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_core(args, device, records: list[dict]) -> None:
    import torch

    from ..common import synchronize
    from ..eval.core import evaluate_core
    from ..eval.core_bundle import load_tasks, open_bundle

    tasks = load_tasks(open_bundle(args.bundle))
    model, tok = _model(args, args.stage or "base", device)
    fast_model = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    runs = [("fast", fast_model, args.max_per_task)]
    if args.eager:
        runs = [("fast", fast_model, args.eager_items), ("eager", model, args.eager_items), *runs]
    for mode, m, items in runs:
        if device.type == "cuda" and mode == "fast":  # compile every length bucket once, untimed
            _warm_up(m, model.config.seq_len)
        synchronize(device)
        result, seconds = _timed(lambda: evaluate_core(m, tok, tasks, items, "batched" if mode == "fast" else "eager",
                                                       progress=False))
        for t in result["tasks"]:
            records.append({"task": f"core:{t['task']}", "mode": mode, "items": t["n"], "seconds": t["seconds"],
                            "score": t["centered"], "depth": model.config.n_layer})
        n = sum(t["n"] for t in result["tasks"])
        records.append({"task": "core", "mode": mode, "items": n, "seconds": seconds, "score": result["core"],
                        "max_per_task": items, "depth": model.config.n_layer})


def _warm_up(model, limit: int) -> None:
    from ..eval.loglik import LENGTH_BUCKETS, Scored, score_rows

    for length in sorted({min(b, limit) for b in LENGTH_BUCKETS}):
        score_rows(model, [Scored((0,) * length, 1, length)])


def bench_chat(args, names: list[str], device, records: list[dict]) -> None:
    from ..eval.chat_suite import ChatEvalConfig, evaluate_chat_task, load_task
    from ..eval.cli import _sources

    model, tok = _model(args, args.stage, device)
    sources = _sources(args.data)
    for name in names:
        task = load_task(name, sources.get(name))
        runs = [("fast", ChatEvalConfig(max_examples=args.max_examples))]
        if args.eager:
            subset = ChatEvalConfig(max_examples=args.eager_items)
            eager = ChatEvalConfig(max_examples=args.eager_items, batch_size=1, batch_tokens=1, sandbox_workers=1)
            runs = [("fast", subset), ("eager", eager), *runs]
        if device.type == "cuda" and task.eval_type != "categorical":
            # untimed: the first decode compiles the Triton step and captures CUDA graphs (tens of
            # seconds once per process), which would otherwise land on whichever mode runs first
            for _, cfg in runs[:2]:
                evaluate_chat_task(model, tok, task, cfg, progress=False)
        for mode, cfg in runs:
            row = evaluate_chat_task(model, tok, task, cfg, progress=False)
            records.append({"task": name, "mode": mode, "items": row["n"], "seconds": row["seconds"],
                            "score": row["accuracy"], "depth": model.config.n_layer})


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from ..common import detect_device

    device = detect_device(args.device)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    standin = _standin(args) if args.standin > 0 else set()
    records: list[dict] = []
    if "core" in names:
        bench_core(args, device, records)
    chat = [n for n in names if n != "core"]
    if chat:
        bench_chat(args, chat, device, records)
    depth = args.depth
    base = base_record("eval", device, depth)
    records = [{**base, **r, "data": "standin" if r["task"].split(":")[0] in standin else "real"} for r in records]
    print(f"{'task':<36} {'mode':<6} {'items':>7} {'seconds':>9} {'items/s':>9} {'score':>8}")
    for r in records:
        rate = r["items"] / r["seconds"] if r["seconds"] else float("nan")
        print(f"{r['task']:<36} {r['mode']:<6} {r['items']:>7} {r['seconds']:>9.2f} {rate:>9.1f} {r['score']:>8.4f}")
    append_records(args.append, records)
    print_json_last(records)
    return 0
