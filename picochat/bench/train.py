"""`picochat bench train`: pretraining throughput on random tokens, through the real training loop
(same model, optimizers, compile and step code as `picochat pretrain`)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..train.autobatch import is_oom_error
from ..train.snapshot import free_memory
from .record import append_records, base_record, print_json_last


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretraining tok/s, MFU and peak memory on random tokens")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--device-batch-size", default="32", help="comma list of sizes, or 'auto'")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=30, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=8,
                   help="steps left out of the figures (compile, autotune); at least 1 for the CPU-time figure")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--muon", default="picochat",
                   help="comma list: picochat (train/muon.py) and/or torch (torch.optim.Muon, the baseline)")
    p.add_argument("--sdpa", default="default",
                   help="comma list of attention backends to force: default, cudnn, flash, efficient")
    p.add_argument("--variant", default="default",
                   help="comma list of forward variants (model.gpt.ForwardOptions): default, reference, or levers "
                        "joined by + on top of the reference: loss (one-pass soft-capped CE), qkv (one q/k/v matmul), "
                        "bf16res (bfloat16 residual stream), triton (the loss as Triton kernels, CUDA); "
                        "e.g. reference,loss,loss+qkv,default+triton")
    p.add_argument("--compile-scope", default="model",
                   help="comma list: model (one whole-model graph, what training runs) and/or blocks "
                        "(GPT.compile_regions: each block and the head compiled separately)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (e.g. max-autotune-no-cudagraphs); default: torch's default")
    p.add_argument("--inductor", default="",
                   help="comma list of torch._inductor.config settings KEY=VALUE for every run of this call "
                        "(e.g. coordinate_descent_tuning=True); recorded as `inductor`")
    p.add_argument("--tokens", default="random", choices=("random", "repeat", "text"),
                   help="random: uniform tokens; repeat: each row's second half repeats its first; text: the "
                        "embedded corpus as bytes, so the loss falls and the per-step losses of variants can be "
                        "compared (a numerics check)")
    p.add_argument("--cold", action="store_true",
                   help="a fresh compile cache per run (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), so first_step_s "
                        "is a cold compile")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, profile 3 steps and print the top CUDA kernels (where time goes)")
    p.add_argument("--append", help="append JSON records to this file (e.g. docs/benchmarks/results.jsonl)")
    p.set_defaults(func=cmd_train_bench)


class RandomTokens:
    """Uniform random tokens made on the device: measures the model, not the loader."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, device: torch.device, repeat: bool = False,
                 text: bool = False):
        self.shape, self.vocab, self.device, self.repeat = (batch_size, seq_len + 1), vocab_size, device, repeat
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.text, self.pos = None, 0
        if text:  # the embedded corpus as UTF-8 bytes (token = byte): learnable, so loss curves mean something
            from ..data.corpus import generate_documents

            data = "\n\n".join(generate_documents(8000, 1234)).encode()
            self.text = torch.tensor(list(data), dtype=torch.long, device=device) % vocab_size

    def __next__(self) -> dict:
        B, n = self.shape
        if self.text is not None:
            idx = (self.pos + torch.arange(B * n, device=self.device)) % self.text.numel()
            self.pos = (self.pos + B * n) % self.text.numel()
            row = self.text[idx].view(B, n)
        elif self.repeat:  # second half = first half: learnable (induction), so losses say something
            half = torch.randint(0, self.vocab, (B, (n + 1) // 2), device=self.device, generator=self.gen)
            row = torch.cat([half, half], dim=1)[:, :n]
        else:
            row = torch.randint(0, self.vocab, self.shape, device=self.device, generator=self.gen)
        return {"inputs": row[:, :-1], "targets": row[:, 1:]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def sdpa_backend(name: str):
    """A context forcing one SDPA backend (compiled graphs trace under it), or nothing for 'default'."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ValueError(f"--sdpa: unknown backend {name!r}; choose from default, {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def measure_train(depth: int, device_batch_size: int | str, seq_len: int, vocab_size: int, steps: int,
                  warmup: int, grad_accum: int = 1, compile: bool | None = None, device: str = "auto",
                  profile: bool = False, muon: str = "picochat", sdpa: str = "default", variant: str = "default",
                  compile_scope: str = "model", compile_mode: str | None = None, tokens: str = "random",
                  cold: bool = False) -> dict:
    from ..common import detect_device
    from ..config import ModelConfig, OptimConfig, TrainConfig
    from ..model.gpt import ForwardOptions
    from ..train.loop import Trainer

    if compile_scope not in ("model", "blocks"):
        raise ValueError(f"--compile-scope: unknown scope {compile_scope!r}; choose model or blocks")
    options = ForwardOptions.parse(variant)
    if cold:
        import os
        import tempfile

        fresh = tempfile.mkdtemp(prefix="picochat-cold-compile-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    dev = detect_device(device)
    model_cfg = ModelConfig.from_depth(depth, vocab_size=vocab_size, seq_len=seq_len)
    dbs = device_batch_size if device_batch_size == "auto" else int(device_batch_size)
    # auto: the default total batch (524,288 tokens at T=2048), so every power-of-two size up to 256 is exact
    total = dbs * seq_len * grad_accum if isinstance(dbs, int) else 256 * seq_len
    cfg = TrainConfig(run="bench", depth=depth, seq_len=seq_len, device_batch_size=dbs, total_batch_tokens=total,
                      num_steps=warmup + steps, eval_every=0, sample_every=0, save_every=-1, compile=compile,
                      compile_scope=compile_scope,
                      device=device, optim=OptimConfig(muon_impl=muon))
    stats, cpu_marks = [], []  # CPU seconds used by this process (all threads) at the end of each step

    def on_step(s, t):
        stats.append(s)
        cpu_marks.append(time.process_time())

    trainer = Trainer(cfg, model_cfg, None,
                      lambda B, dist, d: RandomTokens(B, seq_len, vocab_size, d, repeat=tokens == "repeat",
                                                      text=tokens == "text"),
                      on_step=on_step, forward_options=options, compile_mode=compile_mode)
    with sdpa_backend(sdpa):
        result = trainer.train()
    timed = stats[warmup:]
    tok_s = statistics.median(s.tok_per_s for s in timed)
    mfus = [s.mfu for s in timed if s.mfu is not None]
    rec = base_record("train", dev, depth)
    rec.update(device_batch_size=result["device_batch_size"], grad_accum=result["grad_accum"], seq_len=seq_len,
               vocab_size=vocab_size, tok_per_s=round(tok_s), mfu=round(statistics.median(mfus), 4) if mfus else None,
               peak_mem_gib=round(max(s.peak_mem_gib for s in timed), 2), steps=steps,
               compile=trainer.compiled, params=trainer.model.num_params(),
               dtype="bf16" if dev.type == "cuda" else "fp32", muon=muon, sdpa=sdpa,
               step_s=round(statistics.median(s.seconds for s in timed), 4), variant=variant,
               forward_options=vars(options), compile_scope=compile_scope, compile_mode=compile_mode, tokens=tokens,
               first_step_s=round(stats[0].seconds, 2), cold_compile=cold,
               losses=[round(s.loss, 4) for s in stats])
    if dev.type == "cpu":  # on a shared CPU wall time depends on the neighbours; CPU time much less
        used = [b - a for a, b in zip(cpu_marks[warmup - 1:], cpu_marks[warmup:])] if warmup else []
        rec["cpu_s_per_step"] = round(statistics.median(used), 4) if used else None
    if profile:
        with sdpa_backend(sdpa):
            print_profile(trainer, cfg.num_steps)
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def print_profile(trainer, num_steps: int, steps: int = 3) -> None:
    """Top kernels by device time over a few more real steps of the same trainer."""
    from torch.profiler import ProfilerActivity, profile

    batches = RandomTokens(trainer.cfg.device_batch_size if isinstance(trainer.cfg.device_batch_size, int) else 32,
                           trainer.cfg.seq_len, trainer.model_cfg.vocab_size, trainer.device)
    grad_accum = trainer.cfg.total_batch_tokens // (batches.shape[0] * trainer.cfg.seq_len)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            trainer._train_step(num_steps - 1, num_steps, batches, grad_accum, 0.0, None)
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    if trainer.device.type == "cuda":
        print_kernel_categories(prof, steps)


KERNEL_CATEGORIES = (("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma")), ("attention", ("sdpa", "flash", "fmha", "cudnn")),
                     ("memcpy", ("memcpy", "memset")), ("elementwise (triton)", ("triton_",)))


def print_kernel_categories(prof, steps: int) -> None:
    """Device time per step by kind of kernel (kernels only, so nothing is counted twice)."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != DeviceType.CUDA:
            continue
        name = evt.key.lower()
        kind = next((k for k, pats in KERNEL_CATEGORIES if any(p in name for p in pats)), "other")
        totals[kind] = totals.get(kind, 0.0) + evt.self_device_time_total / 1e3 / steps
    whole = sum(totals.values()) or 1.0
    print(f"device time per step by kernel kind ({whole:.1f} ms):")
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<22}{ms:>8.2f} ms {100 * ms / whole:>6.1f}%")


def apply_inductor_settings(spec: str) -> dict:
    """Set torch._inductor.config attributes from 'key=value,...' (values as Python literals)."""
    import ast

    settings = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--inductor: expected KEY=VALUE, got {item!r}")
        import torch._inductor.config as inductor_config

        target, name = inductor_config, key.strip()
        *path, name = name.split(".")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise ValueError(f"--inductor: torch._inductor.config has no setting {key!r}")
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        setattr(target, name, parsed)
        settings[key.strip()] = parsed
    return settings


def cmd_train_bench(args: argparse.Namespace) -> int:
    inductor = apply_inductor_settings(args.inductor)
    sizes = [s.strip() for s in str(args.device_batch_size).split(",")]
    runs = [(size, muon.strip(), sdpa.strip(), variant.strip(), scope.strip()) for size in sizes
            for muon in args.muon.split(",") for sdpa in args.sdpa.split(",") for variant in args.variant.split(",")
            for scope in args.compile_scope.split(",")]
    records = []
    for size, muon, sdpa, variant, scope in runs:
        try:
            records.append(measure_train(args.depth, size, args.seq_len, args.vocab_size, args.steps, args.warmup,
                                         args.grad_accum, args.compile, args.device, args.profile, muon, sdpa,
                                         variant, scope, args.compile_mode, args.tokens, args.cold))
            if inductor:
                records[-1]["inductor"] = inductor
            append_records(args.append, records[-1:])  # as each run ends: a later one may not finish
        except Exception as e:  # noqa: BLE001 - an OOM is a result (recorded); anything else is a bug
            if not is_oom_error(e):
                raise
            from ..common import detect_device

            rec = base_record("train", detect_device(args.device), args.depth)
            rec.update(device_batch_size=size, seq_len=args.seq_len, oom=True, tok_per_s=None, mfu=None,
                       peak_mem_gib=None, muon=muon, sdpa=sdpa, variant=variant, compile_scope=scope)
            records.append(rec)
            append_records(args.append, [rec])
        finally:  # one size's compiled graphs and buffers must not crowd the next
            torch._dynamo.reset()
            free_memory()
    print(f"\n{'device':<28}{'depth':>6}{'batch':>7}{'seq':>6}{'muon':>10}{'sdpa':>9}{'variant':>20}{'scope':>7}"
          f"{'tok/s':>12}{'MFU|cpu s':>11}{'peak GiB':>10}{'1st step s':>11}")
    for r in records:
        if r.get("oom"):
            print(f"{r['gpu'][:27]:<28}{r['depth']:>6}{r['device_batch_size']:>7}{r['seq_len']:>6}{r['muon']:>10}"
                  f"{r['sdpa']:>9}{r['variant'][:19]:>20}{r['compile_scope']:>7}  out of memory")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        if r.get("cpu_s_per_step") is not None:
            mfu = f"{r['cpu_s_per_step']:.3f} s"  # CPU-seconds per step: the figure a shared CPU still gives
        print(f"{r['gpu'][:27]:<28}{r['depth']:>6}{r['device_batch_size']:>7}{r['seq_len']:>6}{r['muon']:>10}"
              f"{r['sdpa']:>9}{r['variant'][:19]:>20}{r['compile_scope']:>7}{r['tok_per_s']:>12,}{mfu:>11}"
              f"{r['peak_mem_gib']:>10}{r['first_step_s']:>11}")
    print_json_last(records if len(records) > 1 else records[0])
    return 0
