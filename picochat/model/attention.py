"""Attention backends and the static KV cache.

Three shapes of attention, each picked once from what the call site has:
- plain causal (pretraining): SDPA `is_causal=True`, which runs flash/cuDNN kernels on CUDA;
- document-masked causal (packed SFT): FlexAttention with a block mask on CUDA (skips whole blocks
  of other documents), an equivalent boolean mask through SDPA on CPU/MPS;
- cached (inference): new queries against a preallocated cache of fixed length, masked by each row's
  position, so every decode step has the same shapes and can be compiled or captured in a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, T, D). `attn_mask` from `document_mask` or None."""
    gqa = k.size(1) != q.size(1)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(attn_mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=gqa)


def document_mask(doc_ids: torch.Tensor, use_flex: bool | None = None):
    """Mask letting each position see earlier positions of its own document only.

    doc_ids: (B, T) integers, equal within a document. Returns a FlexAttention BlockMask on CUDA
    (or when `use_flex`), else a (B, 1, T, T) boolean tensor for SDPA. Build it once per batch,
    outside the compiled model, and pass it to `GPT.forward(attn_mask=...)`."""
    if use_flex is None:
        use_flex = doc_ids.is_cuda
    B, T = doc_ids.shape
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        return create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


@dataclass
class KVCache:
    """Preallocated keys/values, one (B, Hkv, L, D) tensor per layer, plus each row's position.

    `pos[b]` is how many tokens row b holds. A forward of T new tokens writes them at
    pos[b] .. pos[b]+T-1 and then advances `pos` by T; the engine may rewind or set `pos` per row
    (e.g. after prefilling right-padded prompts of different lengths).

    One tensor per layer, not one stacked tensor, so a compiled decode step mutates each layer's
    cache in place: a write into a slice of a stacked graph input is functionalised into a copy of
    the whole stack, which costs more than the step itself at large batch."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: torch.Tensor  # (B,) long, on the cache's device
    rows: torch.Tensor = field(init=False)  # (B, 1) row index for writes: made once, not per layer per step

    def __post_init__(self):
        self.rows = torch.arange(self.pos.numel(), device=self.pos.device)[:, None]

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (batch_size, n_kv_head, max_len, head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def view(self, rows: int | None = None, length: int | None = None) -> "KVCache":
        """The first `rows` rows and `length` slots, sharing storage (writes land in this cache)."""
        r, n = slice(None, rows), slice(None, length)
        return KVCache([k[r, :, n] for k in self.k], [v[r, :, n] for v in self.v], self.pos[r])

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) absolute positions of the next T tokens of each row."""
        return self.pos[:, None] + torch.arange(T, device=self.pos.device)[None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new keys/values (B, Hkv, T, D) at `positions` (B, T), without a host sync."""
        # advanced indices on dims 0 and 2 put their (B, T) shape first: values are (B, T, Hkv, D)
        self.k[layer][self.rows, :, positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][self.rows, :, positions] = v.transpose(1, 2).to(self.v[layer].dtype)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, L) boolean: query at position p sees cached slots 0..p."""
        slots = torch.arange(self.max_len, device=positions.device)
        return slots[None, None, None, :] <= positions[:, None, :, None]

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k, v = self.k[layer].to(q.dtype), self.v[layer].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1))
