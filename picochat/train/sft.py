"""`picochat midtrain` and `picochat sft`: chat fine-tuning through the one training loop.

Both stages differ from pretraining only in where batches come from and where weights start:
  midtrain  starts from the latest base checkpoint and writes stage "mid";
  sft       starts from the latest mid checkpoint (else base, with a note) and writes stage "sft".
Batches are fixed-shape (B, T) rows from `SFTBatcher`: in "packed" mode whole conversations are
best-fit packed into each row and attention is document-masked (the Trainer builds the mask outside
the compiled model), so a compiled model never sees a new shape and rows are mostly real tokens.
"padded" mode (one conversation per row, the seed's method) exists as a benchmark baseline; its
padding is at the row tail, so plain causal attention is already exact and no mask is passed.

Data: by default the offline synthetic mixture; `--smoltalk`, `--mmlu`, `--gsm8k` add real tasks
(a local file/folder or URL each) with their own weights. The mixture streams endlessly and the step
count is fixed up front from its size (`--epochs`), identically on every rank: a rank can never run
out of data while another still waits in a collective, so multi-GPU runs cannot hang on uneven data.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common import DistInfo, log
from ..config import ChatDataConfig, ModelConfig, TrainConfig, check_number
from ..options import add_config_options, config_from_args
from ..recipes import CHAT_FINETUNE, RECIPES, recipe_for_command, scale_lr
from ..runs import STAGES, RunPaths
from .cli import add_train_args, train_config_from_args

if TYPE_CHECKING:  # imported where used, so that the CLI starts without torch
    import torch

# ChatDataConfig (in config) and scale_lr (in recipes) are imported here too for callers of this module

# ---------------------------------------------------------------------------------------------------
# data


def build_tasks(data: ChatDataConfig) -> tuple[list, list[float]]:
    """The training tasks and their mixture weights."""
    from ..data.chat import synthetic_tasks

    tasks, weights = [], []
    if data.synthetic_weight > 0:
        for task in synthetic_tasks("train", data.seed, data.synthetic_size):
            tasks.append(task)
            weights.append(data.synthetic_weight)
    if data.smoltalk:
        from ..data.tasks.smoltalk import SmolTalk

        tasks.append(SmolTalk(source=data.smoltalk))
        weights.append(data.smoltalk_weight)
    if data.mmlu:
        from ..data.tasks.mmlu import MMLU

        tasks.append(MMLU(source=data.mmlu))
        weights.append(data.mmlu_weight)
    if data.gsm8k:
        from ..data.tasks.gsm8k import GSM8K

        tasks.append(GSM8K(source=data.gsm8k))
        weights.append(data.gsm8k_weight)
    if not tasks:
        raise ValueError("no SFT data: the synthetic weight is 0 and no --smoltalk/--mmlu/--gsm8k was given")
    return tasks, weights


class PrerenderedTokenizer:
    """Stands in for the tokenizer when conversations are already (ids, mask): lets the real
    `SFTBatcher` pack synthetic or pre-rendered documents (step planning, the benchmark)."""

    def __init__(self, bos_id: int = 0):
        self.bos_id = bos_id

    @staticmethod
    def render_conversation(conv: dict) -> tuple[Any, Any]:
        return conv["ids"], conv["mask"]


class PrerenderedTask:
    """A task whose items are already token ids and loss masks (see `PrerenderedTokenizer`)."""

    name = "prerendered"

    def __init__(self, docs: list[tuple[Any, Any]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        ids, mask = self.docs[i]
        return {"ids": ids, "mask": mask}


def rows_per_conversation(tasks: list, weights: list[float], tokenizer, seq_len: int, mode: str, seed: int,
                          buffer_size: int | None, sample: int = 1024) -> tuple[float, int]:
    """Rows of T+1 tokens one conversation fills on average, by packing a deterministic sample of the
    mixture with the real batcher; and the mixture's size per epoch. Same answer on every rank."""
    from ..data.chat import SFTBatcher, TaskMixture

    mixture = TaskMixture(tasks, weights, seed=seed, epochs=1)  # the global view (rank 0 of 1)
    order = mixture.epoch_order(0)[:sample]
    cap = seq_len + 1
    docs = []
    for t, i in order:
        ids, mask = tokenizer.render_conversation(tasks[int(t)][int(i)])
        docs.append((ids[:cap], mask[:cap]))  # truncation is counted by the real batcher, not here
    sim = SFTBatcher(TaskMixture([PrerenderedTask(docs)], epochs=1), PrerenderedTokenizer(tokenizer.bos_id), 1,
                     seq_len, mode=mode, buffer_size=buffer_size)
    rows = sum(1 for _ in sim)  # the drained tail rows make this a slight overestimate: >= 1 epoch
    return rows / max(1, len(docs)), mixture.epoch_size


