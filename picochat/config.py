"""Typed configuration for every stage, and the depth dial.

One dataclass per stage. `ModelConfig.from_depth` turns the single number a user picks (`--depth`)
into width, heads and the training horizon, so the common path needs one knob. Nothing here touches
torch devices or files: it is pure data, safe to import anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Special tokens, in id order after the BPE vocabulary. The tokenizer owns their meaning.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)


@dataclass
class TokenizerConfig:
    vocab_size: int = 32768  # including the special tokens
    max_chars: int = 2_000_000_000  # stop reading the text iterator after this many characters
    doc_cap: int = 10_000  # crop each training document to this many characters


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    seq_len: int = 2048
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 6
    n_kv_head: int = 6
    logit_softcap: float = 15.0
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_depth(
        cls, depth: int, vocab_size: int = 32768, seq_len: int = 2048, head_dim: int | None = None,
        kv_ratio: int = 1,
    ) -> "ModelConfig":
        """Width 64·depth rounded up to the head dim; heads of 128 (64 for tiny models below 512 wide)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        raw = 64 * depth
        if head_dim is None:
            head_dim = 128 if raw >= 512 else min(64, raw)
        n_embd = math.ceil(raw / head_dim) * head_dim
        n_head = n_embd // head_dim
        n_kv_head = max(1, n_head // kv_ratio)
        while n_head % n_kv_head:
            n_kv_head -= 1
        return cls(vocab_size=vocab_size, seq_len=seq_len, n_layer=depth, n_embd=n_embd,
                   n_head=n_head, n_kv_head=n_kv_head)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class OptimConfig:
    # Learning rates follow the d12 (768 wide) reference; AdamW rates are scaled by (768/width)^0.5.
    matrix_lr: float = 0.02  # Muon, hidden matrices
    embedding_lr: float = 0.2  # AdamW, token embedding
    unembedding_lr: float = 0.004  # AdamW, lm head
    scalar_lr: float = 0.004  # AdamW, anything else
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.8, 0.95)
    warmup_frac: float = 0.0
    warmdown_frac: float = 0.2
    final_lr_frac: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    muon_coefficients: str = "polar_express"  # polar_express | keller (torch.optim.Muon's quintic)
    muon_impl: str = "picochat"  # picochat (batched, train/muon.py) | torch (torch.optim.Muon: the baseline)


@dataclass
class TrainConfig:
    """One training run (pretrain, midtrain and SFT share it)."""

    run: str = "default"
    stage: str = "base"  # base | mid | sft: which folder of the run directory checkpoints go to
    depth: int = 12
    seq_len: int = 2048
    device_batch_size: int | str = "auto"  # "auto" = find it (CUDA), else a fixed number
    total_batch_tokens: int = 524288  # tokens per optimizer step across all ranks
    num_steps: int = -1  # -1: derive from the horizon
    data_param_ratio: float = 20.0  # training tokens ≈ ratio × parameters when num_steps is -1
    seed: int = 42
    eval_every: int = 250
    eval_tokens: int = 2**20
    sample_every: int = 1000
    save_every: int = 1000  # 0: only at the end; -1: never (benchmarks)
    keep_last: int = 2  # checkpoints kept per stage (0: all); older ones go once a new one verifies
    compile: bool | None = None  # None: on for CUDA
    device: str = "auto"
    resume: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | files | shards
    paths: list[str] = field(default_factory=list)  # files or globs for source=files
    text_field: str = "text"
    shard_url: str = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    num_shards: int = 1
    embedded_docs: int = 20000
    embedded_seed: int = 1234
    val_fraction: float = 0.01
    strict_data: bool = False  # a damaged file met while training: error instead of skipping it


@dataclass
class ChatDataConfig:
    """Where midtraining/SFT conversations come from and how they are batched."""

    mode: str = "packed"  # packed | padded (padded: the seed's baseline, for benchmarks)
    epochs: float = 1.0  # passes over the mixture when --num-steps is -1
    synthetic_size: int = 2000  # conversations of the offline synthetic tasks per epoch
    synthetic_weight: float = 1.0  # 0 leaves them out
    smoltalk: str | None = None
    smoltalk_weight: float = 1.0
    mmlu: str | None = None
    mmlu_weight: float = 1.0
    gsm8k: str | None = None
    gsm8k_weight: float = 1.0
    buffer_size: int | None = None  # pending conversations for best-fit packing (None: batcher default)
    val_size: int = 200  # held-out synthetic conversations for validation bits-per-byte
    seed: int = 0


@dataclass
class SamplingConfig:
    temperature: float = 0.8
    top_k: int | None = 50  # None or 0: no filtering
    top_p: float | None = None
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


RL_TASKS: tuple[str, ...] = ("arithmetic", "gsm8k")


@dataclass
class RLConfig:
    """`picochat rl`: on-policy policy gradient from the run's SFT checkpoint (stage "rl").

    Each step samples `samples_per_prompt` completions for each of `prompts_per_step` training
    prompts, scores them with the task's checker and pushes up the log-probability of the sampled
    tokens in proportion to their advantage (reward minus the prompt group's mean)."""

    run: str = "default"
    task: str = "arithmetic"  # arithmetic (offline synthetic) | gsm8k
    gsm8k: str | None = None  # GSM8K train source (file, folder or URL); None: the hub's parquet
    gsm8k_test: str | None = None  # GSM8K test source for evaluation; None: the hub's parquet
    train_size: int = 2000  # synthetic prompts per epoch (arithmetic)
    num_steps: int = -1  # -1: one pass over the training prompts
    prompts_per_step: int = 16  # over all ranks
    samples_per_prompt: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None  # None: sample from the whole distribution
    std_normalize: bool = False  # divide each group's advantages by its reward std
    kl_coef: float = 0.0  # > 0: penalise KL to the frozen SFT model (k3 estimator per sampled token)
    device_batch_size: int = 32  # rows per forward/backward of the update
    lr_frac: float = 0.05  # every optimizer LR scaled by this; decays linearly to 0 over the run
    eval_every: int = 25  # steps between held-out evaluations (0: only before and after)
    eval_prompts: int = 64  # held-out prompts per evaluation (over all ranks)
    eval_samples: int = 8  # k of pass@k
    eval_temperature: float = 1.0
    save_every: int = 25  # 0: only at the end; -1: never
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    eager_rollouts: bool = False  # baseline: eager engine, one prompt's samples at a time
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str):
            raise ValueError(f"RLConfig.{name} must be {allowed} (got {getattr(self, name)!r})")

        if self.task not in RL_TASKS:
            bad("task", f"one of {', '.join(RL_TASKS)}")
        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "device_batch_size",
                     "eval_samples", "train_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if self.num_steps < -1:
            bad("num_steps", "-1 (one pass) or >= 0")
        for name in ("eval_every", "eval_prompts"):
            if getattr(self, name) < 0:
                bad(name, ">= 0")
        if self.save_every < -1:
            bad("save_every", ">= -1")
        if not 0 < self.temperature <= 10:
            bad("temperature", "in (0, 10]: on-policy sampling needs a stochastic policy")
        if not 0 <= self.eval_temperature <= 10:
            bad("eval_temperature", "in [0, 10]")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", "None or >= 1")
        if not 0 <= self.kl_coef <= 100:
            bad("kl_coef", "in [0, 100]")
        if not 0 < self.lr_frac <= 10:
            bad("lr_frac", "in (0, 10]")
