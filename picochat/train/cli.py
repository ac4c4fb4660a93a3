"""`picochat pretrain`: base-model training on a text source (one process or under torchrun)."""

from __future__ import annotations

import argparse

import torch

from ..options import add_run_arg
from ..common import DistInfo
from ..config import DataConfig, ModelConfig, OptimConfig, TrainConfig

SAMPLE_PROMPTS = ("Once upon a time", "The capital of France is", "3 plus 4 is")


def add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Options every training stage shares."""
    add_run_arg(p)
    p.add_argument("--depth", type=int, default=defaults.depth, help="the model size dial (width = 64·depth)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--device-batch-size", default=defaults.device_batch_size,
                   help="rows per forward pass per GPU, or 'auto' to find the largest that fits (CUDA)")
    p.add_argument("--total-batch-tokens", type=int, default=defaults.total_batch_tokens,
                   help="tokens per optimizer step over all ranks (sets gradient accumulation)")
    p.add_argument("--num-steps", type=int, default=defaults.num_steps,
                   help="optimizer steps; -1 derives them from the data:param ratio")
    p.add_argument("--data-param-ratio", type=float, default=defaults.data_param_ratio)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="validate every N steps (0: off)")
    p.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    p.add_argument("--sample-every", type=int, default=defaults.sample_every)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--keep-last", type=int, default=defaults.keep_last,
                   help="checkpoints kept per stage (0: all); older ones are pruned once a new one verifies")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint")
    o = defaults.optim
    p.add_argument("--matrix-lr", type=float, default=o.matrix_lr)
    p.add_argument("--embedding-lr", type=float, default=o.embedding_lr)
    p.add_argument("--unembedding-lr", type=float, default=o.unembedding_lr)
    p.add_argument("--warmup-frac", type=float, default=o.warmup_frac)
    p.add_argument("--warmdown-frac", type=float, default=o.warmdown_frac)
    p.add_argument("--grad-clip", type=float, default=o.grad_clip)


def train_config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    dbs = args.device_batch_size
    dbs = dbs if dbs == "auto" else int(dbs)
    optim = OptimConfig(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                        unembedding_lr=args.unembedding_lr, warmup_frac=args.warmup_frac,
                        warmdown_frac=args.warmdown_frac, grad_clip=args.grad_clip)
    return TrainConfig(run=args.run, stage=stage, depth=args.depth, seq_len=args.seq_len, device_batch_size=dbs,
                       total_batch_tokens=args.total_batch_tokens, num_steps=args.num_steps,
                       data_param_ratio=args.data_param_ratio, seed=args.seed, eval_every=args.eval_every,
                       eval_tokens=args.eval_tokens, sample_every=args.sample_every, save_every=args.save_every,
                       keep_last=args.keep_last, compile=args.compile, device=args.device, resume=args.resume,
                       optim=optim)


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.cli import add_source_args

    p = sub.add_parser("pretrain", help="train the base model on a text source",
                       description="Pretrain a GPT of the given depth. Run it alone, or under "
                                   "`torchrun --nproc_per_node=N -m picochat pretrain ...` for data parallelism.")
    add_train_args(p, TrainConfig())
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

    try:
        pretrain(train_config_from_args(args, "base"), data_config_from_args(args))
    finally:
        cleanup_distributed()
    return 0
