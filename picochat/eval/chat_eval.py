"""Chat-model evaluation: accuracy on held-out task questions, shown beside a trivial baseline.

`evaluate_task` asks the model every question of a task's test split and checks each answer with the
task's own `evaluate`:
  - generative tasks: greedy completion through the inference engine (tool calls run, as in chat),
    then `task.evaluate(conversation, completion_text)`;
  - categorical tasks (multiple choice): the answer letter whose first token has the highest logit
    right after <|assistant_start|> (no generation, so a model that rambles is still scored).
`trivial_baseline` is the best a model could do by always giving one fixed answer, picked with
hindsight on the same questions (so it is an upper bound for any constant answer, which makes the
"model X% vs trivial Y%" comparison conservative). `picochat eval` (no subcommand) prints a table,
writes `results/tasks_<stage>.json` and a section of the run's report.md. The real benchmarks
(`picochat eval base` / `eval chat`) live in core.py and chat_suite.py; the command line in cli.py.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..common import atomic_write_bytes, log
from ..runs import RunPaths

if TYPE_CHECKING:  # imported where used: `picochat eval --help` should not wait for torch
    import torch

DEFAULT_TASKS = ("spelling", "letter_count", "arithmetic", "identity", "facts")


# ---------------------------------------------------------------------------------------------------
# tasks


def load_eval_task(name: str, size: int = 200, seed: int = 1, split: str = "test"):
    """A task by name: a synthetic one ("spelling", ...) or "mmlu:PATH" / "gsm8k:PATH" (test files)."""
    from ..data.tasks.synthetic import SYNTHETIC_TASKS

    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name](split=split, size=size, seed=seed)
    kind, _, source = name.partition(":")
    if kind == "mmlu" and source:
        from ..data.tasks.mmlu import MMLU

        return MMLU(source=source)
    if kind == "gsm8k" and source:
        from ..data.tasks.gsm8k import GSM8K

        return GSM8K(source=source)
    raise ValueError(f"unknown task {name!r}: pick from {', '.join(SYNTHETIC_TASKS)}, or mmlu:PATH, gsm8k:PATH")


# ---------------------------------------------------------------------------------------------------
# scoring


def generate_completions(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (tools on) of rendered prompts through the decode loop, as visible text."""
    from .chat_suite import generate_greedy

    return [text or "" for text in generate_greedy(model, tokenizer, prompts, max_tokens, batch_size)]


def _categorical(model, tokenizer, convs: list[dict]) -> list[bool]:
    from .chat_suite import ChatEvalConfig, score_choice

    return [item["correct"] for item in score_choice(model, tokenizer, convs, ChatEvalConfig())]


def evaluate_task(model, tokenizer, task, max_examples: int | None = None, device: torch.device | None = None,
                  batch_size: int = 16, max_tokens: int = 128) -> dict[str, Any]:
    """Accuracy of `model` on the first `max_examples` conversations of `task`.
    Returns {"task", "accuracy", "n", "correct", "trivial"} ("trivial": see `trivial_baseline`)."""
    import torch

    device = device or next(model.parameters()).device
    n = len(task) if max_examples is None else min(len(task), max_examples)
    convs = [task[i] for i in range(n)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            if task.eval_type == "categorical":
                correct = _categorical(model, tokenizer, convs)
            else:
                prompts = [tokenizer.render_for_completion({"messages": c["messages"][:-1]}) for c in convs]
                # never ask for more than the context holds: the engine refuses prompt + max_tokens > context
                room = model.config.seq_len - max((len(p) for p in prompts), default=0)
                if room < 1:
                    raise ValueError(f"{task.name}: a prompt fills the model's whole context of {model.config.seq_len}")
                outs = generate_completions(model, tokenizer, prompts, min(max_tokens, room), batch_size)
                correct = [bool(task.evaluate(c, text)) for c, text in zip(convs, outs)]
        finally:
            model.train(was_training)
    k = sum(correct)
    return {"task": task.name, "accuracy": k / max(1, n), "n": n, "correct": k,
            "trivial": trivial_baseline(task, n)}


def trivial_baseline(task, max_examples: int | None = None, candidates: int = 20) -> float:
    """Accuracy of always giving the same answer: the best of the `candidates` most common reference
    answers (or choice letters), scored with the task's own `evaluate` on the same questions."""
    n = len(task) if max_examples is None else min(len(task), max_examples)
    if n == 0:
        return 0.0
    convs = [task[i] for i in range(n)]
    refs = Counter(str(c.get("answer_letter") or c.get("answer") or "") for c in convs)
    best = 0.0
    for answer, _ in refs.most_common(candidates):
        hits = 0
        for c in convs:
            try:
                hits += bool(task.evaluate(c, answer))
            except (KeyError, ValueError, NotImplementedError):
                pass
        best = max(best, hits / n)
    return best


# ---------------------------------------------------------------------------------------------------
# report


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A Markdown table (reads well in a terminal too)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | n | accuracy | trivial baseline |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['accuracy']:.1f}% | {100 * r['trivial']:.1f}% |")
    if rows:
        mean = sum(r["accuracy"] for r in rows) / len(rows)
        triv = sum(r["trivial"] for r in rows) / len(rows)
        lines.append(f"| **mean** | | **{100 * mean:.1f}%** | {100 * triv:.1f}% |")
    return "\n".join(lines)


