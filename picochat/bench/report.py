"""`picochat bench report`: the optimization report's headline table, reproduced side by side.

Each benchmark runs in its own process (fresh GPU memory, its own compile caches) through the same
`picochat bench ...` commands a user runs; their JSON last lines are collected into one results
file. `--render` turns a results file into docs/benchmarks.md's headline table and PNG plots (it needs
matplotlib, so it can run on a machine other than the GPU box).

Also here: `picochat bench diversity`, the n>1 first-token check (the seed's bug shared one sampled
first token across all n rows; the engine samples every row independently).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..options import float_in, int_at_least
from .record import append_records, base_record, print_json_last

def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="reproduce the seed report's headline table, side by side")
    p.add_argument("--only", default="train,sft,decode,diversity,autobatch",
                   help="comma list of parts to run: train, sft, decode, diversity, autobatch")
    p.add_argument("--depth", type=int_at_least(1), default=12)
    p.add_argument("--results", default="docs/benchmarks/report.jsonl", help="where records are appended")
    p.add_argument("--render", action="store_true", help="only render docs from --results (no benchmarks)")
    p.add_argument("--docs", default="docs/benchmarks.md")
    p.set_defaults(func=cmd_report)

    d = sub.add_parser("diversity", help="distinct first tokens among n samples: shared (seed bug) vs independent")
    d.add_argument("--depth", type=int_at_least(1), default=12)
    d.add_argument("--num-samples", type=int_at_least(1), default=16)
    d.add_argument("--prompts", type=int_at_least(1), default=8)
    d.add_argument("--temperature", type=float_in(0.0), default=1.0)
    d.add_argument("--device", default="auto")
    d.add_argument("--append")
    d.set_defaults(func=cmd_diversity)


# ---------------------------------------------------------------------------------------------------
# the n>1 diversity check


def first_token_diversity(depth: int, num_samples: int, n_prompts: int, temperature: float, device: str) -> dict:
    """Mean count of distinct first tokens over n samples per prompt, for both sampling schemes.

    The model is random-initialised with a flattened output (logits scaled down) so the first-token
    distribution has real spread, as a trained chat model's does for open questions."""
    from ..common import detect_device
    from ..config import ModelConfig
    from ..infer.engine import Engine
    from ..infer.sampling import sample_next
    from ..model.gpt import build_model

    dev = detect_device(device)
    vocab = 4096
    model = build_model(ModelConfig.from_depth(depth, vocab_size=vocab, seq_len=512), dev, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)  # spread the random model's next-token distribution
    engine = Engine(model, None)  # random ids: no tokenizer, no tool use
    g = torch.Generator(device="cpu").manual_seed(0)
    shared, independent = [], []
    for i in range(n_prompts):
        prompt = torch.randint(0, vocab, (32,), generator=g).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt], device=dev))[0, -1:]
        gen = torch.Generator(device=dev).manual_seed(i)
        # the seed's method: one token sampled from the prefill, then broadcast to every row
        tok = sample_next(logits, temperature, None, None, gen)
        shared.append(len(set(tok.repeat(num_samples).tolist())))
        rows = engine.generate_batch([prompt], num_samples=num_samples, max_tokens=1, temperature=temperature,
                                     top_k=None, seed=i)
        independent.append(len({r[0] for r in rows}))
    return {"shared_distinct_first": sum(shared) / n_prompts,
            "independent_distinct_first": sum(independent) / n_prompts, "num_samples": num_samples}


def cmd_diversity(args: argparse.Namespace) -> int:
    from ..common import detect_device

    res = first_token_diversity(args.depth, args.num_samples, args.prompts, args.temperature, args.device)
    rec = {**base_record("diversity", detect_device(args.device), args.depth), **res}
    print(f"distinct first tokens among {args.num_samples} samples (mean over {args.prompts} prompts): "
          f"shared {res['shared_distinct_first']:.1f}, independent {res['independent_distinct_first']:.1f}")
    append_records(args.append, [rec])
    print_json_last(rec)
    return 0


# ---------------------------------------------------------------------------------------------------
# running the parts


def _bench(args: list[str]) -> list[dict]:
    """Run `picochat bench ...` in a fresh process; return its JSON last line as a list of records."""
    cmd = [sys.executable, "-m", "picochat", "bench", *args]
    print(f"$ picochat bench {' '.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        return [{"bench": args[0], "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                 "command": "picochat bench " + " ".join(args)}]
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    print(f"  done in {time.time() - t0:.0f}s", flush=True)
    if isinstance(out, dict) and "records" in out:  # benchmarks that wrap their records with a summary
        out = out["records"]
    return out if isinstance(out, list) else [out]


def run_parts(parts: list[str], depth: int) -> list[dict]:
    d = str(depth)
    records: list[dict] = []
    if "train" in parts:
        records += _bench(["train", "--depth", d, "--device-batch-size", "32,auto", "--seq-len", "2048"])
    if "sft" in parts:
        common = ["sft", "--depth", d, "--seq-len", "2048"]
        records += _tag(_bench(common + ["--batch-size", "4", "--no-compile", "--modes", "padded", "--no-pretrain"]),
                        "seed default: batch 4, eager, padded")
        records += _tag(_bench(common + ["--batch-size", "auto", "--no-compile", "--modes", "padded",
                                         "--no-pretrain"]), "auto batch, eager, padded")
        records += _tag(_bench(common + ["--batch-size", "auto", "--modes", "padded", "--no-pretrain"]),
                        "auto batch + compile, padded")
        records += _tag(_bench(common + ["--batch-size", "auto", "--modes", "packed"]),
                        "auto batch + compile, packed + document mask")
    if "decode" in parts:
        decode = ["decode", "--depth", d, "--batch-sizes", "1,8,64", "--prompt-len", "512", "--new-tokens", "256"]
        records += _bench(decode + ["--modes", "naive,eager,fast", "--kernels", "torch"])
        records += _bench(decode + ["--modes", "fast", "--kernels", "torch", "--compile"])
        records += _bench(decode + ["--modes", "fast"])  # auto: the Triton step up to batch 8
    if "diversity" in parts:
        records += _bench(["diversity", "--depth", d])
    if "autobatch" in parts:
        records += _bench(["autobatch", "--depth", d, "--steps", "20"])
    return records


def _tag(records: list[dict], label: str) -> list[dict]:
    for r in records:
        r["label"] = label
    return records


def cmd_report(args: argparse.Namespace) -> int:
    if not args.render:
        records = run_parts([p.strip() for p in args.only.split(",") if p.strip()], args.depth)
        append_records(args.results, records)
        print_json_last({"bench": "report", "records": len(records), "results": args.results})
        return 0
    from .report_render import render

    render(Path(args.results), Path(args.docs))
    return 0
