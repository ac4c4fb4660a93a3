"""`picochat run`: every stage in order for one run — tokenizer, pretraining, midtraining, SFT, (RL,) eval.

Each stage resumes from its latest checkpoint (a finished stage finishes at once), so re-running the
same command after an interruption continues where it stopped. Works alone or under torchrun (the
tokenizer and the evaluation run on rank 0 only). `picochat demo` is this pipeline at toy sizes.
"""

from __future__ import annotations

import argparse
from dataclasses import replace


def register(sub: argparse._SubParsersAction) -> None:
    from .config import TokenizerConfig, TrainConfig
    from .data.cli import add_source_args
    from .train.cli import add_train_args

    p = sub.add_parser("run", help="the whole pipeline for one run: tokenizer → pretrain → midtrain → sft → eval",
                       description="Runs every stage of a run in order; each resumes from its checkpoints, so the "
                                   "same command continues after an interruption. Under torchrun write --run-name.")
    add_train_args(p, TrainConfig())
    add_source_args(p)
    p.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    p.add_argument("--mid-steps", type=int, default=-1, help="midtraining steps (-1: one pass over the mixture)")
    p.add_argument("--sft-steps", type=int, default=-1, help="SFT steps (-1: one pass over the mixture)")
    p.add_argument("--rl-steps", type=int, default=0,
                   help="steps of RL on the synthetic arithmetic task after SFT (0: no RL stage; -1: one pass)")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out questions per task (0: no eval)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from .runs import RunPaths
    from .common import cleanup_distributed, detect_device, dist_info, init_distributed, log
    from .config import TokenizerConfig
    from .data.cli import data_config_from_args
    from .tokenizer_cli import train_tokenizer
    from .config import ChatDataConfig
    from .recipes import follow_on, scale_lr
    from .train.cli import pretrain, train_config_from_args
    from .train.sft import chat_train

    paths = RunPaths.for_run(args.run)
    data = data_config_from_args(args)
    init_distributed(detect_device(args.device))
    try:
        if not (paths.tokenizer / "tokenizer.json").exists():
            if dist_info().is_main:
                train_tokenizer(args.run, data, TokenizerConfig(vocab_size=args.vocab_size))
            _barrier()
        else:
            log.info(f"tokenizer: using {paths.tokenizer}")
        base = replace(train_config_from_args(args, "base"), resume=True)
        pretrain(base, data)
        for stage, steps in (("mid", args.mid_steps), ("sft", args.sft_steps)):
            cfg, lr_frac = follow_on(stage, base)
            chat_train(scale_lr(replace(cfg, num_steps=steps), lr_frac), ChatDataConfig())
        if args.rl_steps:
            from .config import RLConfig
            from .train.rl import rl_train

            rl_train(RLConfig(run=args.run, num_steps=args.rl_steps, device=args.device, seed=args.seed, resume=True))
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