def write_report_section(run: str, heading: str, body: str) -> None:
    """Replace (or append) the `## heading` section of the run's report.md, atomically."""
    path = RunPaths.for_run(run).report
    text = path.read_text() if path.exists() else "# picochat report\n"
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == f"## {heading}"
        if not skipping:
            out.append(line)
    new = "\n".join(out).rstrip() + f"\n\n## {heading}\n\n{body.rstrip()}\n"
    atomic_write_bytes(path, new.encode())


def evaluate_run(run: str, stage: str | None, tasks: Sequence[str], max_examples: int, batch_size: int = 16,
                 max_tokens: int = 128, device: str = "auto", seed: int = 1, report: bool = True
                 ) -> list[dict[str, Any]]:
    """Load the run's model of `stage` and score it on `tasks`; optionally write report.md."""
    from ..common import detect_device
    from ..runs import load_model

    dev = detect_device(device)
    model, tokenizer, meta = load_model(run, stage, dev)
    rows = []
    for name in tasks:
        task = load_eval_task(name, size=max_examples, seed=seed)
        row = evaluate_task(model, tokenizer, task, max_examples, dev, batch_size, max_tokens)
        log.info(f"{meta['stage']} {row['task']}: {100 * row['accuracy']:.1f}% of {row['n']} "
                 f"(trivial {100 * row['trivial']:.1f}%)")
        rows.append(row)
    from ..runs import write_result

    write_result(run, f"tasks_{meta['stage']}", {"stage": meta["stage"], "step": meta.get("step"),
                                                 "checkpoint": meta["path"], "tasks": rows})
    if report:
        write_report_section(run, f"Chat evaluation ({meta['stage']})", format_table(rows) + "\n\n" +
                             f"Checkpoint `{meta['path']}`; greedy decoding; held-out test split; trivial = "
                             "best constant answer chosen with hindsight.")
    return rows


def add_legacy_args(p: argparse.ArgumentParser) -> None:
    """Options of `picochat eval` without a subcommand (the demo's held-out tasks and --bpb)."""
    p.add_argument("--stage", default=None, help="sft, mid or base (default: the latest of rl, sft, mid, base)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma list: synthetic task names, or mmlu:PATH / gsm8k:PATH")
    p.add_argument("--max-examples", type=int, default=100, help="questions per task")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer generated")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic test questions")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-report", action="store_true", help="do not write report.md")
    p.add_argument("--bpb", action="store_true",
                   help="also measure bits per byte on the text source's held-out split (base models too)")
    p.add_argument("--bpb-tokens", type=int, default=2**20, help="held-out tokens for --bpb")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.bpb:
        from ..data.cli import data_config_from_args
        from .bpb import evaluate_run_bpb

        r = evaluate_run_bpb(args.run, args.stage, data_config_from_args(args), args.bpb_tokens,
                             device=args.device)
        line = (f"{r['stage']} step {r['step']}: {r['val_bpb']:.4f} bits/byte on {r['max_tokens']:,} held-out "
                f"tokens of the {r['source']} source")
        print(line)
        from ..runs import write_result

        write_result(args.run, f"bpb_{r['stage']}", r)
        if not args.no_report:
            write_report_section(args.run, f"Validation bits per byte ({r['stage']})",
                                 f"{line}; checkpoint `{r['path']}`.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks:
        rows = evaluate_run(args.run, args.stage, tasks, args.max_examples, args.batch_size, args.max_tokens,
                            args.device, args.seed, report=not args.no_report)
        print(format_table(rows))
    return 0
