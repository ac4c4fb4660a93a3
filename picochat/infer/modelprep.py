"""The inference copy of a model: dtype, fused q/k/v, in-place weight refresh, kernel support.

Inference reads every weight once per token: keeping them in bf16 on CUDA halves the bytes and
avoids re-casting fp32 master weights every step. Fusing q/k/v rewrites modules, so both happen on
a copy and the caller's model stays trainable. `load_weights_in_place` copies new weights into that
copy's existing tensors (captured CUDA graphs keep reading the same storage), fusing q/k/v of an
unfused source on the way: this is how RL refreshes the policy without rebuilding the cache.
"""

from __future__ import annotations

import copy

import torch

KERNELS = ("auto", "torch", "triton")


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None:
        from ..common import compute_dtype

        return compute_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating point type, e.g. 'bfloat16' (got {name!r})")
    return dtype


def prepare_model(model, dtype: torch.dtype, fuse: bool):
    """`model` itself when it already has `dtype` and needs no fusing, else a converted copy."""
    if next(model.parameters()).dtype != dtype or fuse:
        model = copy.deepcopy(model).to(dtype)
        if fuse:
            model.fuse_for_inference()
    return model.eval()


def triton_unusable(model) -> str | None:
    """Why the Triton decode kernels cannot serve `model` here, or None."""
    try:
        from .triton_decode import supported
    except ImportError as e:
        return f"triton is not importable ({e})"
    return supported(model)


def _fused(state: dict[str, torch.Tensor], target_keys) -> dict[str, torch.Tensor]:
    """Concatenate c_q/c_k/c_v weights of an unfused state dict where the target has c_qkv."""
    out = dict(state)
    for key in target_keys:
        if key.endswith("attn.c_qkv.weight") and key not in out:
            stem = key[: -len("c_qkv.weight")]
            parts = [out.pop(stem + f"c_{x}.weight", None) for x in "qkv"]
            if all(p is not None for p in parts):
                out[key] = torch.cat(parts)
    return out


@torch.no_grad()
def load_weights_in_place(model, source) -> None:
    """Copy the weights of `source` (a module or a state dict) into `model`'s tensors."""
    state = source.state_dict() if isinstance(source, torch.nn.Module) else dict(source)
    target = model.state_dict()
    state = _fused(state, target.keys())
    missing = [k for k in target if k not in state and k not in ("cos", "sin")]
    if missing:
        raise ValueError(f"the new weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    for key, tensor in target.items():
        if key in state:
            new = state[key]
            if new.shape != tensor.shape:
                raise ValueError(f"{key}: new weights have shape {tuple(new.shape)}, the model {tuple(tensor.shape)}")
            tensor.copy_(new.to(device=tensor.device, dtype=tensor.dtype))
