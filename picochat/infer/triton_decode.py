"""The one-token decode step as a few hand-fused Triton kernels, on CUDA (batches up to 64 rows).

Why: at batch 1 a d12 decode step reads ~170 MB of weights (~50 µs at H100 bandwidth), but the
torch.compiled step launches ~190 kernels of a few µs each, so kernel count and launch latency, not
bytes, set the pace. Here one layer is five launches:
  1. RMSNorm + the fused q/k/v matrix-vector product                      (`_matvec_kernel`)
  2. rotary + QK-norm of the new q and k, the new k/v written into the cache, and split-KV
     attention: each (row, head) is split along the cache into chunks that separate programs read,
     so a batch-1 step still spreads over the GPU (a chunk's cached keys and values are read before
     waiting on the previous kernel); the last chunk program of a (row, head) to
     finish merges the chunks (log-sum-exp weights)                       (`_attention_kernel`)
  3. output projection + residual add                                      (`_matvec_kernel`)
  4. RMSNorm + MLP up-projection + ReLU²                                   (`_matvec_kernel`)
  5. MLP down-projection + residual add                                    (`_matvec_kernel`)
plus one embedding + RMSNorm kernel and one RMSNorm + lm_head + soft-cap + argmax kernel per step
(the greedy token is fed back as the next input and every row's position advanced there too).

On Hopper and later every launch is a programmatic dependent launch: a kernel starts while the one
before it finishes, reads its weight tile (weights never change) and only then waits for the
previous kernel's output (`gdc_wait`), so the weight reads of one kernel overlap the tail of the
last. Every kernel waits before it reads or writes anything another kernel writes.

Up to 8 rows each matrix-vector product multiplies a weight tile with every row on the CUDA cores;
from 16 rows on the rows are one small matrix product on the tensor cores (`tl.dot`, `_dot_rows`):
the step then costs about what its weights and each row's own cache cost to read.

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
INDEX_BITS = tl.constexpr(31)  # argmax keys: (orderable fp32 value) << 31 | (2^31 - 1 - index), one int64 atomic max


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    if PDL:  # let the next kernel launch now; it waits for this one's completion itself
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:  # wait until the previous kernel has finished and its writes are visible
        tl.extra.cuda.gdc_wait()


@triton.jit
def _tile_times_rows(X, sx, W, sw, N, eps, B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """This program's BLOCK_N rows of W times each of the B rows of X (RMS-normed first if NORM;
    eager rounds the normed input to the weights' dtype, so this does too): (n, n < N, a (BP,
    BLOCK_N) fp32 product rounded to the weights' dtype as eager's matmul output is). Up to 8
    rows the weight tile is read once, before waiting on the previous kernel, and multiplied
    with each row on the CUDA cores; from 16 rows on (`_dot_rows`) the rows are one small
    matrix product on the tensor cores."""
    _pdl_start(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if BP >= 16:
        acc = _dot_rows(X, sx, W, sw, n, n_ok, eps, B, BP, K, KP, NORM, BLOCK_N, PDL, BLOCK_K, PRECISION)
    else:
        acc = _row_by_row(X, sx, W, sw, n, n_ok, eps, B, BP, K, KP, NORM, BLOCK_N, PDL)
    return n, n_ok, acc.to(W.dtype.element_ty).to(tl.float32)


@triton.jit
def _row_by_row(X, sx, W, sw, n, n_ok, eps, B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr,
                KP: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """(BP, BLOCK_N) fp32: the whole weight tile read before waiting on the previous kernel, then
    each row's products summed on the CUDA cores (few rows: latency, not arithmetic, counts)."""
    k = tl.arange(0, KP)
    w = tl.load(W + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    _pdl_wait(PDL)
    rows = tl.arange(0, BP)
    acc = tl.zeros([BP, BLOCK_N], tl.float32)
    for b in range(B):
        x = tl.load(X + b * sx + k, mask=k < K, other=0.0).to(tl.float32)
        if NORM:
            x = (x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)).to(w.dtype).to(tl.float32)
        acc = tl.where(rows[:, None] == b, acc + tl.sum(w.to(tl.float32) * x[None, :], axis=1)[None, :], acc)
    return acc


