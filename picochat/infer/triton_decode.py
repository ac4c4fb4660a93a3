"""The one-token decode step as a few hand-fused Triton kernels, for small batches on CUDA.

Why: at batch 1 a d12 decode step reads ~170 MB of weights (~50 µs at H100 bandwidth), but the
torch.compiled step launches ~190 kernels of a few µs each, so kernel count, not bytes, sets the
pace. Here one layer is five launches:
  1. RMSNorm + the fused q/k/v matrix-vector product            (`_matvec_kernel`, NORM)
  2. rotary + QK-norm of the new q and k, the new k/v written into the cache, and split-KV
     attention over the cache: each (row, head) is split along the cache into chunks that separate
     programs read, so a batch-1 step still spreads over the GPU (`_attention_kernel`)
  3. merge of the chunks' partial softmaxes + output projection + residual add (`_merge_proj_kernel`)
  4. RMSNorm + MLP up-projection + ReLU²                           (`_matvec_kernel`, NORM, RELU2)
  5. MLP down-projection + residual add                            (`_matvec_kernel`, RESIDUAL)
plus one embedding + RMSNorm kernel and one RMSNorm + lm_head + soft-cap kernel per step.

Each row reads only its own `pos + 1` cache slots (chunks past it exit at once), so the step needs
no attention windows. Numerics follow the eager model: fp32 accumulation, and intermediates are
rounded to the weights' dtype where the eager model keeps them in that dtype. The step's shapes are
fixed for a runner's rows and cache, so it is captured in a CUDA graph like the torch step.

Import only where Triton exists (CUDA machines; on CPU the Triton interpreter runs it in tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rms_scale(x_row, K: tl.constexpr, BLOCK_K: tl.constexpr, eps):
    """1 / RMS of the K values at x_row (fp32)."""
    kk = tl.arange(0, BLOCK_K)
    sq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        xk = tl.load(x_row + k0 + kk, mask=k0 + kk < K, other=0.0).to(tl.float32)
        sq += xk * xk
    return tl.rsqrt(tl.sum(sq, axis=0) / K + eps)


@triton.jit
def _matvec_kernel(X, W, Out, Res, sx, sw, so, sr, N, eps,
                   B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, RELU2: tl.constexpr,
                   RESIDUAL: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out[b, n] = epilogue(sum_k W[n, k] · prologue(X[b])[k]) for a block of BLOCK_N outputs and
    all B rows (the weight tile is read once for every row). Prologue: RMSNorm (NORM). Epilogue:
    ReLU² (RELU2), soft-cap (SOFTCAP > 0), + Res[b, n] (RESIDUAL; Res may be Out: each program
    reads and writes only its own columns)."""
    wdt = W.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BP)
    scales = tl.full([BP], 1.0, tl.float32)
    if NORM:
        for b in tl.static_range(B):
            scales = tl.where(rows == b, _rms_scale(X + b * sx, K, BLOCK_K, eps), scales)
    acc = tl.zeros([BP, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        w = tl.load(W + n[:, None] * sw + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        for b in tl.static_range(B):
            xk = tl.load(X + b * sx + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:  # eager rounds the normed input to the weights' dtype
                xk = (xk * tl.sum(tl.where(rows == b, scales, 0.0), axis=0)).to(wdt).to(tl.float32)
            acc = tl.where(rows[:, None] == b, acc + tl.sum(w * xk[None, :], axis=1)[None, :], acc)
    acc = acc.to(wdt).to(tl.float32)  # the eager matmul's output dtype
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if SOFTCAP > 0:  # cap · tanh(x / cap), tanh written with exp (the interpreter has no tanh)
        acc = SOFTCAP * (1.0 - 2.0 / (tl.exp(2.0 * acc / SOFTCAP) + 1.0))
    mask = (rows < B)[:, None] & n_ok[None, :]
    if RESIDUAL:
        acc += tl.load(Res + rows[:, None] * sr + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * so + n[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rope_norm(ptr, half, cos, sin, eps, D: tl.constexpr, dt: tl.constexpr):
    """Rotary embedding, then RMSNorm, of the D values at ptr; returns the two halves in dtype dt."""
    x1 = tl.load(ptr + half).to(tl.float32)
    x2 = tl.load(ptr + D // 2 + half).to(tl.float32)
    r1 = (x1 * cos + x2 * sin).to(dt).to(tl.float32)
    r2 = (x2 * cos - x1 * sin).to(dt).to(tl.float32)
    scale = tl.rsqrt((tl.sum(r1 * r1, axis=0) + tl.sum(r2 * r2, axis=0)) / D + eps)
    return (r1 * scale).to(dt), (r2 * scale).to(dt)


@triton.jit
def _attention_kernel(QKV, Kc, Vc, Pos, Cos, Sin, Part, Lse,
                      s_qkv, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, s_rot, sp_b, sp_h, sp_s, sl_b, sl_h,
                      L, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_L: tl.constexpr, SCALE_LOG2: tl.constexpr):
    """Program (row b · head h, chunk c): this chunk's share of head h's attention for row b's new
    token at slot pos[b]: normalised output and log2-sum-exp of its scores. The new k/v come from
    the q/k/v buffer (rotary + norm applied here) and are written to the cache by one program."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // HKV)
    dt = Kc.dtype.element_ty
    pos = tl.load(Pos + b)
    lo = chunk * CHUNK
    half = tl.arange(0, D // 2)
    d = tl.arange(0, D)
    cos = tl.load(Cos + pos * s_rot + half).to(tl.float32)
    sin = tl.load(Sin + pos * s_rot + half).to(tl.float32)
    row = QKV + b * s_qkv
    q1, q2 = _rope_norm(row + h * D, half, cos, sin, eps, D, QKV.dtype.element_ty)
    k1, k2 = _rope_norm(row + (H + g) * D, half, cos, sin, eps, D, dt)
    v_new = tl.load(row + (H + HKV + g) * D + d).to(dt)
    mine = (lo <= pos) & (pos < lo + CHUNK)  # the new token's slot falls in this chunk
    k_base = Kc + b * sk_b + g * sk_h
    v_base = Vc + b * sv_b + g * sv_h
    writer = mine & (h % (H // HKV) == 0) & (pos < L)
    tl.store(k_base + pos * sk_l + half, k1, mask=(half >= 0) & writer)
    tl.store(k_base + pos * sk_l + D // 2 + half, k2, mask=(half >= 0) & writer)
    tl.store(v_base + pos * sv_l + d, v_new, mask=(d >= 0) & writer)

    q1 = q1.to(tl.float32) * SCALE_LOG2
    q2 = q2.to(tl.float32) * SCALE_LOG2
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    hi = tl.minimum(lo + CHUNK, pos)  # cached slots [lo, hi): earlier tokens (the new one is in registers)
    # a fixed trip count (masked blocks past `hi` read nothing) lets the compiler issue every
    # block's loads up front; an all-masked block leaves m at -inf, hence the finite stand-in
    for i in tl.static_range(CHUNK // BLOCK_L):
        n = lo + i * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = n < hi
        ka = tl.load(k_base + n[:, None] * sk_l + half[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        kb = tl.load(k_base + n[:, None] * sk_l + D // 2 + half[None, :], mask=valid[:, None], other=0.0)
        s = tl.sum(ka * q1[None, :], axis=1) + tl.sum(kb.to(tl.float32) * q2[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_finite = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_finite)
        p = tl.exp2(s - m_finite)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    if mine:
        s_new = tl.sum(k1.to(tl.float32) * q1, axis=0) + tl.sum(k2.to(tl.float32) * q2, axis=0)
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s_new - m_new)
        acc = acc * alpha + p * v_new.to(tl.float32)
        l = l * alpha + p
        m = m_new
    tl.store(Part + b * sp_b + h * sp_h + chunk * sp_s + d, acc / tl.maximum(l, 1e-30))
    lse = tl.where(l > 0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf"))
    tl.store(Lse + b * sl_b + h * sl_h + chunk + tl.arange(0, 1), lse)


@triton.jit
def _merge_proj_kernel(Part, Lse, Pos, W, X, sp_b, sp_h, sp_s, sl_b, sl_h, sw, sx, N,
                       B: tl.constexpr, BP: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                       CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """X[b, n] += sum_k W[n, k] · y[b, k] for a block of outputs, where y (all heads) is the merge
    of the attention chunks (log-sum-exp weights), recomputed by every program from L2."""
    wdt = W.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    d = tl.arange(0, D)
    s = tl.arange(0, SPLITS)
    rows = tl.arange(0, BP)
    acc = tl.zeros([BP, BLOCK_N], tl.float32)
    for h in tl.static_range(H):
        wt = tl.load(W + n[:, None] * sw + h * D + d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        for b in tl.static_range(B):
            used = s <= tl.load(Pos + b) // CHUNK  # chunks past the row's position hold nothing
            lse = tl.load(Lse + b * sl_b + h * sl_h + s, mask=used, other=float("-inf"))
            w = tl.exp2(lse - tl.max(lse, axis=0))
            part = tl.load(Part + b * sp_b + h * sp_h + s[:, None] * sp_s + d[None, :], mask=used[:, None], other=0.0)
            y = (tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)).to(wdt).to(tl.float32)
            acc = tl.where(rows[:, None] == b, acc + tl.sum(wt * y[None, :], axis=1)[None, :], acc)
    mask = (rows < B)[:, None] & n_ok[None, :]
    ptr = X + rows[:, None] * sx + n[None, :]
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x + acc.to(wdt).to(tl.float32)).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _embed_kernel(Idx, Wte, X, s_idx, sw, sx, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """X[b] = RMSNorm(Wte[Idx[b]])."""
    b = tl.program_id(0)
    row = Wte + tl.load(Idx + b * s_idx) * sw
    scale = _rms_scale(row, K, BLOCK_K, eps)
    kk = tl.arange(0, BLOCK_K)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        x = tl.load(row + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        tl.store(X + b * sx + k0 + kk, (x * scale).to(X.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shapes; the defaults were picked on an H100 at d12 (see docs/benchmarks.md)."""
    qkv_block_n: int = 16
    fc_block_n: int = 16
    proj_block_n: int = 4
    out_block_n: int = 8
    head_block_n: int = 32
    block_k: int = 256
    chunk: int = 64  # cache slots per attention program
    block_l: int = 32  # cache slots per loop iteration inside it
    num_warps: int = 4


def supported(model) -> str | None:
    """Why `model` cannot use these kernels, or None if it can."""
    from ..model.gpt import GPT

    if not isinstance(model, GPT):
        return f"{type(model).__name__} is not a picochat GPT"
    c = model.config
    if getattr(model.blocks[0].attn, "c_qkv", None) is None:
        return "q/k/v are not fused (GPT.fuse_for_inference)"
    if c.head_dim & (c.head_dim - 1) or c.head_dim < 4:
        return f"head_dim {c.head_dim} is not a power of two"
    return None


class TritonDecoder:
    """Runs `decode_step`'s contract with the kernels above: (rows, 1) ids -> (rows, V) fp32
    logits and the greedy tokens, written to `idx`; writes the cache and advances its pos.
    Scratch buffers are made once for a cache's rows and length, so the step can be captured."""

    def __init__(self, model, rows: int, max_len: int, tiles: DecodeTiles | None = None):
        why = supported(model)
        if why:
            raise ValueError(f"Triton decode kernels cannot run this model: {why}")
        self.model, self.rows, self.max_len = model, rows, max_len
        self.tiles = t = tiles or DecodeTiles()
        c = model.config
        p = model.lm_head.weight
        dev, dt = p.device, p.dtype
        self.eps = torch.finfo(dt).eps  # F.rms_norm's default for the model's dtype
        self.splits = -(-max_len // t.chunk)
        self.x = torch.empty(rows, c.n_embd, device=dev, dtype=dt)
        self.qkv = torch.empty(rows, (c.n_head + 2 * c.n_kv_head) * c.head_dim, device=dev, dtype=dt)
        self.h = torch.empty(rows, 4 * c.n_embd, device=dev, dtype=dt)
        self.part = torch.empty(rows, c.n_head, self.splits, c.head_dim, device=dev, dtype=torch.float32)
        self.lse = torch.empty(rows, c.n_head, self.splits, device=dev, dtype=torch.float32)
        self.logits = torch.empty(rows, c.vocab_size, device=dev, dtype=torch.float32)

    def _matvec(self, x, w, out, block_n, norm=False, relu2=False, residual=False, softcap=0.0):
        N, K = w.shape
        _matvec_kernel[(triton.cdiv(N, block_n),)](
            x, w, out, out, x.stride(0), w.stride(0), out.stride(0), out.stride(0), N, self.eps,
            B=self.rows, BP=triton.next_power_of_2(self.rows), K=K, NORM=norm, RELU2=relu2, RESIDUAL=residual, SOFTCAP=float(softcap),
            BLOCK_N=block_n, BLOCK_K=min(self.tiles.block_k, triton.next_power_of_2(K)),
            num_warps=self.tiles.num_warps)

    @torch.no_grad()
    def __call__(self, model, idx: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        c, t, B = self.model.config, self.tiles, self.rows
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
        x, qkv, part, lse = self.x, self.qkv, self.part, self.lse
        wte = self.model.wte.weight
        _embed_kernel[(B,)](idx, wte, x, idx.stride(0), wte.stride(0), x.stride(0), self.eps,
                            K=c.n_embd, BLOCK_K=min(t.block_k * 4, triton.next_power_of_2(c.n_embd)))
        cos, sin = self.model.cos, self.model.sin
        for i, block in enumerate(self.model.blocks):
            attn, mlp = block.attn, block.mlp
            self._matvec(x, attn.c_qkv.weight, qkv, t.qkv_block_n, norm=True)
            k, v = cache.k[i], cache.v[i]
            _attention_kernel[(B * H, self.splits)](
                qkv, k, v, cache.pos, cos, sin, part, lse,
                qkv.stride(0), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                cos.stride(0), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                k.size(2), self.eps, H=H, HKV=Hkv, D=D, CHUNK=t.chunk, BLOCK_L=t.block_l,
                SCALE_LOG2=D ** -0.5 * LOG2E, num_warps=t.num_warps)
            w = attn.c_proj.weight
            _merge_proj_kernel[(triton.cdiv(w.size(0), t.out_block_n),)](
                part, lse, cache.pos, w, x, part.stride(0), part.stride(1), part.stride(2),
                lse.stride(0), lse.stride(1), w.stride(0), x.stride(0), w.size(0),
                B=B, BP=triton.next_power_of_2(B), H=H, D=D, CHUNK=t.chunk, SPLITS=triton.next_power_of_2(self.splits),
                BLOCK_N=t.out_block_n, num_warps=t.num_warps)
            self._matvec(x, mlp.c_fc.weight, self.h, t.fc_block_n, norm=True, relu2=True)
            self._matvec(self.h, mlp.c_proj.weight, x, t.proj_block_n, residual=True)
        self._matvec(x, self.model.lm_head.weight, self.logits, t.head_block_n, norm=True,
                     softcap=c.logit_softcap or 0.0)
        cache.pos += 1
        greedy = self.logits.argmax(dim=-1)
        idx.copy_(greedy[:, None])
        return self.logits, greedy
