"""Stage recipes: the default settings of every training stage, written once.

`picochat pretrain|midtrain|sft` take their option defaults from `RECIPES`, `picochat run` chains the
stages with them (`follow_on`), and `picochat demo` uses `DEMO`, the same stages at toy sizes for a
CPU. A recipe is the `TrainConfig` a stage starts from plus one factor applied to every learning rate
(chat stages refine a model, they should not relearn it). Pure data: imports only `config`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import MIN_VOCAB, OptimConfig, TrainConfig, check_fields, opt


@dataclass(frozen=True)
class Recipe:
    stage: str  # a key of runs.STAGES
    command: str  # the `picochat` command that trains it
    summary: str  # one line for --help
    train: TrainConfig  # the stage's defaults (its OptimConfig included)
    lr_frac: float = 1.0  # every learning rate is multiplied by this


# The chat stages take depth and vocabulary from their starting checkpoint (depth 0 = "from there"),
# and need no samples of raw text.
_CHAT = dict(depth=0, seq_len=2048, device_batch_size="auto", num_steps=-1, sample_every=0, save_every=1000)

RECIPES: dict[str, Recipe] = {
    "base": Recipe("base", "pretrain", "train the base model on a text source", TrainConfig(stage="base")),
    # midtraining reuses the pretraining batch at the full learning rate
    "mid": Recipe("mid", "midtrain", "continue the base model on conversations (stage 'mid')",
                  TrainConfig(stage="mid", total_batch_tokens=2**19, eval_every=250,
                              optim=OptimConfig(warmdown_frac=0.8), **_CHAT), lr_frac=1.0),
    # SFT takes smaller steps at a lower rate that decays to zero over the whole run
    "sft": Recipe("sft", "sft", "supervised fine-tuning on conversations (stage 'sft', from mid or base)",
                  TrainConfig(stage="sft", total_batch_tokens=2**16, eval_every=100,
                              optim=OptimConfig(warmdown_frac=1.0), **_CHAT), lr_frac=0.1),
}

# The stages `train/sft.py` trains on conversations (`picochat midtrain`, `picochat sft`), in order.
CHAT_FINETUNE: tuple[str, ...] = ("mid", "sft")

# What a chat stage of `picochat run` takes from its own recipe; everything else (depth, sequence
# length, device, seed, learning rates, ...) follows the pretraining settings of the same command.
FOLLOW_ON_FIELDS = ("num_steps", "eval_every")


def recipe_for_command(command: str) -> Recipe:
    for r in RECIPES.values():
        if r.command == command:
            return r
    raise ValueError(f"no recipe for command {command!r}")


def scale_lr(cfg: TrainConfig, frac: float) -> TrainConfig:
    """`cfg` with every learning rate multiplied by `frac`."""
    o = cfg.optim
    optim = replace(o, matrix_lr=o.matrix_lr * frac, embedding_lr=o.embedding_lr * frac,
                    unembedding_lr=o.unembedding_lr * frac, scalar_lr=o.scalar_lr * frac)
    return replace(cfg, optim=optim)


def follow_on(stage: str, base: TrainConfig) -> tuple[TrainConfig, float]:
    """(config, lr factor) of chat stage `stage` run after pretraining with `base` in one command:
    the recipe's step count, evaluation interval and warmdown; a total batch no larger than the
    pretraining one; everything else as `base`."""
    recipe = RECIPES[stage]
    own = {f: getattr(recipe.train, f) for f in FOLLOW_ON_FIELDS}
    cfg = replace(base, stage=stage, total_batch_tokens=min(recipe.train.total_batch_tokens, base.total_batch_tokens),
                  optim=replace(base.optim, warmdown_frac=recipe.train.optim.warmdown_frac), **own)
    return cfg, recipe.lr_frac


# ---------------------------------------------------------------------------------------------------
# the demo: every stage at toy sizes (changing these numbers changes what `make demo` shows)


@dataclass(frozen=True)
class DemoSizes:
    depth: int = opt(3, "model depth", lo=1, hi=64)
    batch_size: int = opt(8, "rows of --seq-len tokens per step (one micro-batch)", lo=1, hi=4096)
    seq_len: int = opt(256, "tokens per row", lo=16, hi=65536)
    pretrain_steps: int = opt(300, "pretraining steps", lo=1, hi=10**7)
    mid_steps: int = opt(450, "midtraining steps", lo=1, hi=10**7)
    sft_steps: int = opt(150, "SFT steps", lo=1, hi=10**7)
    synthetic_size: int = opt(8000, "synthetic conversations per epoch", lo=1, hi=10**7)
    tokenizer_vocab: int = opt(4096, "tokenizer vocabulary", lo=MIN_VOCAB, hi=2**17)
    eval_examples: int = opt(60, "held-out questions per task", lo=1, hi=10**5)
    chat_lr_frac: tuple[tuple[str, float], ...] = opt((("mid", 1.0), ("sft", 0.3)), cli=False)
    chat_warmdown_frac: float = opt(0.5, "share of each chat stage's steps spent decaying the learning rate",
                                    lo=0, hi=1)
    seed: int = opt(42, "seed of the weights (every stage) and of the pretraining data order", lo=0, hi=2**32 - 1)
    compile: bool = opt(True, "torch.compile the training steps: on CPU each graph becomes C++ (a C++ compiler and "
                              "the Python headers are needed; without them the demo trains eagerly and says so), "
                              "which fuses the small elementwise operations and makes the steps ~1.5x faster for "
                              "~20 s of compiling per stage")

    def __post_init__(self) -> None:
        check_fields(self)


DEMO = DemoSizes()
# `picochat demo --quick`: seconds, for smoke tests
DEMO_QUICK = replace(DEMO, depth=2, seq_len=128, pretrain_steps=30, synthetic_size=500, mid_steps=10, sft_steps=10,
                     eval_examples=20, compile=False)  # a compile costs more than 50 steps save


def demo_configs(sizes: DemoSizes, run: str, device: str) -> dict[str, tuple[TrainConfig, float]]:
    """Stage -> (config, lr factor) of the demo's pretraining, midtraining and SFT."""
    tokens = sizes.batch_size * sizes.seq_len
    base = TrainConfig(run=run, stage="base", depth=sizes.depth, seq_len=sizes.seq_len,
                       device_batch_size=sizes.batch_size, total_batch_tokens=tokens, num_steps=sizes.pretrain_steps,
                       eval_every=max(1, sizes.pretrain_steps // 4), eval_tokens=64 * sizes.seq_len, sample_every=0,
                       save_every=0, device=device, compile=sizes.compile, seed=sizes.seed)
    out = {"base": (base, 1.0)}
    steps = {"mid": sizes.mid_steps, "sft": sizes.sft_steps}
    for stage, lr_frac in sizes.chat_lr_frac:
        out[stage] = (replace(base, stage=stage, num_steps=steps[stage], eval_every=0,
                              optim=replace(base.optim, warmdown_frac=sizes.chat_warmdown_frac)), lr_frac)
    return out
