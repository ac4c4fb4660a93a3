"""Split-KV ("flash-decoding") attention for one new query per row, in Triton (CUDA only).

Why: at batch 1 a decode step's attention has only batch x heads independent problems (6 at d12),
so a kernel that gives each (row, head) one thread block leaves most of the GPU idle and is bound by
one SM's bandwidth. Here each (row, head) is split along the cache into chunks read by separate
blocks, then a second small kernel merges the chunks' partial softmaxes (log-sum-exp weighting).
Each row reads only its own `pos + 1` cached slots, so no attention window is needed either: a row
at position 600 of a 2048-slot cache reads 600 slots, whatever the other rows hold.

`decode_attention(q, k, v, last)` = softmax(q·kᵀ/√D over slots 0..last[b]) · v, for q (B, H, 1, D)
and k, v (B, Hkv, L, D) (grouped-query heads share a kv head). Any strides with a contiguous last
dim, so views into a larger cache work. Import only where Triton exists (it is not a CPU dependency).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _partial_kernel(Q, K, V, Last, Out, Lse,
                    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_s, sl_b, sl_h,
                    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_N: tl.constexpr, SCALE_LOG2: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    n_valid = tl.load(Last + b) + 1
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, n_valid)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * SCALE_LOG2
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h
    for start in range(lo, hi, BLOCK_N):  # every block holds at least one valid slot: m stays finite
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        k = tl.load(k_base + n[:, None] * sk_l + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    out = Out + b * so_b + h * so_h + split * so_s
    tl.store(out + d, acc / tl.maximum(l, 1e-30))
    lse = tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf"))  # log2-sum-exp of the chunk
    tl.store(Lse + b * sl_b + h * sl_h + split + tl.arange(0, 1), lse)


@triton.jit
def _merge_kernel(Part, Lse, Y, sp_b, sp_h, sp_s, sl_b, sl_h, sy_b, sy_h,
                  H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, D)
    lse = tl.load(Lse + b * sl_b + h * sl_h + s, mask=s < SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # empty chunks weigh 0; chunk 0 is never empty
    part = tl.load(Part + b * sp_b + h * sp_h + s[:, None] * sp_s + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    y = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(Y + b * sy_b + h * sy_h + d, y.to(Y.dtype.element_ty))


def _splits(rows_heads: int, length: int, block_n: int, sm_count: int) -> int:
    """Enough chunks to give every SM ~4 blocks, and chunks of at most 4 cache blocks (a block's
    loads are serial within a program), but never a chunk shorter than one block."""
    want = max(-(-4 * sm_count // rows_heads), -(-length // (4 * block_n)))
    return max(1, min(want, -(-length // block_n)))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (tests on CPU)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@torch.library.triton_op("picochat::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                      sm_count: int, block_n: int) -> torch.Tensor:
    B, H, _, D = q.shape
    Hkv, L = k.size(1), k.size(2)
    splits = _splits(B * H, L, block_n, sm_count)
    chunk = -(-(-(-L // splits)) // block_n) * block_n  # chunk length: a multiple of the block
    splits = -(-L // chunk)
    part = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    y = torch.empty(B, 1, H, D, device=q.device, dtype=q.dtype)  # (B, T, H, D): what c_proj reads
    wrap = torch.library.wrap_triton
    wrap(_partial_kernel)[(B * H, splits)](
        q, k, v, last, part, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        H=H, GROUP=H // Hkv, D=D, CHUNK=chunk, BLOCK_N=block_n, SCALE_LOG2=D ** -0.5 * LOG2E)
    wrap(_merge_kernel)[(B * H,)](
        part, lse, y, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        y.stride(0), y.stride(2), H=H, D=D, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits))
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                     block_n: int = 32) -> torch.Tensor:
    """q (B, H, 1, D); k, v (B, Hkv, L, D); last (B,) long: the query's own slot. -> (B, H, 1, D).
    A custom op (torch.library.triton_op), so torch.compile traces it and CUDA graphs capture it."""
    if q.size(2) != 1 or q.size(-1) & (q.size(-1) - 1):
        raise ValueError(f"decode_attention takes one query per row and a power-of-two head dim, got {tuple(q.shape)}")
    return _decode_attention(q, k, v, last, _sm_count(q.device), block_n).transpose(1, 2)
