"""`picochat pretrain`: base-model training on a text source (one process or under torchrun)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..common import DistInfo
from ..config import DataConfig, ModelConfig, TrainConfig
from ..options import add_config_options, add_run_arg, config_from_args
from ..recipes import RECIPES

if TYPE_CHECKING:  # imported where used, so that the CLI starts without torch
    import torch

SAMPLE_PROMPTS = ("Once upon a time", "The capital of France is", "3 plus 4 is")


def add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Options every training stage shares: one per TrainConfig field (its optimizer's included)."""
    add_run_arg(p)
    add_config_options(p, TrainConfig, defaults)


def train_config_from_args(args: argparse.Namespace, stage: str, defaults: TrainConfig | None = None) -> TrainConfig:
    """The validated TrainConfig of a command line; a --device this machine lacks is refused here,
    before anything loads."""
    from ..common import detect_device

    cfg = config_from_args(args, TrainConfig, defaults, run=args.run, stage=stage)
    detect_device(cfg.device)
    return cfg


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.cli import add_source_args

    recipe = RECIPES["base"]
    p = sub.add_parser(recipe.command, help=recipe.summary,
                       description="Pretrain a GPT of the given depth. Run it alone, or under "
                                   "`torchrun --nproc_per_node=N -m picochat pretrain ...` for data parallelism.")
    add_train_args(p, recipe.train)
    add_source_args(p)
    p.set_defaults(func=cmd_pretrain)


class PretrainBatches:
    """Adapts the pretraining loader to the loop's micro-batch dicts."""

    def __init__(self, loader):
        self.loader = loader

    def __next__(self) -> dict:
        x, y = next(self.loader)
        return {"inputs": x, "targets": y}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def continue_after(self, states: list[dict]) -> None:
        self.loader.continue_after(states)

    def close(self) -> None:
        self.loader.close()


def pretrain(cfg: TrainConfig, data: DataConfig, on_step=None) -> dict:
    from ..data.loader import PretrainLoader
    from ..data.sources import open_source
    from ..runs import load_tokenizer
    from ..eval.bpb import bpb_batches
    from .loop import Trainer

    tokenizer = load_tokenizer(cfg.run)
    model_cfg = ModelConfig.from_depth(cfg.depth, vocab_size=tokenizer.vocab_size, seq_len=cfg.seq_len)
    source = open_source(data)

    def make_batches(B: int, dist: DistInfo, device: torch.device):
        return PretrainBatches(PretrainLoader(source, tokenizer, B, cfg.seq_len, "train", dist.rank,
                                              dist.world_size, device))

    def make_val(T: int, dist: DistInfo, device: torch.device):
        return bpb_batches(source, tokenizer, T, cfg.eval_tokens, device, dist.rank, dist.world_size)

    trainer = Trainer(cfg, model_cfg, tokenizer, make_batches, make_val, sample_prompts=SAMPLE_PROMPTS,
                      on_step=on_step)
    return trainer.train()


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..common import cleanup_distributed
    from ..data.cli import data_config_from_args

    cfg, data = train_config_from_args(args, "base"), data_config_from_args(args)
    try:
        pretrain(cfg, data)
    finally:
        cleanup_distributed()
    return 0
