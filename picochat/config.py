"""Typed configuration for every stage, and the depth dial.

One dataclass per stage. `ModelConfig.from_depth` turns the single number a user picks (`--depth`)
into width, heads and the training horizon, so the common path needs one knob. Each field carries its
help text and allowed range in its metadata (`opt(...)`): the command-line options are generated from
them (`picochat/options.py`), and `__post_init__` checks every value against them, so the Python API
and the CLI reject the same values with the same message (`ConfigError` names the field, the allowed
range and the value). Nothing here touches torch; the only file access is checking that given paths exist.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

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
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ConfigError(ValueError):
    """A config value outside what its field allows. `flag` is the command-line spelling."""

    def __init__(self, field_name: str, rule: str, value: Any, flag: str | None = None, owner: str = ""):
        self.field, self.rule, self.value = field_name, rule, value
        self.flag = flag or "--" + field_name.replace("_", "-")
        where = f"{owner}.{field_name} ({self.flag})" if owner else self.flag
        super().__init__(f"{where} must be {rule} (got {value!r})")

    def cli_message(self) -> str:
        return f"{self.flag} must be {self.rule} (got {_shown(self.value)})"


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "nothing"
    return str(value)


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
        lo: float | None = None, hi: float | None = None, above: float | None = None,
        special: tuple = (), choices: tuple | None = None, flag: str | None = None,
        metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its help text and allowed values (checked by `check_fields`).
    lo/hi: inclusive bounds; above: exclusive lower bound; special: values allowed besides the range
    (e.g. -1 = "derive it"); flag: the option name when the field name would clash or mislead."""
    meta = {"help": help, "lo": lo, "hi": hi, "above": above, "special": tuple(special), "choices": choices,
            "flag": flag, "metavar": metavar, "cli": cli}
    meta = {k: v for k, v in meta.items() if v is not None and v != ()}
    return field(default=default, default_factory=factory, metadata=meta)


def _rule(meta: dict, is_int: bool) -> str:
    what = "an integer" if is_int else "a number"
    lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above")
    fmt = (lambda x: f"{x:,}" if is_int and abs(x) >= 10_000 else f"{x:g}")
    if above is not None:
        rng = f"{what} > {fmt(above)}" + (f" and <= {fmt(hi)}" if hi is not None else "")
    elif lo is not None and hi is not None:
        rng = f"{what} from {fmt(lo)} to {fmt(hi)}"
    elif lo is not None:
        rng = f"{what} >= {fmt(lo)}"
    elif hi is not None:
        rng = f"{what} <= {fmt(hi)}"
    else:
        rng = what
    special = meta.get("special", ())
    return " or ".join([repr(s) if isinstance(s, str) else str(s) for s in special] + [rng])


def _check_number(owner: str, name: str, value: Any, meta: dict, is_int: bool) -> None:
    if value in meta.get("special", ()) and not isinstance(value, bool):
        return
    ok = isinstance(value, int) if is_int else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (is_int or math.isfinite(value))
    lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above")
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi) and (above is None or value > above)
    if not ok:
        raise ConfigError(name, _rule(meta, is_int), value, _flag(name, meta), owner)


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 above: float | None = None, is_int: bool = True, flag: str | None = None) -> None:
    """Range check for an option that is not a config field (e.g. `picochat data preview -n`)."""
    meta = {k: v for k, v in {"lo": lo, "hi": hi, "above": above}.items() if v is not None}
    if flag:
        meta["flag"] = flag.lstrip("-")
    _check_number("", name, value, meta, is_int)


def _flag(name: str, meta: dict) -> str:
    return "--" + meta.get("flag", name.replace("_", "-"))


def check_fields(cfg: Any) -> None:
    """Check every field of a config dataclass against its metadata (range, choices); raise a
    ConfigError naming the first field that is out of bounds."""
    owner = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f.name, "one of " + ", ".join(map(str, meta["choices"])), value, _flag(f.name, meta),
                              owner)
        if not any(k in meta for k in ("lo", "hi", "above")) or value is None:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind.startswith("tuple"):
            for v in value:
                _check_number(owner, f.name, v, meta, is_int=False)
        else:
            _check_number(owner, f.name, value, meta, is_int="int" in kind and "float" not in kind)


def check_paths(owner: str, name: str, patterns: list[str], flag: str | None = None) -> None:
    """Every path or glob must name at least one existing file."""
    for p in patterns:
        if not (glob.glob(str(p), recursive=True) if glob.has_magic(str(p)) else os.path.exists(p)):
            raise ConfigError(name, "existing files or globs that match files", p, flag, owner)


