"""Export a picochat checkpoint as a Hugging Face transformers model folder.

The target is transformers' native `nanochat` architecture (`NanoChatForCausalLM`), which computes
the same function as picochat's GPT once its config says so: docs/export.md goes through it op by
op. Nothing here needs transformers or picochat's training code: the checkpoint is read through the
run store (`picochat.runs`), renamed, and written as safetensors plus JSON, so the folder loads with
`AutoModelForCausalLM` / `AutoTokenizer` on a machine without picochat.

A picochat model the format cannot express (a config field or a weight this mapping does not know)
is refused with the reason, never exported as a model that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..runs import RunPaths, find_checkpoint, read_meta
from ..tokenizer import Tokenizer
from .hf_tokenizer import write_tokenizer_files

# The ModelConfig fields this mapping expresses. A field outside this set means picochat's model
# grew a feature the mapping has not been taught, so the export stops instead of guessing.
MAPPED_FIELDS = frozenset({"vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "n_kv_head",
                           "logit_softcap", "rope_base"})

# picochat normalises with F.rms_norm(x, shape) and no eps, which adds float32's machine epsilon
# (the op-math type's, so for bf16 inputs too); transformers' NanoChatRMSNorm adds rms_norm_eps.
RMS_NORM_EPS = torch.finfo(torch.float32).eps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# picochat's weight names -> transformers' nanochat names ("{i}": the layer index)
_LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}


class ExportError(ValueError):
    """The checkpoint cannot be exported (or not to that folder); the message says why."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    stage: str
    step: int | None
    checkpoint: Path
    files: tuple[str, ...]


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The checkpoint's ModelConfig, refusing fields the nanochat mapping cannot express."""
    fields = dict(meta.get("model") or {})
    if not fields:
        raise ExportError("the checkpoint's meta.json has no model config")
    known = {f.name for f in dataclasses.fields(ModelConfig)} | set(fields)
    unmapped = sorted(known - MAPPED_FIELDS)
    if unmapped:
        raise ExportError(f"the nanochat format cannot express model config field(s) {unmapped} "
                          f"(picochat/export/hf.py maps {sorted(MAPPED_FIELDS)})")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ExportError(f"invalid model config in the checkpoint: {e}") from e


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    """config.json for NanoChatForCausalLM (see docs/export.md for each field's reason)."""
    bos, eos = tok.bos_id, tok.special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,  # older transformers read the base from here
        "final_logit_softcapping": cfg.logit_softcap or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": bos,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key transformers 4.x reads
    }


def generation_config(tok: Tokenizer) -> dict:
    """generation_config.json: stop where picochat's engine stops (<|assistant_end|>, or <|bos|>),
    and sample the way `picochat chat` does by default (temperature 0.8, top-k 50)."""
    bos, end = tok.bos_id, tok.special("<|assistant_end|>")
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos,
            "do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 256}


def hf_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rename picochat's weights to nanochat's, checking that the set and every shape are exactly
    what `cfg` describes (no weight dropped, none unknown)."""
    D, Dh = cfg.n_embd, cfg.head_dim
    expected = {"wte.weight": ("model.embed_tokens.weight", (cfg.vocab_size, D)),
                "lm_head.weight": ("lm_head.weight", (cfg.vocab_size, D))}
    shapes = {"attn.c_q.weight": (cfg.n_head * Dh, D), "attn.c_k.weight": (cfg.n_kv_head * Dh, D),
              "attn.c_v.weight": (cfg.n_kv_head * Dh, D), "attn.c_proj.weight": (D, cfg.n_head * Dh),
              "mlp.c_fc.weight": (4 * D, D), "mlp.c_proj.weight": (D, 4 * D)}
    for i in range(cfg.n_layer):
        for name, hf_name in _LAYER_NAMES.items():
            expected[f"blocks.{i}.{name}"] = (f"model.layers.{i}.{hf_name}", shapes[name])
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ExportError(f"the nanochat format cannot express weight(s) {unknown[:5]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(f"the checkpoint lacks weight(s) {missing[:5]}")
    out = {}
    for name, (hf_name, shape) in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies {shape}")
        out[hf_name] = tensor.to(dtype).contiguous()
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to overwrite the export files in it")


def _move_into(tmp: Path, out: Path, names: list[str]) -> None:
    """Put each written file in place with one rename: a reader sees old or new files, never a half-
    written one. Other files in `out` are left alone (--force never deletes what it did not write)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(tmp / name, out / name)


def export_hf(run: str, out: Path | str, stage: str | None = None, step: int | None = None,
              force: bool = False, dtype: str = "float32") -> ExportResult:
    """Write the run's latest checkpoint of `stage` (default: the last stage trained) to `out`."""
    from safetensors.torch import load_file, save_file

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; pick one of {sorted(DTYPES)}")
    out = Path(out).expanduser()
    _check_out(out, force)
    stage_name, ckpt = find_checkpoint(run, stage, step)
    meta = read_meta(ckpt, verify=True)
    cfg = model_config_from_meta(meta)
    tok = Tokenizer.load(RunPaths.for_run(run).tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the run's tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    weights = hf_weights(load_file(str(ckpt / "model.safetensors"), device="cpu"), cfg, DTYPES[dtype])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        provenance = {"format": "pt", "picochat_run": run, "picochat_stage": stage_name,
                      "picochat_step": str(meta.get("step", ""))}
        save_file(weights, str(tmp / "model.safetensors"), metadata=provenance)
        json_files = {"config.json": hf_config(cfg, tok, dtype), "generation_config.json": generation_config(tok)}
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        names = ["model.safetensors", *json_files, *write_tokenizer_files(tok, tmp, cfg.seq_len)]
        _move_into(tmp, out, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, stage_name, meta.get("step"), ckpt, tuple(names))
