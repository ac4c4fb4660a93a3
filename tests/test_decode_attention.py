"""The split-KV decode attention kernel against masked SDPA: GQA, views into a longer cache, rows
of different lengths, chunks that are empty for short rows. Runs on CUDA, or on the CPU through
Triton's interpreter (TRITON_INTERPRET=1 with triton installed); skipped where neither is possible."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 6, 6, 768, 128), (3, 4, 2, 200, 64), (5, 2, 1, 64, 32)])
def test_matches_masked_sdpa(B, H, Hkv, L, D):
    from picochat.model.decode_attention import decode_attention

    g = torch.Generator(device=DEVICE).manual_seed(B * 100 + L)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    k, v = rand(B, Hkv, L + 7, D)[:, :, :L], rand(B, Hkv, L + 7, D)[:, :, :L]  # strided views, as in the engine
    q = rand(B, H, 1, D)
    last = torch.randint(0, L, (B,), generator=g, device=DEVICE)
    last[0] = L - 1  # one row uses the whole cache
    y = decode_attention(q, k, v, last)
    mask = torch.arange(L, device=DEVICE)[None, None, None, :] <= last[:, None, None, None]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=H != Hkv)
    assert y.shape == (B, H, 1, D) and y.dtype == dtype
    err = (y.double() - ref).norm() / ref.norm()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err
