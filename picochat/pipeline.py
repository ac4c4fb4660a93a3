"""`picochat run`: every stage in order for one run — tokenizer, pretraining, midtraining, SFT, (RL,) eval.

Each stage resumes from its latest checkpoint (a finished stage finishes at once), so re-running the
same command after an interruption continues where it stopped. Works alone or under torchrun (the
tokenizer and the evaluation run on rank 0 only). `picochat demo` is this pipeline at toy sizes.
"""

from __future__ import annotations

import argparse
from dataclasses import replace


def register(sub: argparse._SubParsersAction) -> None:
    from .config import ChatDataConfig, TokenizerConfig
    from .data.cli import add_source_args
    from .options import add_config_options
    from .recipes import CHAT_FINETUNE, RECIPES
    from .train.cli import add_train_args

    p = sub.add_parser("run", help="the whole pipeline for one run: tokenizer → pretrain → midtrain → sft → eval",
                       description="Runs every stage of a run in order; each resumes from its checkpoints, so the "
                                   "same command continues after an interruption. Training options apply to "
                                   "pretraining and, where the stage recipe does not set them, to the chat stages; "
                                   "--mid and --sft set any midtrain/sft option for that stage alone. Under "
                                   "torchrun write --run-name.")
    add_train_args(p, RECIPES["base"].train)
    add_source_args(p)
    add_config_options(p, TokenizerConfig, title="tokenizer (trained when the run has none)")
    add_config_options(p, ChatDataConfig, title="chat data (midtraining and SFT)")
    g = p.add_argument_group("chat stages")
    g.add_argument("--mid-steps", type=int, default=-1, help="midtraining steps (-1: one pass over the mixture)")
    g.add_argument("--sft-steps", type=int, default=-1, help="SFT steps (-1: one pass over the mixture)")
    for stage in CHAT_FINETUNE:
        g.add_argument(f"--{stage}", nargs="+", default=[], metavar="KEY=VALUE",
                       help=f"any `picochat {RECIPES[stage].command}` option for {stage} alone, e.g. "
                            f"--{stage} matrix-lr=0.01 total-batch-tokens=65536 init-lr-frac=0.5")
    g.add_argument("--rl-steps", type=int, default=0,
                   help="steps of RL on the synthetic arithmetic task after SFT (0: no RL stage; -1: one pass)")
    g.add_argument("--eval-examples", type=int, default=100, help="held-out questions per task (0: no eval)")
    p.set_defaults(func=cmd_run)


def stage_configs(args: argparse.Namespace) -> dict:
    """Every stage's config from the command line, validated before anything runs."""
    from .config import ChatDataConfig, ConfigError, RLConfig, TokenizerConfig, check_number
    from .data.cli import data_config_from_args
    from .options import apply_settings, config_from_args
    from .recipes import CHAT_FINETUNE, follow_on, scale_lr
    from .train.cli import train_config_from_args

    base = replace(train_config_from_args(args, "base"), resume=True)
    out = {"data": data_config_from_args(args), "tokenizer": config_from_args(args, TokenizerConfig),
           "chat_data": config_from_args(args, ChatDataConfig), "base": base}
    check_number("eval_examples", args.eval_examples, lo=0, hi=10**7)
    check_number("rl_steps", args.rl_steps, lo=-1, hi=10**9)
    out["rl"] = RLConfig(run=args.run, num_steps=args.rl_steps, device=base.device, seed=base.seed,
                         resume=True) if args.rl_steps else None
    for stage in CHAT_FINETUNE:
        steps = getattr(args, f"{stage}_steps")
        cfg, lr_frac = follow_on(stage, base)
        try:
            cfg = replace(cfg, num_steps=steps)
        except ConfigError as e:
            raise ConfigError(e.field, e.rule, e.value, flag=f"--{stage}-steps") from None
        cfg, extra = apply_settings(cfg, getattr(args, stage), flag_prefix=f"--{stage} ", extra=("init-lr-frac",))
        if "init-lr-frac" in extra:
            try:
                lr_frac = float(extra["init-lr-frac"])
            except ValueError:
                lr_frac = float("nan")
            check_number("init_lr_frac", lr_frac, above=0, hi=100, is_int=False, flag=f"--{stage} init-lr-frac")
        out[stage] = scale_lr(cfg, lr_frac)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from .common import cleanup_distributed, detect_device, dist_info, init_distributed, log
    from .runs import RunPaths
    from .tokenizer_cli import train_tokenizer
    from .train.cli import pretrain
    from .recipes import CHAT_FINETUNE
    from .train.sft import chat_train

    configs = stage_configs(args)
    paths = RunPaths.for_run(args.run)
    init_distributed(detect_device(args.device))
    try:
        if not (paths.tokenizer / "tokenizer.json").exists():
            if dist_info().is_main:
                train_tokenizer(args.run, configs["data"], configs["tokenizer"])
            _barrier()
        else:
            log.info(f"tokenizer: using {paths.tokenizer}")
        pretrain(configs["base"], configs["data"])
        for stage in CHAT_FINETUNE:
            chat_train(configs[stage], configs["chat_data"])
        if configs["rl"] is not None:
            from .train.rl import rl_train

            rl_train(configs["rl"])
        if args.eval_examples > 0 and dist_info().is_main:
            from .eval.chat_eval import DEFAULT_TASKS, evaluate_run, format_table

            last = "rl" if args.rl_steps else "sft"
            print(format_table(evaluate_run(args.run, last, DEFAULT_TASKS, args.eval_examples, device=args.device)))
        if dist_info().is_main:
            from .report import write_report

            write_report(args.run)
        _barrier()
    finally:
        cleanup_distributed()
    log.info(f"run {args.run!r} complete: talk to it with `picochat chat --run {args.run}`; report: {paths.report}")
    return 0


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
