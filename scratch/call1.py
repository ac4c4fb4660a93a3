"""Device call 1 (scratch, not product code): tiles search for the tensor-core Triton step at 32
rows, then the batch bench with those tiles and Triton up to 32 rows (+ profiles), then the old
configuration (Triton up to 8 rows) for a same-run comparison."""
import argparse, dataclasses, json, os, sys, time
import torch
from picochat.bench import tiles as T
from picochat.bench.batch import add_batch_parser
from picochat.config import ModelConfig
from picochat.model.gpt import build_model
from picochat.infer import triton_decode

out = os.environ.get("OUT", "/tmp")
t0 = time.time()
dev = torch.device("cuda")
model = build_model(ModelConfig.from_depth(12, vocab_size=32768, seq_len=2048), dev, seed=0).to(torch.bfloat16).eval().fuse_for_inference()
best_tiles = None
try:
    for rows in (32,):
        tiles, best, no_pdl = T.search(model, rows, 2080, 384, 30, 1, log=lambda m: print(m, flush=True))
        best_tiles = tiles
        print("BEST", rows, round(best, 1), json.dumps(dataclasses.asdict(tiles)), flush=True)
    tt = T.time_step(model, 16, best_tiles, 2080, 384, 30)
    print(f"batch 16 with the 32-row tiles: {tt:.1f} us/step; torch {T.time_torch_step(model, 16, 2080, 384, 30):.1f}", flush=True)
    tt = T.time_step(model, 64, best_tiles, 2080, 384, 30)
    print(f"batch 64 with the 32-row tiles: {tt:.1f} us/step; torch {T.time_torch_step(model, 64, 2080, 384, 30):.1f}", flush=True)
except Exception as e:
    import traceback; traceback.print_exc()
print(f"[{time.time() - t0:.0f} s] tiles done", flush=True)
del model
torch.cuda.empty_cache()
if best_tiles is not None:
    orig = triton_decode.DecodeTiles.for_rows.__func__
    triton_decode.DecodeTiles.for_rows = classmethod(lambda cls, rows: best_tiles if rows >= 9 else orig(cls, rows))

def bench(extra):
    p = argparse.ArgumentParser(); add_batch_parser(p.add_subparsers())
    args = p.parse_args(["batch", "--depth", "12"] + extra)
    args.func(args)

bench(["--concurrency", "1,32", "--modes", "continuous,static,serial", "--triton-max-rows", "32", "--profile",
       "--append", f"{out}/results.jsonl"])
print(f"[{time.time() - t0:.0f} s] new config done", flush=True)
bench(["--concurrency", "32", "--modes", "continuous,static", "--triton-max-rows", "8", "--append", f"{out}/results.jsonl"])
print(f"[{time.time() - t0:.0f} s] old config done", flush=True)
