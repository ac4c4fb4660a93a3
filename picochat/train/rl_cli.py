"""`picochat rl` on the command line: its options are generated from `RLConfig` (and the nested
`OptimConfig`), so the help, the defaults and the validation are the config's own."""

from __future__ import annotations

import argparse

from ..config import RLConfig
from ..options import add_config_options, add_run_arg, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="reinforcement learning on math from the SFT model (stage 'rl')",
                       description="On-policy policy gradient on the synthetic arithmetic task or GSM8K, starting "
                                   "from the run's latest SFT checkpoint and writing stage 'rl'. Learning rates are "
                                   "the optimizer's below times --lr-frac. Runs alone or under `torchrun "
                                   "--nproc_per_node=N -m picochat rl --run-name R` (rollouts split across ranks).")
    add_run_arg(p)
    add_config_options(p, RLConfig)
    p.set_defaults(func=cmd_rl)


def rl_config_from_args(args: argparse.Namespace) -> RLConfig:
    return config_from_args(args, RLConfig, run=args.run)


def cmd_rl(args: argparse.Namespace) -> int:
    from ..common import cleanup_distributed
    from .rl import rl_train

    try:
        rl_train(rl_config_from_args(args))
    finally:
        cleanup_distributed()
    return 0
