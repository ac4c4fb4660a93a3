"""`picochat rl` on the command line: one option per `RLConfig` field (plus the shared LR options)."""

from __future__ import annotations

import argparse
import dataclasses

from ..options import add_run_arg
from ..config import OptimConfig, RLConfig

HELP = {
    "task": "arithmetic (offline synthetic, calculator tool) or gsm8k",
    "gsm8k": "GSM8K training set: parquet/jsonl file, folder or URL (default: the hub's parquet)",
    "gsm8k_test": "GSM8K test set for the held-out evaluation (default: the hub's parquet)",
    "train_size": "synthetic arithmetic prompts per epoch",
    "num_steps": "optimizer steps (-1: one pass over the training prompts)",
    "prompts_per_step": "prompts per step over all ranks (divisible by the number of ranks)",
    "samples_per_prompt": "completions sampled per prompt (the group its advantage is relative to)",
    "max_new_tokens": "tokens each completion may add (tool outputs included)",
    "temperature": "sampling temperature of the rollouts",
    "top_k": "sample from the k most likely tokens only (default: all)",
    "std_normalize": "divide each group's advantages by the std of its rewards",
    "kl_coef": "weight of a KL penalty to the frozen SFT model (0: none)",
    "device_batch_size": "rows per forward/backward pass of the update",
    "lr_frac": "every optimizer learning rate times this; decays linearly to 0",
    "eval_every": "steps between held-out evaluations (0: only before and after)",
    "eval_prompts": "held-out prompts per evaluation (0: no evaluation)",
    "eval_samples": "samples per held-out prompt: the k of pass@k",
    "eval_temperature": "sampling temperature of the evaluation (0: greedy)",
    "save_every": "checkpoint every N steps (0: only at the end; -1: never)",
    "seed": "seed of the prompt order and of every sample",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "resume": "continue from the latest good rl checkpoint",
    "eager_rollouts": "baseline: the eager decode step, one prompt's samples at a time (as upstream nanochat)",
}


def add_rl_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(RLConfig):
        if f.name in ("run", "optim"):
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        elif f.name == "top_k":
            p.add_argument(flag, type=int, default=None, help=HELP[f.name])
        elif default is None:
            p.add_argument(flag, default=None, metavar="PATH_OR_URL", help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{HELP[f.name]} (default: {default})")
    o = OptimConfig()
    p.add_argument("--matrix-lr", type=float, default=o.matrix_lr, help="Muon LR before --lr-frac")
    p.add_argument("--embedding-lr", type=float, default=o.embedding_lr, help="AdamW embedding LR before --lr-frac")
    p.add_argument("--unembedding-lr", type=float, default=o.unembedding_lr, help="AdamW head LR before --lr-frac")
    p.add_argument("--grad-clip", type=float, default=o.grad_clip, help="clip the gradient norm (0: off)")


def rl_config_from_args(args: argparse.Namespace) -> RLConfig:
    names = [f.name for f in dataclasses.fields(RLConfig) if f.name not in ("run", "optim")]
    optim = OptimConfig(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                        grad_clip=args.grad_clip)
    return RLConfig(run=args.run, optim=optim, **{n: getattr(args, n) for n in names})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="reinforcement learning on math from the SFT model (stage 'rl')",
                       description="On-policy policy gradient on the synthetic arithmetic task or GSM8K, starting "
                                   "from the run's latest SFT checkpoint and writing stage 'rl'. Runs alone or under "
                                   "`torchrun --nproc_per_node=N -m picochat rl --run-name R` (rollouts split "
                                   "across ranks).")
    add_run_arg(p)
    add_rl_args(p)
    p.set_defaults(func=cmd_rl)


def cmd_rl(args: argparse.Namespace) -> int:
    from ..common import cleanup_distributed
    from .rl import rl_train

    try:
        rl_train(rl_config_from_args(args))
    finally:
        cleanup_distributed()
    return 0