def plan_steps(cfg: TrainConfig, data: ChatDataConfig, tasks: list, weights: list[float], tokenizer) -> int:
    """Optimizer steps for `data.epochs` passes over the mixture (fixed before training starts)."""
    per_conv, epoch_size = rows_per_conversation(tasks, weights, tokenizer, cfg.seq_len, data.mode, data.seed,
                                                 data.buffer_size)
    rows_per_step = cfg.total_batch_tokens // cfg.seq_len
    steps = max(1, math.ceil(data.epochs * epoch_size * per_conv / rows_per_step))
    log.info(f"{cfg.stage}: {epoch_size} conversations per epoch, {1 / per_conv:.2f} per row ({data.mode}), "
             f"{rows_per_step} rows per step -> {steps} steps for {data.epochs:g} epoch(s)")
    return steps


class ChatBatches:
    """The loop's BatchSource over an endless `SFTBatcher` (padded mode drops doc_ids: see module doc)."""

    def __init__(self, batcher, document_mask: bool):
        self.batcher, self.document_mask = batcher, document_mask

    def __next__(self) -> dict:
        batch = self.batcher.next_batch()
        if batch is None:  # cannot happen with an endless mixture; fail loudly rather than hang peers
            raise RuntimeError("SFT data ran out mid-step")
        if not self.document_mask:
            batch.pop("doc_ids")
        return batch

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)


def make_chat_batches(tasks: list, weights: list[float], tokenizer, data: ChatDataConfig, seq_len: int):
    """The factory the Trainer calls with (device batch size, dist info, device)."""
    from ..data.chat import SFTBatcher, TaskMixture

    def make(B: int, dist: DistInfo, device: torch.device) -> ChatBatches:
        mixture = TaskMixture(tasks, weights, seed=data.seed, epochs=None, rank=dist.rank,
                              world_size=dist.world_size)
        batcher = SFTBatcher(mixture, tokenizer, B, seq_len, mode=data.mode, device=device,
                             buffer_size=data.buffer_size)
        make.batchers.append(batcher)
        return ChatBatches(batcher, document_mask=data.mode == "packed")

    make.batchers = []  # kept so the caller can report padding and truncation afterwards
    return make