@triton.jit
def _dot_rows(X, sx, W, sw, n, n_ok, eps, B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
              NORM: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """(BP, BLOCK_N) fp32: X's rows (RMS-normed if NORM, rounded to W's dtype) times W[n]ᵀ with
    tl.dot. When one K block covers K the weight tile is read before waiting on the previous
    kernel; otherwise K is walked in BLOCK_K steps after the wait (tiles too big for registers)."""
    rows = tl.arange(0, BP)
    r_ok = rows < B
    if BLOCK_K >= KP:
        k = tl.arange(0, KP)
        k_ok = k < K
        w = tl.load(W + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        _pdl_wait(PDL)
        x = tl.load(X + rows[:, None] * sx + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            x = xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / K + eps)[:, None]
        acc = tl.dot(x.to(w.dtype), tl.trans(w), input_precision=PRECISION)
    else:
        _pdl_wait(PDL)
        scale = tl.full([BP], 1.0, tl.float32)
        if NORM:
            ss = tl.zeros([BP], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xf = tl.load(X + rows[:, None] * sx + k[None, :], mask=r_ok[:, None] & (k < K)[None, :],
                             other=0.0).to(tl.float32)
                ss += tl.sum(xf * xf, axis=1)
            scale = tl.rsqrt(ss / K + eps)
        acc = tl.zeros([BP, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(W + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(X + rows[:, None] * sx + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                x = x.to(tl.float32) * scale[:, None]
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _matvec_kernel(X, W, Out, sx, sw, so, N, eps,
                   B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr,
                   RELU2: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Out[b, n] (+)= epilogue(sum_k W[n, k] · prologue(X[b])[k]) for a block of BLOCK_N outputs and
    all B rows. Prologue: RMSNorm (NORM). Epilogue: ReLU² (RELU2); RESIDUAL adds into Out (each
    program reads and writes only its own columns)."""
    n, n_ok, acc = _tile_times_rows(X, sx, W, sw, N, eps, B, BP, K, KP, NORM, BLOCK_N, PDL, BLOCK_K,
                                    PRECISION)
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    rows = tl.arange(0, BP)
    mask = (rows < B)[:, None] & n_ok[None, :]
    ptr = Out + rows[:, None] * so + n[None, :]
    if RESIDUAL:
        acc += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _head_kernel(X, W, Logits, Best, Count, Idx, Greedy, Pos, sx, sw, sl, s_idx, N, eps, n_programs,
                 B: tl.constexpr, BP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, SOFTCAP: tl.constexpr,
                 BLOCK_N: tl.constexpr, PDL: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Logits = softcap(lm_head(RMSNorm(X))) for a block of the vocabulary; each program folds its
    block's argmax into Best[b] with one atomic max, and the last program to finish writes the
    greedy tokens to Greedy and Idx (the next input), advances Pos and resets Count."""
    n, n_ok, acc = _tile_times_rows(X, sx, W, sw, N, eps, B, BP, K, KP, True, BLOCK_N, PDL, BLOCK_K,
                                    PRECISION)
    if SOFTCAP > 0:  # cap · tanh(x / cap), tanh written with exp (the interpreter has no tanh)
        acc = SOFTCAP * (1.0 - 2.0 / (tl.exp(2.0 * acc / SOFTCAP) + 1.0))
    rows = tl.arange(0, BP)
    tl.store(Logits + rows[:, None] * sl + n[None, :], acc, mask=(rows < B)[:, None] & n_ok[None, :])
    acc = tl.where(n_ok[None, :], acc, float("-inf"))
    top = tl.max(acc, axis=1)
    arg = tl.program_id(0) * BLOCK_N + tl.argmax(acc, axis=1)  # first index of the max, as torch.argmax
    bits = top.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits >= 0, bits + 2147483648, -1 - bits)  # float order as non-negative ints
    tl.atomic_max(Best + rows, (order << INDEX_BITS) | (2147483647 - arg.to(tl.int64)), mask=rows < B)
    tl.debug_barrier()  # every thread's atomics issued before this program counts itself done
    if tl.atomic_add(Count, 1) == n_programs - 1:
        key = tl.atomic_max(Best + rows, tl.zeros([BP], tl.int64), mask=rows < B)  # an atomic read of the final maxima
        tok = 2147483647 - (key & 2147483647)
        tl.store(Greedy + rows, tok, mask=rows < B)
        tl.store(Idx + rows * s_idx, tok, mask=rows < B)
        tl.store(Pos + rows, tl.load(Pos + rows, mask=rows < B) + 1, mask=rows < B)
        tl.store(Count, 0)


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
def _attention_kernel(QKV, Kc, Vc, Pos, Cos, Sin, Part, Lse, Count, Y,
                      s_qkv, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, s_rot, sp_b, sp_h, sp_s, sl_b, sl_h, sy,
                      L, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                      SPLITS: tl.constexpr, SCALE_LOG2: tl.constexpr, PDL: tl.constexpr):
    """Program (row b · head h, chunk c): chunk c's share of head h's attention for row b's new
    token at slot pos[b] (normalised output and log2-sum-exp of its scores). The new k/v come from
    the q/k/v buffer (rotary + norm applied here) and are written to the cache by one program; the
    last chunk program of (b, h) to finish merges all chunks into Y[b, h·D : (h+1)·D].

    Before waiting on the previous kernel it already reads its cached keys and values: positions
    change only in the step's last kernel and slots below pos were written by earlier steps, so
    neither can be in flight; only the q/k/v buffer needs the wait."""
    _pdl_start(PDL)
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // HKV)
    dt = Kc.dtype.element_ty
    pos = tl.load(Pos + b)
    lo = chunk * CHUNK
    if lo <= pos:  # chunks past the row's position have nothing to read
        half = tl.arange(0, D // 2)
        d = tl.arange(0, D)
        n = lo + tl.arange(0, CHUNK)
        cached = n < pos  # earlier tokens; the new one (slot pos) comes from registers
        k_base = Kc + b * sk_b + g * sk_h
        v_base = Vc + b * sv_b + g * sv_h
        ka = tl.load(k_base + n[:, None] * sk_l + half[None, :], mask=cached[:, None], other=0.0)
        kb = tl.load(k_base + n[:, None] * sk_l + D // 2 + half[None, :], mask=cached[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * sv_l + d[None, :], mask=cached[:, None], other=0.0)
        cos = tl.load(Cos + pos * s_rot + half).to(tl.float32)
        sin = tl.load(Sin + pos * s_rot + half).to(tl.float32)
        _pdl_wait(PDL)
        row = QKV + b * s_qkv
        q1, q2 = _rope_norm(row + h * D, half, cos, sin, eps, D, QKV.dtype.element_ty)
        k1, k2 = _rope_norm(row + (H + g) * D, half, cos, sin, eps, D, dt)
        v_new = tl.load(row + (H + HKV + g) * D + d).to(dt)
        mine = pos < lo + CHUNK  # the new token's slot falls in this chunk
        writer = mine & (h % (H // HKV) == 0) & (pos < L)
        tl.store(k_base + pos * sk_l + half, k1, mask=(half >= 0) & writer)
        tl.store(k_base + pos * sk_l + D // 2 + half, k2, mask=(half >= 0) & writer)
        tl.store(v_base + pos * sv_l + d, v_new, mask=(d >= 0) & writer)

        q1 = q1.to(tl.float32) * SCALE_LOG2
        q2 = q2.to(tl.float32) * SCALE_LOG2
        s = tl.sum(ka.to(tl.float32) * q1[None, :], axis=1) + tl.sum(kb.to(tl.float32) * q2[None, :], axis=1)
        s = tl.where(cached, s, float("-inf"))
        s_new = tl.sum(k1.to(tl.float32) * q1, axis=0) + tl.sum(k2.to(tl.float32) * q2, axis=0)
        s_new = tl.where(mine, s_new, float("-inf"))
        m = tl.maximum(tl.max(s, axis=0), s_new)  # finite: a used chunk holds a cached slot or the new one
        p = tl.exp2(s - m)
        p_new = tl.exp2(s_new - m)
        l = tl.sum(p, axis=0) + p_new
        acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0) + p_new * v_new.to(tl.float32)
        tl.store(Part + b * sp_b + h * sp_h + chunk * sp_s + d, acc / l)
        tl.store(Lse + b * sl_b + h * sl_h + chunk, m + tl.log2(l))
        tl.debug_barrier()  # all of this program's stores issued before it counts itself done
        last = pos // CHUNK  # chunks 0..last are used
        if tl.atomic_add(Count + bh, 1) == last:  # (acq_rel: the other chunks' stores are visible)
            c = tl.arange(0, SPLITS)
            used = c <= last
            lse = tl.load(Lse + b * sl_b + h * sl_h + c, mask=used, other=float("-inf"), cache_modifier=".cg")
            w = tl.exp2(lse - tl.max(lse, axis=0))
            part = tl.load(Part + b * sp_b + h * sp_h + c[:, None] * sp_s + d[None, :], mask=used[:, None],
                           other=0.0, cache_modifier=".cg")
            y = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
            tl.store(Y + b * sy + h * D + d, y.to(Y.dtype.element_ty))
            tl.store(Count + bh, 0)


@triton.jit
def _embed_kernel(Idx, Wte, X, Best, s_idx, sw, sx, eps, K: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """X[b] = RMSNorm(Wte[Idx[b]]); also clears row b's argmax slot for this step's head kernel."""
    _pdl_start(PDL)
    b = tl.program_id(0)
    k = tl.arange(0, KP)
    _pdl_wait(PDL)
    x = tl.load(Wte + tl.load(Idx + b * s_idx) * sw + k, mask=k < K, other=0.0).to(tl.float32)
    x = x * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    tl.store(X + b * sx + k, x.to(X.dtype.element_ty), mask=k < K)
    tl.store(Best + b + tl.arange(0, 1), tl.zeros([1], tl.int64))


# ---------------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shapes: output columns per program for each matrix-vector product, cache slots per
    attention program (`chunk`, read as one tile), warps per program. `for_rows`
    holds what a coordinate-descent search picked on an H100 at d12 (docs/benchmarks.md)."""
    qkv_block_n: int = 8
    out_block_n: int = 4
    fc_block_n: int = 8
    proj_block_n: int = 4
    head_block_n: int = 8
    chunk: int = 64
    num_warps: int = 2  # matrix-vector products
    attn_warps: int = 2
    head_warps: int = 1
    dot_block_k: int = 1024  # from 16 rows on (tensor cores): K per step; >= K reads the weight tile before waiting

    @classmethod
    def for_rows(cls, rows: int) -> "DecodeTiles":
        if rows == 1:  # 4 warps for the matrix-vector products: 228 vs 252 us per step (before the K/V prefetch)
            return cls(head_block_n=16, num_warps=4, head_warps=2)
        if rows >= 9:  # the tensor-core path; searched at 32 rows on an H200 (`bench tiles`): 554.7 us per
            # step vs 1022 for the graphed torch step; at 16 rows 388.8 vs 934, at 64 rows 970 vs 1216
            return cls(qkv_block_n=16, out_block_n=8, fc_block_n=32, proj_block_n=16, head_block_n=64,
                       num_warps=4, attn_warps=2, head_warps=4, dot_block_k=256)
        return cls()


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


def _pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


class TritonDecoder:
    """Runs `decode_step`'s contract with the kernels above: (rows, 1) ids -> (rows, V) fp32
    logits and the greedy tokens, written to `idx`; writes the cache and advances its pos.
    Scratch buffers are made once for a cache's rows and length, so the step can be captured."""

    def __init__(self, model, rows: int, max_len: int, tiles: DecodeTiles | None = None,
                 pdl: bool | None = None):
        """`pdl`: programmatic dependent launch (default: where the GPU has it, sm_90 and later)."""
        why = supported(model)
        if why:
            raise ValueError(f"Triton decode kernels cannot run this model: {why}")
        self.model, self.rows, self.max_len = model, rows, max_len
        self.tiles = t = tiles or DecodeTiles.for_rows(rows)
        if t.chunk & (t.chunk - 1) or t.dot_block_k & (t.dot_block_k - 1) or t.dot_block_k < 16:
            raise ValueError(f"chunk {t.chunk} and dot_block_k {t.dot_block_k} must be powers of two "
                             "(dot_block_k >= 16)")
        c = model.config
        p = model.lm_head.weight
        dev, dt = p.device, p.dtype
        self.eps = torch.finfo(dt).eps  # F.rms_norm's default for the model's dtype
        # fp32 products as eager computes them (tl.dot would round fp32 inputs to tf32)
        self.precision = "ieee" if dt == torch.float32 else "tf32"
        self.splits = -(-max_len // t.chunk)
        self.pdl = _pdl(dev) if pdl is None else pdl
        self.launch = {"launch_pdl": True} if self.pdl else {}
        self.x = torch.empty(rows, c.n_embd, device=dev, dtype=dt)
        self.qkv = torch.empty(rows, (c.n_head + 2 * c.n_kv_head) * c.head_dim, device=dev, dtype=dt)
        self.y = torch.empty(rows, c.n_head * c.head_dim, device=dev, dtype=dt)
        self.h = torch.empty(rows, 4 * c.n_embd, device=dev, dtype=dt)
        self.part = torch.empty(rows, c.n_head, self.splits, c.head_dim, device=dev, dtype=torch.float32)
        self.lse = torch.empty(rows, c.n_head, self.splits, device=dev, dtype=torch.float32)
        self.chunks_done = torch.zeros(rows * c.n_head, device=dev, dtype=torch.int32)
        self.logits = torch.empty(rows, c.vocab_size, device=dev, dtype=torch.float32)
        self.best = torch.zeros(rows, device=dev, dtype=torch.int64)
        self.head_done = torch.zeros(1, device=dev, dtype=torch.int32)
        self.greedy = torch.zeros(rows, device=dev, dtype=torch.long)

    def _matvec(self, x, w, out, block_n, norm=False, relu2=False, residual=False):
        N, K = w.shape
        _matvec_kernel[(triton.cdiv(N, block_n),)](
            x, w, out, x.stride(0), w.stride(0), out.stride(0), N, self.eps,
            B=self.rows, BP=triton.next_power_of_2(self.rows), K=K, KP=triton.next_power_of_2(K), NORM=norm,
            RELU2=relu2, RESIDUAL=residual, BLOCK_N=block_n, PDL=self.pdl, BLOCK_K=self.tiles.dot_block_k,
            PRECISION=self.precision, num_warps=self.tiles.num_warps, **self.launch)

    @torch.no_grad()
    def __call__(self, model, idx: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        c, t, B = self.model.config, self.tiles, self.rows
        H, Hkv, D, E = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
        x, qkv, y, part, lse = self.x, self.qkv, self.y, self.part, self.lse
        wte = self.model.wte.weight
        _embed_kernel[(B,)](idx, wte, x, self.best, idx.stride(0), wte.stride(0), x.stride(0), self.eps,
                            K=E, KP=triton.next_power_of_2(E), PDL=self.pdl, num_warps=t.num_warps, **self.launch)
        cos, sin = self.model.cos, self.model.sin
        for i, block in enumerate(self.model.blocks):
            attn, mlp = block.attn, block.mlp
            self._matvec(x, attn.c_qkv.weight, qkv, t.qkv_block_n, norm=True)
            k, v = cache.k[i], cache.v[i]
            _attention_kernel[(B * H, self.splits)](
                qkv, k, v, cache.pos, cos, sin, part, lse, self.chunks_done, y,
                qkv.stride(0), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                cos.stride(0), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                y.stride(0), k.size(2), self.eps, H=H, HKV=Hkv, D=D, CHUNK=t.chunk,
                SPLITS=triton.next_power_of_2(self.splits), SCALE_LOG2=D ** -0.5 * LOG2E, PDL=self.pdl,
                num_warps=t.attn_warps, **self.launch)
            self._matvec(y, attn.c_proj.weight, x, t.out_block_n, residual=True)
            self._matvec(x, mlp.c_fc.weight, self.h, t.fc_block_n, norm=True, relu2=True)
            self._matvec(self.h, mlp.c_proj.weight, x, t.proj_block_n, residual=True)
        w = self.model.lm_head.weight
        n_programs = triton.cdiv(w.size(0), t.head_block_n)
        _head_kernel[(n_programs,)](
            x, w, self.logits, self.best, self.head_done, idx, self.greedy, cache.pos,
            x.stride(0), w.stride(0), self.logits.stride(0), idx.stride(0), w.size(0), self.eps, n_programs,
            B=B, BP=triton.next_power_of_2(B), K=E, KP=triton.next_power_of_2(E),
            SOFTCAP=float(c.logit_softcap or 0.0), BLOCK_N=t.head_block_n, PDL=self.pdl, BLOCK_K=t.dot_block_k,
            PRECISION=self.precision, num_warps=t.head_warps, **self.launch)
        return self.logits, self.greedy
