"""`picochat eval`: the evaluation commands, and the result files they write for the report and server.

    picochat eval base --run R [--bundle URL_OR_PATH] [--max-per-task N]      CORE of the base model
    picochat eval chat --run R [--tasks arc-easy,...,humaneval] [--max-examples N]   ChatCORE
    picochat eval --run R [--tasks spelling,...] [--bpb]                      the demo's held-out tasks

Results go to `runs/<run>/results/` (`picochat.runs.write_result`): `core_<stage>.json`,
`chat_eval_<stage>.json`, `tasks_<stage>.json`, `bpb_<stage>.json`, each with the checkpoint it scored.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ..common import log
from ..config import check_fields, opt
from .core_bundle import BASELINE_SOURCES

DEFAULT_CHAT_TASKS = "arc-easy,arc-challenge,mmlu,gsm8k,humaneval"


def _checkpoint_fields(meta: dict) -> dict:
    return {"stage": meta["stage"], "step": meta.get("step"), "checkpoint": meta["path"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _load(run: str, stage: str | None, device: str, compile_model: bool = False):
    import torch

    from ..common import detect_device
    from ..runs import load_model

    dev = detect_device(device)
    model, tokenizer, meta = load_model(run, stage, dev)
    if compile_model and dev.type == "cuda":
        model = torch.compile(model, dynamic=False)  # few fixed shapes: see loglik.LENGTH_BUCKETS
    return model, tokenizer, meta, dev


@dataclass(frozen=True)
class CoreEvalConfig:
    bundle: str | None = opt(None, "eval bundle: URL (.zip), local .zip or folder (default: nanochat's eval_bundle.zip)")
    max_per_task: int | None = opt(None, "items per task (default: all)", lo=1)
    baselines: str = opt("corrected", "random baselines: DCLM's corrected values or the bundle's own csv",
                         choices=BASELINE_SOURCES)
    mode: str = opt("batched", "eager: one item per forward, the baseline the benchmark compares with",
                    choices=("batched", "eager"))

    def __post_init__(self) -> None:
        check_fields(self)


def run_core(run: str, stage: str = "base", cfg: CoreEvalConfig | None = None, device: str = "auto",
             compile_model: bool = True, progress: bool = True, write: bool = True) -> dict:
    """CORE of a run's checkpoint; writes `results/core_<stage>.json`."""
    from ..runs import write_result
    from .core import evaluate_core
    from .core_bundle import DEFAULT_BUNDLE_URL, load_tasks, open_bundle

    cfg = cfg or CoreEvalConfig()
    root = open_bundle(cfg.bundle)
    tasks = load_tasks(root, cfg.baselines)
    model, tokenizer, meta, dev = _load(run, stage, device, compile_model and cfg.mode == "batched")
    result = evaluate_core(model, tokenizer, tasks, cfg.max_per_task, cfg.mode, progress)
    result.update(_checkpoint_fields(meta), bundle=str(cfg.bundle or DEFAULT_BUNDLE_URL), baselines=cfg.baselines,
                  device=str(dev))
    if write:
        write_result(run, f"core_{meta['stage']}", result)
    return result


def format_core_table(result: dict) -> str:
    lines = ["| task | type | shots | n | accuracy | baseline | centered |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["tasks"]:
        lines.append(f"| {r['task']} | {r['type']} | {r['shots']} | {r['n']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['baseline']:.1f}% | {r['centered']:.4f} |")
    lines.append(f"| **CORE** | | | | | | **{result['core']:.4f}** |")
    return "\n".join(lines)


def run_chat(run: str, tasks: list[str], stage: str | None = None, cfg=None, sources: dict | None = None,
             device: str = "auto", progress: bool = True, write: bool = True) -> dict:
    """The chat benchmarks of a run's checkpoint; writes `results/chat_eval_<stage>.json`."""
    from ..runs import write_result
    from .chat_suite import ChatEvalConfig, evaluate_chat

    model, tokenizer, meta, dev = _load(run, stage, device)
    result = evaluate_chat(model, tokenizer, tasks, cfg or ChatEvalConfig(), sources, progress)
    result.update(_checkpoint_fields(meta), device=str(dev))
    if write:
        write_result(run, f"chat_eval_{meta['stage']}", result)
    return result


# ---------------------------------------------------------------------------------------------------
# the command line


def _keep_parent_values(sub_parser: argparse.ArgumentParser) -> None:
    """`picochat eval --run R base` and `picochat eval base --run R` both work: the subcommand sets
    --run/--debug only when given after it, instead of overwriting the value given before it."""
    for action in sub_parser._actions:
        if action.dest in ("run", "debug"):
            action.default = argparse.SUPPRESS


def register(sub: argparse._SubParsersAction) -> None:
    from ..options import add_config_options, add_run_arg
    from .chat_suite import ChatEvalConfig
    from ..data.cli import add_source_args
    from .chat_eval import add_legacy_args, cmd_eval

    p = sub.add_parser("eval", help="evaluate a model: `eval base` (CORE), `eval chat` (ARC, MMLU, GSM8K, HumanEval), "
                                    "or the demo's held-out tasks",
                       description="Without a subcommand: the held-out synthetic tasks (and --bpb). "
                                   "`picochat eval base --help` and `picochat eval chat --help` for the benchmarks.")
    add_run_arg(p)
    add_legacy_args(p)
    add_source_args(p)
    p.set_defaults(func=cmd_eval)
    esub = p.add_subparsers(dest="eval_command", metavar="{base,chat}")

    b = esub.add_parser("base", help="CORE: the DCLM in-context tasks, centered accuracy")
    add_run_arg(b)
    b.add_argument("--stage", default="base", help="checkpoint stage to score (default: base)")
    add_config_options(b, CoreEvalConfig)
    b.add_argument("--device", default="auto")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_eval_base)
    _keep_parent_values(b)

    c = esub.add_parser("chat", help="ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and ChatCORE")
    add_run_arg(c)
    c.add_argument("--stage", default=None, help="checkpoint stage (default: the latest of rl, sft, mid, base)")
    c.add_argument("--tasks", default=DEFAULT_CHAT_TASKS, help="comma list: benchmarks and/or synthetic task names")
    add_config_options(c, ChatEvalConfig)
    c.add_argument("--data", action="append", default=[], metavar="TASK=PATH_OR_URL",
                   help="data for a task (parquet/jsonl file, folder or URL); default: the public parquet URL")
    c.add_argument("--device", default="auto")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_eval_chat)
    _keep_parent_values(c)


def cmd_eval_base(args: argparse.Namespace) -> int:
    from ..options import config_from_args

    result = run_core(args.run, args.stage, config_from_args(args, CoreEvalConfig), args.device,
                      progress=not args.no_progress)
    print(format_core_table(result))
    print(f"CORE {result['core']:.4f} ({result['baselines']} baselines) in {result['seconds']:.1f}s")
    return 0


def _sources(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--data wants TASK=PATH_OR_URL, got {pair!r}")
        out[name.strip()] = value.strip()
    return out


def cmd_eval_chat(args: argparse.Namespace) -> int:
    from ..options import config_from_args
    from .chat_suite import ChatEvalConfig, format_chat_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    cfg = config_from_args(args, ChatEvalConfig)
    result = run_chat(args.run, tasks, args.stage, cfg, _sources(args.data), args.device,
                      progress=not args.no_progress)
    print(format_chat_table(result))
    if "sandbox" in result:
        log.info(f"HumanEval sandbox: {result['sandbox']['mode']} ({result['sandbox']['contains']})")
    return 0
