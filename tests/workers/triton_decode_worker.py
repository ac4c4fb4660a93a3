"""Compare the Triton decode step with the model's torch step (run under TRITON_INTERPRET=1 on CPU,
or natively on CUDA). Prints one JSON line of the largest differences per case; the test asserts."""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_engine import random_model  # noqa: E402

from picochat.infer.runners import decode_step  # noqa: E402
from picochat.infer.triton_decode import DecodeTiles, TritonDecoder  # noqa: E402
from picochat.model.attention import KVCache  # noqa: E402


def run_case(device, lens, max_len, steps, tiles):
    model = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=300, seq_len=64, device=device)
    model = copy.deepcopy(model).fuse_for_inference().eval()
    c, B = model.config, len(lens)
    caches = [KVCache.allocate(c.n_layer, B, c.n_kv_head, max_len, c.head_dim, device, torch.float32)
              for _ in range(2)]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for b, n in enumerate(lens):  # prefill each row on its own: rows hold different lengths
            ids = torch.randint(0, c.vocab_size, (1, n), generator=gen).to(device)
            for cache in caches:
                model(ids, kv_cache=KVCache([k[b:b + 1] for k in cache.k], [v[b:b + 1] for v in cache.v],
                                            cache.pos[b:b + 1]))
    decoder = TritonDecoder(model, B, max_len, tiles)
    idx = torch.randint(0, c.vocab_size, (B, 1), generator=gen).to(device)
    idx_torch, idx_triton = idx.clone(), idx.clone()
    worst = {"logits": 0.0, "cache": 0.0, "tokens_equal": True, "pos_equal": True}
    for _ in range(steps):
        with torch.no_grad():
            want, want_tok = decode_step(model, idx_torch, caches[0])
        got, got_tok = decoder(model, idx_triton, caches[1])
        worst["logits"] = max(worst["logits"], (want - got).abs().max().item())
        worst["tokens_equal"] &= torch.equal(want_tok, got_tok) and torch.equal(idx_torch, idx_triton)
        worst["pos_equal"] &= torch.equal(caches[0].pos, caches[1].pos)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        worst["cache"] = max(worst["cache"], (a - b).abs().max().item())
    return worst


def batch_case(device):
    """DecodeBatch(compile=...) keeps one spare cache slot for the compiled torch step; a Triton
    bucket of that batch must accept the cache (it once refused: "cache of 1 rows x 2081 slots;
    the runner needs 1 x 2080") and step like the torch step over the same slots."""
    from picochat.infer.batch import DecodeBatch

    model = random_model(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, vocab=300, seq_len=64, device=device)
    model = copy.deepcopy(model).fuse_for_inference().eval()
    # the torch side uncompiled (its cache then has no spare slot): only the Triton side's cache shape matters
    batches = [DecodeBatch(model, 2, 24, k_max=2, dtype=torch.float32, compile=compile,
                           kernels_for=lambda rows, k=kernels: k)
               for kernels, compile in (("torch", None), ("triton", "default"))]
    worst = {"logits": 0.0, "cache": 0.0, "tokens_equal": True, "pos_equal": True,
             "runner_kernels": [b.runner(2).kernels for b in batches]}
    for b in batches:
        b.prefill([0, 1], [[3, 4, 5], [6, 7]], [0, 0])
    for _ in range(2):
        (want, want_tok), (got, got_tok) = [b.runner(2).step() for b in batches]
        worst["logits"] = max(worst["logits"], (want - got).abs().max().item())
        worst["tokens_equal"] &= torch.equal(want_tok, got_tok)
    worst["pos_equal"] = torch.equal(batches[0].pos, batches[1].pos)
    return worst


if __name__ == "__main__":
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    small = DecodeTiles(chunk=8, qkv_block_n=16, fc_block_n=32, proj_block_n=8, out_block_n=16,
                        head_block_n=64)
    print(json.dumps({
        # three rows of different lengths across chunk and block boundaries, several splits; row 0
        # (7 tokens, chunks of 8) crosses into its second chunk at the second step, which reads what
        # the first step wrote
        "rows3_small_tiles": run_case(device, [7, 17, 9], 40, 2, small),
        # one row, default tiles (one chunk, one K block)
        "row1_default_tiles": run_case(device, [11], 40, 2, None),
        # 16 rows: the tensor-core path (tl.dot), one K block (weights read before the wait) ...
        "rows16_dot": run_case(device, [1 + (5 * b) % 19 for b in range(16)], 24, 2, None),
        # ... and K walked in blocks (normed inputs too); 20 rows in a bucket of 32 (masked rows)
        "rows20_dot_k_blocks": run_case(device, [2 + (7 * b) % 19 for b in range(20)], 24, 1,
                                        DecodeTiles.for_rows(20).__class__(**{**DecodeTiles.for_rows(20).__dict__,
                                                                              "dot_block_k": 32, "chunk": 16})),
        # a batch built for a compiled torch step (one spare cache slot) still runs Triton buckets
        "batch_with_compile_slot": batch_case(device),
    }))
