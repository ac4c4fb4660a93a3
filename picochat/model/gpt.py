"""The transformer: a GPT in the modern small-model style.

Rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU² MLP, untied embedding and head,
no biases, grouped-query attention, logit soft-capping and zero-initialised output projections.
Build it on the meta device and call `init_weights()` after `to_empty(device=...)`, so a large model
never materialises twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .attention import KVCache, causal_attention
from .loss import reference_softcapped_cross_entropy, softcapped_cross_entropy, triton_softcapped_cross_entropy


@dataclass(frozen=True)
class ForwardOptions:
    """How the training forward is computed; none of these change the weights, checkpoints or the
    math, only the kernels (and, for `bf16_residual`, the rounding). The benchmark's levers.
    `fused_qkv` and `bf16_residual` act only with gradients on (training): inference and evaluation
    run as before.

    fused_loss: the one-pass soft-capped cross-entropy of `loss.py` (no float32 logits tensor) instead
        of the plain ops; CPUs always use it (there it works through cache-sized blocks of rows).
    fused_qkv: one q/k/v matrix product per layer (the three weights concatenated on the fly;
        the optimizer and checkpoints keep three matrices).
    bf16_residual: under bfloat16 autocast, keep the residual stream in bfloat16 instead of
        float32 (half the bytes of every norm and residual add; upstream nanochat does this).
    triton_loss: on CUDA, the loss's two passes as hand-written Triton kernels (`triton_loss.py`,
        one-instruction tanh) instead of the compiler's fusion of `fused_loss`; a graph break. Off:
        +0.6% at d12 on an H200, inside the spread between runs, for 4 GiB more at peak."""

    fused_loss: bool = True
    fused_qkv: bool = True
    bf16_residual: bool = True
    triton_loss: bool = False

    @classmethod
    def reference(cls) -> "ForwardOptions":
        return cls(fused_loss=False, fused_qkv=False, bf16_residual=False, triton_loss=False)

    @classmethod
    def parse(cls, spec: str) -> "ForwardOptions":
        """'default', 'reference', or levers joined by '+' turned on from the reference (or from the
        default when the spec starts with 'default'): 'loss', 'qkv', 'bf16res', 'triton'
        (e.g. 'loss+qkv', 'default+triton')."""
        names = {"loss": "fused_loss", "qkv": "fused_qkv", "bf16res": "bf16_residual", "triton": "triton_loss"}
        parts = [p for p in spec.strip().split("+") if p]
        base = cls() if parts[:1] == ["default"] else cls.reference()
        on = {}
        for part in parts:
            if part in ("reference", "default") and part == parts[0]:
                continue
            if part not in names:
                raise ValueError(f"unknown forward lever {part!r}: use default, reference, or + joined {sorted(names)}")
            on[names[part]] = True
        return cls(**{**vars(base), **on})


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable to (B, 1, T, D/2). Rotates the two halves of D."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        D = config.n_embd
        self.c_q = nn.Linear(D, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)
        self.c_qkv: nn.Linear | None = None  # set by fuse_qkv() (inference copies only)
        self.concat_qkv = True  # training: one matmul over the three weights concatenated (ForwardOptions)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Replace c_q, c_k, c_v by one projection: one matmul and one rotary/norm pass per layer
        instead of three, which is what a launch-bound decode step pays for. Inference only: the
        optimizer and checkpoints know the three separate matrices."""
        if self.c_qkv is not None:
            return
        w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        self.c_qkv = nn.Linear(w.size(1), w.size(0), bias=False, device=w.device, dtype=w.dtype)
        self.c_qkv.weight.copy_(w)
        del self.c_q, self.c_k, self.c_v

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCache | None = None, positions=None, cache_mask=None):
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        if self.c_qkv is None and not (self.concat_qkv and torch.is_grad_enabled()):
            q = self.c_q(x).view(B, T, H, self.head_dim).transpose(1, 2)
            k = self.c_k(x).view(B, T, Hkv, self.head_dim).transpose(1, 2)
            v = self.c_v(x).view(B, T, Hkv, self.head_dim).transpose(1, 2)
            q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        else:
            if self.c_qkv is not None:
                qkv = self.c_qkv(x)
            else:  # the concatenation is differentiable: each weight gets its slice of the gradient
                qkv = F.linear(x, torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]))
            qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)
            qk = rms_norm(apply_rotary(qkv[:, :H + Hkv], cos, sin))  # rotary and norm act per head
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        if kv_cache is None:
            y = causal_attention(q, k, v, attn_mask)
        else:
            kv_cache.write(self.layer_idx, k, v, positions)
            y = kv_cache.attend(self.layer_idx, q, cache_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, positions=None, cache_mask=None):
        x = x + self.attn(rms_norm(x), cos, sin, attn_mask, kv_cache, positions, cache_mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 4x the training length so inference can run past it (quality degrades).
        self.rotary_len = 4 * config.seq_len
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.set_options(ForwardOptions.reference())  # build_model picks the device's options

    def set_options(self, options: ForwardOptions) -> "GPT":
        """Choose the training forward's kernels (see ForwardOptions); returns self."""
        self.options = options
        for block in self.blocks:
            block.attn.concat_qkv = options.fused_qkv
        return self

    def _rotary_tables(self, length: int, device=None):
        half = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(half, dtype=torch.float32, device=device) / half))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (call after `to_empty`); output projections start at zero."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        self.wte.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=gen)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        cos, sin = self._rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def fuse_for_inference(self) -> "GPT":
        """Fuse each layer's q/k/v projections (see `Attention.fuse_qkv`); returns self."""
        for block in self.blocks:
            block.attn.fuse_qkv()
        return self

    # -- accounting ----------------------------------------------------------------------------
    def num_params(self, matmul_only: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if matmul_only else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight, plus 12·L·D·T for attention scores/values
        (full-matrix convention, not halved for causality, matching upstream nanochat's MFU)."""
        c = self.config
        T = seq_len or c.seq_len
        return 6.0 * self.num_params(matmul_only=True) + 12.0 * c.n_layer * c.n_head * c.head_dim * T

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role: Muon for hidden matrices, AdamW for the rest."""
        matrix = [p for p in self.blocks.parameters() if p.ndim == 2]
        scalar = [p for p in self.blocks.parameters() if p.ndim != 2]
        return {"matrix": matrix, "embedding": [self.wte.weight], "unembedding": [self.lm_head.weight],
                "scalar": scalar}

    # -- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, attn_mask=None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. With `targets` (B, T; -1 = ignore) returns the loss, else the
        float32 logits (B, T, V). `attn_mask` comes from `attention.document_mask`; with a
        `kv_cache` the new tokens are appended at each row's position and the cache advances.
        `logits_at` (B,) long picks one position per row and returns only its logits (B, 1, V):
        inference prefill needs just the last prompt token's, not a (B, T, V) fp32 tensor."""
        B, T = idx.shape
        positions = cache_mask = None
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's {self.rotary_len} positions")
            cos, sin = self.cos[None, None, :T], self.sin[None, None, :T]
        else:
            positions = kv_cache.positions(T)
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
            cache_mask = kv_cache.mask(positions)
        x = rms_norm(self.wte(idx))
        if self.options.bf16_residual and torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, kv_cache, positions, cache_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.head(x, targets, loss_reduction, logits_at)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
             logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, unembedding, soft cap and (with targets) the loss; see `forward`."""
        x = rms_norm(x)
        if logits_at is not None:
            x = x[torch.arange(x.size(0), device=x.device), logits_at][:, None]
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if targets is not None:
            if self.options.triton_loss and logits.is_cuda:
                return triton_softcapped_cross_entropy(logits, targets, cap, loss_reduction)
            fused = self.options.fused_loss or logits.device.type == "cpu"
            loss = softcapped_cross_entropy if fused else reference_softcapped_cross_entropy
            return loss(logits, targets, cap, loss_reduction)
        logits = logits.float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def compile_regions(self, **compile_kwargs) -> "GPT":
        """torch.compile each block and the head separately (the embedding stays eager) instead of
        the whole forward: the blocks share one compiled graph, so a cold compile costs about one
        block and the head rather than `depth` blocks. Call instead of compiling the model."""
        for block in self.blocks:
            block.compile(**compile_kwargs)
        self.head = torch.compile(self.head, **compile_kwargs)
        return self


def build_model(config: ModelConfig, device: torch.device, seed: int | None = None) -> GPT:
    """Construct on the meta device, then allocate on `device` and initialise once. On CUDA the
    forward uses the fused kernels (ForwardOptions()); elsewhere the plain ops, which are what the
    CPU demo's eager step was measured with."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model.set_options(ForwardOptions() if torch.device(device).type == "cuda" else ForwardOptions.reference())