def check_path_or_url(owner: str, name: str, value: str | None, flag: str | None = None) -> None:
    if value and not re.match(r"^[a-z]+://", value) and not os.path.exists(value):
        raise ConfigError(name, "an existing file or folder, or a URL", value, flag, owner)


def check_device(value: Any, flag: str = "--device") -> None:
    """The spelling of a device, or a torch.device (whether this machine has it is checked by
    common.detect_device)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value or "")):
        raise ConfigError("device", "auto, cpu, cuda, cuda:N or mps", value, flag)


@dataclass
class TokenizerConfig:
    vocab_size: int = opt(32768, "tokens including the special ones", lo=MIN_VOCAB, hi=2**20)
    max_chars: int = opt(2_000_000_000, "characters of text to learn from", lo=1, hi=10**13)
    doc_cap: int = opt(10_000, "crop each training document to this many characters", lo=1, hi=10**9)

    def __post_init__(self) -> None:
        check_fields(self)


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
    """optimizer (learning rates follow the d12 reference, 768 wide; AdamW rates scale by (768/width)^0.5)"""

    matrix_lr: float = opt(0.02, "Muon learning rate of the hidden matrices", lo=0, hi=10)
    embedding_lr: float = opt(0.2, "AdamW learning rate of the token embedding", lo=0, hi=10)
    unembedding_lr: float = opt(0.004, "AdamW learning rate of the lm head", lo=0, hi=10)
    scalar_lr: float = opt(0.004, "AdamW learning rate of everything else", lo=0, hi=10)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0, hi=10)
    adam_betas: tuple[float, float] = opt((0.8, 0.95), "AdamW beta1 beta2", lo=0, hi=0.9999, metavar="BETA")
    warmup_frac: float = opt(0.0, "share of the steps spent warming the learning rate up", lo=0, hi=1)
    warmdown_frac: float = opt(0.2, "share of the steps spent decaying the learning rate at the end", lo=0, hi=1)
    final_lr_frac: float = opt(0.0, "learning rate at the last step, as a share of the peak", lo=0, hi=1)
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: off)", lo=0, hi=1e6)
    muon_coefficients: str = opt("keller", "Muon's orthogonalisation polynomial (keller: torch.optim.Muon's "
                                 "quintic; polar_express: arXiv:2505.16932, weaker at high rates, see muon.py)", choices=("polar_express", "keller"))
    muon_impl: str = opt("picochat", "Muon implementation: picochat (batched, train/muon.py) or torch "
                         "(torch.optim.Muon, the baseline)", choices=("picochat", "torch"))

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.adam_betas) != 2:
            raise ConfigError("adam_betas", "two numbers (beta1 beta2)", self.adam_betas, owner="OptimConfig")
        if self.warmup_frac + self.warmdown_frac > 1:
            raise ConfigError("warmdown_frac", f"at most 1 - warmup_frac = {1 - self.warmup_frac:g}",
                              self.warmdown_frac, owner="OptimConfig")


@dataclass
class TrainConfig:
    """One training run (pretrain, midtrain and SFT share it)."""

    run: str = opt("default", "run name under $PICOCHAT_HOME/runs", cli=False)  # options.add_run_arg
    stage: str = opt("base", "folder of the run the checkpoints go to (runs.STAGES)", cli=False)
    depth: int = opt(12, "the model size dial: width 64·depth (0 for chat stages: from the checkpoint)",
                     lo=0, hi=256)
    seq_len: int = opt(2048, "tokens per row", lo=2, hi=2**20)
    device_batch_size: int | str = opt("auto", "rows per forward pass per GPU, or 'auto' to find the largest "
                                       "that fits (CUDA)", lo=1, hi=2**16, special=("auto",))
    total_batch_tokens: int = opt(524288, "tokens per optimizer step over all ranks (sets gradient accumulation)",
                                  lo=1, hi=2**40)
    num_steps: int = opt(-1, "optimizer steps; -1 derives them (pretraining: from --data-param-ratio; chat "
                         "stages: from --epochs)", lo=0, hi=10**9, special=(-1,))
    data_param_ratio: float = opt(20.0, "training tokens per parameter when --num-steps is -1", above=0, hi=1e6)
    seed: int = opt(42, "seed of the weights and the data order", lo=0, hi=2**32 - 1)
    eval_every: int = opt(250, "validate every N steps (0: off)", lo=0, hi=10**9)
    eval_tokens: int = opt(2**20, "held-out tokens per validation", lo=1, hi=2**40)
    sample_every: int = opt(1000, "print greedy samples every N steps (0: off)", lo=0, hi=10**9)
    save_every: int = opt(1000, "checkpoint every N steps (0: only at the end; -1: never)", lo=-1, hi=10**9)
    keep_last: int = opt(2, "checkpoints kept per stage (0: all); older ones are pruned once a new one verifies",
                         lo=0)
    compile: bool | None = opt(None, "torch.compile the model (default: on for CUDA)")
    compile_scope: str = opt("model", "what one compiled graph covers: model (the whole forward; fastest steps) or "
                             "blocks (each block and the head: a cold compile ~2.5x faster, steps ~0.5 percent slower)",
                             choices=("model", "blocks"))
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    resume: bool = opt(False, "continue from the latest good checkpoint")
    optim: OptimConfig = opt(factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.stage == "base":  # depth 0 ("from the starting checkpoint") exists only for chat stages
            _check_number("TrainConfig", "depth", self.depth, {"lo": 1, "hi": 256}, is_int=True)
        check_fields(self)
        if not RUN_NAME.fullmatch(self.run or ""):
            raise ConfigError("run", "letters, digits, '_', '-' or '.' (not starting with '.')", self.run,
                              owner="TrainConfig")
        check_device(self.device)


@dataclass
class DataConfig:
    """text source"""

    source: str = opt("embedded", "where text comes from", choices=("embedded", "files", "shards"))
    paths: list[str] = opt(factory=list, help=".txt/.jsonl/.parquet files or globs (quote globs) for --source files",
                           metavar="PATH")
    text_field: str = opt("text", "jsonl field / parquet column with the text")
    shard_url: str = opt("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                         "base URL of shard_NNNNN.parquet files")
    num_shards: int = opt(1, "shards to use; with 2 or more the last one is the val split", lo=1, hi=100_000)
    embedded_docs: int = opt(20000, "documents in the embedded corpus", lo=1, hi=10**8)
    embedded_seed: int = opt(1234, "seed of the embedded corpus", lo=0, hi=2**32 - 1)
    val_fraction: float = opt(0.01, "share of the source held out for validation", above=0, hi=0.5)
    strict_data: bool = opt(False, "stop with an error on a damaged file met while reading (default: skip it "
                            "with a warning)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.paths and self.source != "files":
            raise ConfigError("paths", "given only with --source files", self.source, "--paths", "DataConfig")
        if self.source == "files" and not self.paths:
            raise ConfigError("paths", "at least one file or glob with --source files", [], "--paths", "DataConfig")
        check_paths("DataConfig", "paths", self.paths)
        if not self.text_field:
            raise ConfigError("text_field", "a field or column name", self.text_field, owner="DataConfig")
        if not re.match(r"^(https?|file)://", self.shard_url):
            raise ConfigError("shard_url", "an http://, https:// or file:// URL", self.shard_url, owner="DataConfig")


@dataclass
class ChatDataConfig:
    """chat data: where midtraining/SFT conversations come from and how they are batched"""

    mode: str = opt("packed", "packed: whole conversations best-fit packed per row, document-masked; padded: "
                    "one conversation per row (the seed's method, a benchmark baseline)", choices=("packed", "padded"))
    epochs: float = opt(1.0, "passes over the mixture when --num-steps is -1", above=0, hi=1e4)
    synthetic_size: int = opt(2000, "conversations of the offline synthetic tasks per epoch", lo=1, hi=10**8)
    synthetic_weight: float = opt(1.0, "copies of each synthetic conversation per epoch (0 leaves them out)",
                                  lo=0, hi=1e4)
    smoltalk: str | None = opt(None, "add SmolTalk (parquet/jsonl file, folder or URL)", metavar="PATH_OR_URL")
    smoltalk_weight: float = opt(1.0, "copies of each SmolTalk item per epoch", lo=0, hi=1e4)
    mmlu: str | None = opt(None, "add MMLU (parquet/jsonl file, folder or URL)", metavar="PATH_OR_URL")
    mmlu_weight: float = opt(1.0, "copies of each MMLU item per epoch", lo=0, hi=1e4)
    gsm8k: str | None = opt(None, "add GSM8K (parquet/jsonl file, folder or URL)", metavar="PATH_OR_URL")
    gsm8k_weight: float = opt(1.0, "copies of each GSM8K item per epoch", lo=0, hi=1e4)
    buffer_size: int | None = opt(None, "pending conversations for best-fit packing (default: max(64, 8 × rows))",
                                  lo=1, hi=10**7)
    val_size: int = opt(200, "held-out synthetic conversations for validation bits per byte", lo=1, hi=10**7)
    seed: int = opt(0, "seed of the mixture's shuffle and the synthetic tasks", lo=0, hi=2**32 - 1, flag="data-seed")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("smoltalk", "mmlu", "gsm8k"):
            check_path_or_url("ChatDataConfig", name, getattr(self, name))


@dataclass
class SamplingConfig:
    """sampling"""

    temperature: float = opt(0.8, "sampling temperature (0: greedy)", lo=0, hi=100)
    top_k: int | None = opt(50, "keep the K most likely tokens (0: no filtering)", lo=0, hi=2**24)
    top_p: float | None = opt(None, "keep the smallest set of tokens whose probability reaches P", above=0, hi=1)
    max_tokens: int = opt(256, "most tokens per reply", lo=1, hi=2**24)
    seed: int | None = opt(None, "sampling seed (default: random)", lo=0, hi=2**63 - 1)
    stop: list[str] = opt(factory=list, help="stop generating at any of these strings", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)


RL_TASKS: tuple[str, ...] = ("arithmetic", "gsm8k")


@dataclass
class RLConfig:
    """reinforcement learning (`picochat rl`): on-policy policy gradient from the run's SFT checkpoint

    Each step samples `samples_per_prompt` completions for each of `prompts_per_step` training
    prompts, scores them with the task's checker and pushes up the log-probability of the sampled
    tokens in proportion to their advantage (reward minus the prompt group's mean)."""

    run: str = opt("default", cli=False)
    task: str = opt("arithmetic", "arithmetic (offline synthetic, calculator tool) or gsm8k", choices=RL_TASKS)
    gsm8k: str | None = opt(None, "GSM8K training set: parquet/jsonl file, folder or URL (default: the hub's)",
                            metavar="PATH_OR_URL")
    gsm8k_test: str | None = opt(None, "GSM8K test set for the held-out evaluation (default: the hub's)",
                                 metavar="PATH_OR_URL")
    train_size: int = opt(2000, "synthetic arithmetic prompts per epoch", lo=1, hi=10**9)
    num_steps: int = opt(-1, "optimizer steps (-1: one pass over the training prompts)", lo=0, hi=10**9,
                         special=(-1,))
    prompts_per_step: int = opt(16, "prompts per step over all ranks (divisible by the number of ranks)",
                                lo=1, hi=10**6)
    samples_per_prompt: int = opt(16, "completions per prompt (the group its advantage is relative to)",
                                  lo=1, hi=4096)
    max_new_tokens: int = opt(256, "tokens each completion may add (tool outputs included)", lo=1, hi=10**6)
    temperature: float = opt(1.0, "sampling temperature of the rollouts (the policy trained is softmax(logits/T))",
                             above=0, hi=10)
    top_k: int | None = opt(None, "sample from the k most likely tokens only (default: all)", lo=1, hi=10**7)
    std_normalize: bool = opt(False, "divide each group's advantages by the std of its rewards")
    kl_coef: float = opt(0.0, "weight of a KL penalty to the frozen SFT model (0: none)", lo=0, hi=100)
    device_batch_size: int = opt(32, "rows per forward/backward pass of the update", lo=1, hi=10**6)
    lr_frac: float = opt(0.05, "every optimizer learning rate times this; decays linearly to 0", above=0, hi=10)
    eval_every: int = opt(25, "steps between held-out evaluations (0: only before and after)", lo=0, hi=10**9)
    eval_prompts: int = opt(64, "held-out prompts per evaluation (0: no evaluation)", lo=0, hi=10**7)
    eval_samples: int = opt(8, "samples per held-out prompt: the k of pass@k", lo=1, hi=4096)
    eval_temperature: float = opt(1.0, "sampling temperature of the evaluation (0: greedy)", lo=0, hi=10)
    save_every: int = opt(25, "checkpoint every N steps (0: only at the end; -1: never)", lo=0, hi=10**9,
                          special=(-1,))
    seed: int = opt(0, "seed of the prompt order and of every sample", lo=0, hi=2**62)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    resume: bool = opt(False, "continue from the latest good rl checkpoint")
    eager_rollouts: bool = opt(False, "baseline: the eager decode step, one prompt's samples at a time "
                                      "(as upstream nanochat samples)")
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        check_fields(self)