def make_val_batches(tokenizer, data: ChatDataConfig, eval_tokens: int):
    """Validation on held-out synthetic conversations, one per row (padding at the tail keeps plain
    causal attention exact, and evaluate_bpb passes no mask)."""
    from ..data.chat import SFTBatcher, synthetic_mixture

    def make(T: int, dist: DistInfo, device: torch.device):
        B = 8 if device.type == "cuda" else 4
        n = max(1, eval_tokens // (B * T * dist.world_size))
        mixture = synthetic_mixture("test", seed=data.seed, size=data.val_size, epochs=1, rank=dist.rank,
                                    world_size=dist.world_size)
        batcher = SFTBatcher(mixture, tokenizer, B, T, mode="padded", device=device)
        for i, batch in enumerate(batcher):
            if i >= n:
                break
            yield batch

    return make


# ---------------------------------------------------------------------------------------------------
# the stage


def starting_checkpoint(run: str, stage: str, prefer: tuple[str, ...]) -> Path:
    from ..runs import latest_checkpoint

    paths = RunPaths.for_run(run)
    for i, s in enumerate(prefer):
        found = latest_checkpoint(paths.stage(s))
        if found is not None:
            if i > 0:
                log.info(f"{stage}: no {prefer[0]} checkpoint in run {run!r}; starting from {s} ({found})")
            return found
    raise FileNotFoundError(f"{stage} needs a {' or '.join(prefer)} checkpoint in run {run!r} "
                            f"(under {paths.root}); run `picochat pretrain --run {run}` first")


def chat_train(cfg: TrainConfig, data: ChatDataConfig, start_from: tuple[str, ...] | None = None,
               on_step=None) -> dict:
    """Midtrain or SFT (by `cfg.stage`: "mid" or "sft") from the run's previous stage."""
    from ..runs import load_tokenizer
    from ..runs import read_meta
    from .loop import Trainer

    if data.mode not in ("packed", "padded"):
        raise ValueError(f"--mode must be packed or padded, got {data.mode!r}")
    if start_from is None:
        start_from = STAGES[cfg.stage].starts_from
    start = starting_checkpoint(cfg.run, cfg.stage, start_from)
    tokenizer = load_tokenizer(cfg.run)
    meta = read_meta(start)
    # the architecture is the checkpoint's; only the training length may change (rotary tables are
    # recomputed buffers, not weights, so any seq_len loads)
    model_cfg = replace(ModelConfig.from_dict(meta["model"]), seq_len=cfg.seq_len)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{start} has vocab {model_cfg.vocab_size}, the run's tokenizer {tokenizer.vocab_size}")
    if cfg.depth and cfg.depth != model_cfg.n_layer:
        raise ValueError(f"--depth {cfg.depth} differs from the starting checkpoint's depth {model_cfg.n_layer} "
                         "(leave --depth out: it comes from the checkpoint)")
    cfg = replace(cfg, depth=model_cfg.n_layer)
    tasks, weights = build_tasks(data)
    if cfg.num_steps < 0:
        cfg = replace(cfg, num_steps=plan_steps(cfg, data, tasks, weights, tokenizer))
    make = make_chat_batches(tasks, weights, tokenizer, data, cfg.seq_len)
    val = make_val_batches(tokenizer, data, cfg.eval_tokens) if cfg.eval_every > 0 else None
    trainer = Trainer(cfg, model_cfg, tokenizer, make, val, init_from=start, on_step=on_step)
    result = trainer.train()
    if make.batchers:
        s = make.batchers[-1].stats
        result.update(padding_frac=s["padding_frac"], loss_frac=s["loss_frac"], truncated=s["truncated"],
                      conversations=s["conversations"], mode=data.mode, init_from=str(start))
        log.info(f"{cfg.stage}: {s['conversations']} conversations, padding {100 * s['padding_frac']:.1f}% of "
                 f"positions, loss on {100 * s['loss_frac']:.1f}%, {s['truncated']} truncated")
    return result


# ---------------------------------------------------------------------------------------------------
# command line


def add_chat_data_args(p: argparse.ArgumentParser) -> None:
    add_config_options(p, ChatDataConfig, title="chat data")


def register(sub: argparse._SubParsersAction) -> None:
    for stage in CHAT_FINETUNE:
        recipe = RECIPES[stage]
        prefer = STAGES[stage].starts_from
        p = sub.add_parser(recipe.command, help=recipe.summary,
                           description=f"{recipe.summary}. Starts from the latest {' or '.join(prefer)} "
                                       "checkpoint of the run; depth and vocabulary come from it. Runs alone or "
                                       f"under `torchrun --nproc_per_node=N -m picochat {recipe.command} ...`.")
        add_train_args(p, recipe.train)
        add_chat_data_args(p)
        p.add_argument("--init-lr-frac", type=float, default=recipe.lr_frac,
                       help=f"scale every learning rate by this (default: {recipe.lr_frac:g})")
        p.set_defaults(func=cmd_chat_train, command_name=recipe.command)


def chat_data_config_from_args(args: argparse.Namespace) -> ChatDataConfig:
    return config_from_args(args, ChatDataConfig)


def cmd_chat_train(args: argparse.Namespace) -> int:
    from ..common import cleanup_distributed

    stage = recipe_for_command(args.command_name).stage
    check_number("init_lr_frac", args.init_lr_frac, above=0, hi=100, is_int=False)
    cfg = scale_lr(train_config_from_args(args, stage), args.init_lr_frac)
    data = chat_data_config_from_args(args)
    try:
        chat_train(cfg, data)
    finally:
        cleanup_distributed()
    return 0
