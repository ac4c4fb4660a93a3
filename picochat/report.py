"""The report card: `runs/<run>/report.md` (and PNG loss curves beside it), `picochat report --run R`.

Everything comes from what the stages left in the run directory, nothing is recomputed:
- system: Python, torch, the device, the commit;
- per training stage (base, mid, sft, rl): the latest checkpoint's metadata (model shape, settings,
  final loss and validation bits per byte) and its training log `logs/train_<stage>.jsonl`
  (steps, wall time, tokens, throughput, MFU, peak memory), with a loss-curve PNG;
- evaluations, from the result files (`picochat.runs.read_results`): the CORE table per task,
  the chat benchmark table with ChatCORE and a few failed items, the demo's held-out tasks, bits per
  byte, and any other stage's summary as a small key/value table;
- a few sample answers from the chat evaluation, total time and an estimated cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from .common import atomic_write_bytes, git_commit, log
from .runs import STAGES, RunPaths, latest_checkpoint, read_meta, read_results

DEFAULT_GPU_HOURLY_USD = 3.0  # assumed price of one GPU-hour (an H100/H200 on demand); --gpu-hourly-usd


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
    return out


# ---------------------------------------------------------------------------------------------------
# sections


def system_section() -> str:
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    else:
        import os

        device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    rows = [["device", device], ["torch", torch.__version__], ["python", platform.python_version()],
            ["platform", platform.platform()], ["commit", git_commit()],
            ["generated", time.strftime("%Y-%m-%d %H:%M:%S")]]
    return "## System\n\n" + _table(["", ""], rows)


def stage_summary(paths: RunPaths, stage: str) -> dict | None:
    """What one training stage did, from its checkpoint metadata and training log."""
    ckpt = latest_checkpoint(paths.stage(stage))
    steps = _read_jsonl(paths.logs / f"train_{stage}.jsonl")
    if ckpt is None and not steps:
        return None
    meta = read_meta(ckpt, verify=False) if ckpt else {}
    val = _read_jsonl(paths.logs / f"val_{stage}.jsonl")
    seconds = sum(s.get("seconds", 0.0) for s in steps)
    batch_tokens = (meta.get("train") or {}).get("total_batch_tokens")
    tokens = len(steps) * batch_tokens if batch_tokens else None
    mfus = [s["mfu"] for s in steps if s.get("mfu") is not None]
    return {"stage": stage, "checkpoint": str(ckpt) if ckpt else None, "step": meta.get("step"),
            "model": meta.get("model", {}), "train": meta.get("train", {}), "world_size": meta.get("world_size", 1),
            "steps_logged": len(steps), "seconds": seconds, "tokens": tokens,
            "tok_per_s": tokens / seconds if tokens and seconds else None,
            "mfu": sum(mfus) / len(mfus) if mfus else None,
            "peak_mem_gib": max((s.get("peak_mem_gib") or 0.0 for s in steps), default=None),
            "first_loss": steps[0]["loss"] if steps else None, "final_loss": meta.get("loss") or
            (steps[-1]["loss"] if steps else None),
            "val_bpb": meta.get("val_bpb") or (val[-1]["val_bpb"] if val else None),
            "losses": [(s["step"], s["loss"]) for s in steps if "loss" in s],
            "val": [(v["step"], v["val_bpb"]) for v in val if "val_bpb" in v]}


def plot_losses(summary: dict, dest: Path) -> bool:
    """Loss (and validation bpb) against step as a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    steps, losses = zip(*summary["losses"])
    ax.plot(steps, losses, lw=1, label="train loss")
    if summary["val"]:
        vs, vb = zip(*summary["val"])
        ax.plot(vs, vb, "o-", ms=3, label="val bits/byte")
    ax.set_xlabel("step")
    ax.set_title(f"{summary['stage']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return True


def stages_section(paths: RunPaths, summaries: list[dict]) -> str:
    out = ["## Training"]
    rows = []
    for s in summaries:
        m = s["model"]
        rows.append([s["stage"], s["step"], f"d{m.get('n_layer', '?')} × {m.get('n_embd', '?')}",
                     s["train"].get("seq_len"), s["train"].get("total_batch_tokens"), s["world_size"],
                     f"{s['seconds'] / 60:.1f} min", s["tokens"], s["tok_per_s"],
                     None if s["mfu"] is None else f"{100 * s['mfu']:.1f}%", s["first_loss"], s["final_loss"],
                     s["val_bpb"]])
    out.append(_table(["stage", "step", "model", "seq len", "batch tokens", "GPUs", "time", "tokens", "tok/s", "MFU",
                       "first loss", "final loss", "val bpb"], rows))
    for s in summaries:
        if len(s["losses"]) >= 2 and plot_losses(s, paths.root / f"loss_{s['stage']}.png"):
            out.append(f"![{s['stage']} loss](loss_{s['stage']}.png)")
    return "\n\n".join(out)


def core_section(name: str, r: dict) -> str:
    rows = [[t["task"], t["type"], t["shots"], t["n"], f"{100 * t['accuracy']:.2f}%", f"{100 * t['baseline']:.1f}%",
             t["centered"]] for t in r["tasks"]]
    rows.append(["**CORE**", "", "", "", "", "", f"**{r['core']:.4f}**"])
    cap = r.get("max_per_task")
    items = f"at most {cap} items per task" if cap else "all items"
    note = (f"Checkpoint `{r.get('checkpoint')}` (step {r.get('step')}); {r.get('baselines')} random baselines "
            f"(see docs/evaluation.md); {items}; {r.get('seconds', 0):.1f}s.")
    return f"## CORE ({r.get('stage', name)})\n\n" + _table(
        ["task", "type", "shots", "n", "accuracy", "baseline", "centered"], rows) + "\n\n" + note


def chat_section(name: str, r: dict, failures: int = 3) -> str:
    rows = [[t["task"], t["n"], f"{100 * t['accuracy']:.2f}%", t.get("centered"), f"{t['seconds']:.1f}s"]
            for t in r["tasks"]]
    if r.get("chatcore") is not None:
        rows.append(["**ChatCORE**", "", "", f"**{r['chatcore']:.4f}**", ""])
    out = [f"## Chat evaluation ({r.get('stage', name)})",
           _table(["task", "n", "accuracy", "centered", "time"], rows)]
    if r.get("sandbox"):
        out.append(f"HumanEval ran in the `{r['sandbox']['mode']}` sandbox: {r['sandbox']['contains']}.")
    wrong = [(t["task"], it) for t in r["tasks"] for it in [i for i in t.get("items", []) if not i["correct"]][:failures]]
    if wrong:
        out.append("Some failures:\n\n" + "\n".join(
            f"- {task} `{it.get('id')}`: answered {_quote(it.get('answer'))}"
            f"{', expected ' + _quote(it['expected']) if it.get('expected') else ''}"
            f"{' (' + it['error'] + ')' if it.get('error') else ''}" for task, it in wrong))
    return "\n\n".join(out)


def _quote(text, limit: int = 120) -> str:
    text = " ".join(str(text or "").split())
    return f"“{text[:limit]}{'…' if len(text) > limit else ''}”"


def samples_section(results: dict[str, dict], count: int = 4) -> str | None:
    items = [(t["task"], it) for name, r in sorted(results.items()) if name.startswith("chat_eval_")
             for t in r.get("tasks", []) if t["task"] in ("gsm8k", "humaneval") or "centered" not in t
             for it in t.get("items", [])[:2] if it.get("question")]
    if not items:
        return None
    blocks = [f"**{task}** — user: {_quote(it['question'], 300)}\n\nassistant: {_quote(it['answer'], 300)} "
              f"({'right' if it['correct'] else 'wrong'})" for task, it in items[:count]]
    return "## Sample answers\n\n" + "\n\n".join(blocks)


def other_section(name: str, r: dict) -> str:
    if "tasks" in r and all("trivial" in t for t in r["tasks"]):  # the demo's held-out tasks
        rows = [[t["task"], t["n"], f"{100 * t['accuracy']:.1f}%", f"{100 * t['trivial']:.1f}%"] for t in r["tasks"]]
        return (f"## Chat evaluation ({r.get('stage', name)}): held-out synthetic tasks\n\n"
                + _table(["task", "n", "accuracy", "trivial"], rows))
    if "val_bpb" in r:
        return (f"## Validation bits per byte ({r.get('stage', name)})\n\n{r['val_bpb']:.4f} bits per byte on "
                f"{_fmt(r.get('max_tokens'))} held-out tokens of the {r.get('source')} source (step {r.get('step')}).")
    scalars = [[k, v] for k, v in r.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return f"## {name}\n\n" + _table(["", ""], scalars[:30])


# ---------------------------------------------------------------------------------------------------
# the whole card


def build_report(run: str, gpu_hourly_usd: float = DEFAULT_GPU_HOURLY_USD) -> str:
    paths = RunPaths.for_run(run)
    if not paths.root.exists():
        raise FileNotFoundError(f"no run {run!r} at {paths.root}")
    summaries = [s for s in (stage_summary(paths, st) for st in STAGES) if s is not None]
    results = read_results(run)
    parts = [f"# picochat report: run `{run}`", system_section()]
    if summaries:
        parts.append(stages_section(paths, summaries))
    eval_seconds = 0.0
    for name, r in results.items():
        eval_seconds += float(r.get("seconds") or 0) + sum(float(t.get("seconds") or 0) for t in r.get("tasks", [])
                                                           if name.startswith("chat_eval_"))
        if name.startswith("core_") and "core" in r:
            parts.append(core_section(name, r))
        elif name.startswith("chat_eval_"):
            parts.append(chat_section(name, r))
        else:
            parts.append(other_section(name, r))
    samples = samples_section(results)
    if samples:
        parts.append(samples)
    train_seconds = sum(s["seconds"] for s in summaries)
    gpus = max((s["world_size"] for s in summaries), default=1)
    total_h = (train_seconds + eval_seconds) / 3600
    cost = (f"about ${total_h * gpus * gpu_hourly_usd:,.2f} at ${gpu_hourly_usd:.2f} per GPU-hour × {gpus} GPU(s)"
            if _on_gpu() else "n/a (CPU run)")
    parts.append("## Totals\n\n" + _table(["", ""], [["training time", f"{train_seconds / 60:.1f} min"],
                                                     ["evaluation time", f"{eval_seconds / 60:.1f} min"],
                                                     ["estimated cost", cost]]))
    return "\n\n".join(parts) + "\n"


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def write_report(run: str, gpu_hourly_usd: float = DEFAULT_GPU_HOURLY_USD) -> Path:
    """Write `runs/<run>/report.md` (atomically) and return its path."""
    path = RunPaths.for_run(run).report
    atomic_write_bytes(path, build_report(run, gpu_hourly_usd).encode())
    log.info(f"report: {path}")
    return path


def register(sub: argparse._SubParsersAction) -> None:
    from .options import add_run_arg

    p = sub.add_parser("report", help="write the run's report card (report.md with loss curves and eval tables)")
    add_run_arg(p)
    p.add_argument("--gpu-hourly-usd", type=float, default=DEFAULT_GPU_HOURLY_USD,
                   help="price of one GPU-hour for the cost estimate")
    p.add_argument("--print", action="store_true", help="also print the report")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if args.gpu_hourly_usd < 0:
        raise ValueError("--gpu-hourly-usd must be >= 0")
    path = write_report(args.run, args.gpu_hourly_usd)
    if args.print:
        print(path.read_text())
    print(path)
    return 0
