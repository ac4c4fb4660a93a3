"""`picochat bench tiles`: search the Triton decode step's launch shapes on this GPU.

Coordinate descent over `DecodeTiles` (columns per program of each matrix-vector product, cache
slots per attention program, warps): each candidate is timed as a CUDA-graph replay of `steps`
decode steps at context `start`..`start+steps` in a cache of `cache_len` slots, and kept if it is 1%
faster. Also times the start point without programmatic dependent launch. Prints the best tiles per
batch size (the values `DecodeTiles.for_rows` holds came from this on an H100 at d12) and the kernels
of a profiled run of them. CUDA and Triton only.
"""

from __future__ import annotations

import argparse

from ..options import int_at_least
import dataclasses
import json
import time

import torch

SPACE = dict(qkv_block_n=[8, 16, 32], out_block_n=[4, 8, 16, 32], fc_block_n=[8, 16, 32], proj_block_n=[2, 4, 8],
             head_block_n=[8, 16, 32], chunk=[16, 32, 64, 128], num_warps=[1, 2, 4],
             attn_warps=[1, 2, 4, 8], head_warps=[1, 2, 4, 8])
# buckets of 16 rows and more run the matrix products on tensor cores (tl.dot): K blocks matter too
SPACE_DOT = dict(qkv_block_n=[8, 16, 32, 64], out_block_n=[4, 8, 16, 32], fc_block_n=[8, 16, 32, 64],
                 proj_block_n=[4, 8, 16], head_block_n=[16, 32, 64, 128], dot_block_k=[64, 128, 256, 1024],
                 num_warps=[2, 4, 8], chunk=[32, 64, 128], attn_warps=[2, 4], head_warps=[2, 4, 8])


def _decoder(model, rows: int, tiles, cache_len: int, pdl: bool | None = None):
    """A Triton decoder over a fresh cache: (decoder, cache, input ids)."""
    from ..infer.triton_decode import TritonDecoder
    from ..model.attention import KVCache

    c, w = model.config, model.lm_head.weight
    cache = KVCache.allocate(c.n_layer, rows, c.n_kv_head, cache_len, c.head_dim, w.device, w.dtype)
    idx = torch.zeros(rows, 1, dtype=torch.long, device=w.device)
    return TritonDecoder(model, rows, cache_len, tiles, pdl=pdl), cache, idx


def time_step(model, rows: int, tiles, cache_len: int, start: int, steps: int, pdl: bool | None = None) -> float:
    """Best of three: µs per graph-replayed Triton decode step (`pdl` None: where the GPU has it)."""
    from ..infer.runners import capture_graph

    decoder, cache, idx = _decoder(model, rows, tiles, cache_len, pdl)
    dev = idx.device
    graph, _ = capture_graph(lambda: decoder(model, idx, cache), lambda: cache.pos.fill_(start), dev)
    best = float("inf")
    for _ in range(3):
        cache.pos.fill_(start)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


def time_torch_step(model, rows: int, cache_len: int, start: int, steps: int) -> float:
    """Best of three: µs per step of the graphed torch step (CachedRunner, the window holding
    start + steps) at the same shapes, for comparison."""
    from ..infer.runners import CachedRunner

    runner = CachedRunner(model, rows, cache_len, 1, model.lm_head.weight.dtype, graph=True, window_step=64)
    best = float("inf")
    for _ in range(3):
        runner.pos.fill_(start)
        runner.hi = start + steps
        torch.cuda.synchronize(runner.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize(runner.device)
        best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


def search(model, rows: int, cache_len: int, start: int, steps: int, passes: int, log=print):
    from ..infer.triton_decode import DecodeTiles

    tiles = DecodeTiles.for_rows(rows)
    best = time_step(model, rows, tiles, cache_len, start, steps)
    no_pdl = time_step(model, rows, tiles, cache_len, start, steps, pdl=False)
    log(f"batch {rows}: start {best:.1f} us/step (without programmatic dependent launch: {no_pdl:.1f}; "
        f"graphed torch step: {time_torch_step(model, rows, cache_len, start, steps):.1f})")
    space = SPACE_DOT if rows >= 9 else SPACE
    for p in range(passes):
        for name, values in space.items():
            for value in values:
                if getattr(tiles, name) == value:
                    continue
                cand = dataclasses.replace(tiles, **{name: value})
                try:
                    t = time_step(model, rows, cand, cache_len, start, steps)
                except Exception as e:  # e.g. a tile too big for the SM's registers or shared memory
                    log(f"  {name}={value}: failed ({type(e).__name__}: {str(e)[:120]})")
                    torch.cuda.synchronize()
                    continue
                log(f"  {name}={value}: {t:.1f}")
                if t < 0.99 * best:
                    tiles, best = cand, t
        log(f"batch {rows}, pass {p + 1}: {best:.1f} us/step with {dataclasses.asdict(tiles)}")
    return tiles, best, no_pdl


def add_tiles_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiles", help="search the Triton decode step's launch shapes on this GPU (CUDA only)")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--vocab-size", type=int_at_least(1), default=32768)
    p.add_argument("--batch-sizes", default="1,2,4,8", help="comma list")
    p.add_argument("--cache-len", type=int_at_least(1), default=1024, help="cache slots (the engine rounds to 256)")
    p.add_argument("--start", type=int_at_least(1), default=640, help="context length at the first timed step")
    p.add_argument("--steps", type=int_at_least(1), default=100, help="timed steps per candidate")
    p.add_argument("--passes", type=int_at_least(1), default=1, help="coordinate-descent passes")
    p.add_argument("--profile", action="store_true", help="print the kernels of the best tiles")
    p.add_argument("--append", help="append one JSON record per batch size to this file")
    p.set_defaults(func=cmd_tiles)


def cmd_tiles(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("picochat bench tiles: needs a CUDA GPU (the Triton decode step runs only there)")
    from ..config import ModelConfig
    from ..model.gpt import build_model
    from .record import append_records, base_record, print_json_last

    dev = torch.device("cuda")
    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab_size,
                                 seq_len=max(2048, args.start + args.steps + 1, args.cache_len))
    model = build_model(cfg, dev, seed=0).to(torch.bfloat16).eval().fuse_for_inference()
    base = base_record("tiles", dev, args.depth)
    records = []
    for rows in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
        tiles, best, no_pdl = search(model, rows, args.cache_len, args.start, args.steps, args.passes,
                                     log=lambda m: print(m, flush=True))
        records.append({**base, "batch_size": rows, "us_per_step": round(best, 1),
                        "tok_per_s_total": round(1e6 / best * rows), "us_per_step_no_pdl_start": round(no_pdl, 1),
                        "cache_len": args.cache_len, "start": args.start, "tiles": dataclasses.asdict(tiles)})
        print("BEST " + json.dumps(records[-1]["tiles"]), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            decoder, cache, idx = _decoder(model, rows, tiles, args.cache_len)
            cache.pos.fill_(args.start)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    decoder(model, idx, cache)
                torch.cuda.synchronize(dev)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=40))
    append_records(args.append, records)
    print_json_last({**base, "records": records})
    return 0
