"""`picochat demo`: the whole pipeline on the embedded offline corpus, in minutes on a CPU.

tokenizer → sample batches → pretraining (loss curve, samples) → midtraining + SFT on the synthetic
chat tasks → (with --rl-steps, RL on arithmetic) → accuracy against a trivial baseline → a few chat answers. Every stage is the real one
(the same commands a user runs), only with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from .options import add_config_options, add_run_arg, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from .recipes import DEMO, DEMO_QUICK, DemoSizes

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded corpus (CPU, minutes)")
    add_run_arg(p)
    p.set_defaults(run="demo")
    add_config_options(p, DemoSizes, DEMO)
    p.add_argument("--rl-steps", type=int, default=0,
                   help="steps of RL on the synthetic arithmetic task after SFT (default: 0, none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--append", metavar="FILE", default=None,
                   help="append the demo's record (bench 'demo': CPU, seconds per stage, accuracies) to FILE, "
                        "e.g. docs/benchmarks/results.jsonl")
    p.add_argument("--quick", action="store_true",
                   help=f"a much smaller run (seconds), for smoke tests: depth {DEMO_QUICK.depth}, "
                        f"{DEMO_QUICK.pretrain_steps} pretraining steps (replaces the sizes above)")
    p.set_defaults(func=cmd_demo)


def _banner(text: str) -> None:
    print(f"\n{'━' * 78}\n  {text}\n{'━' * 78}", flush=True)


class StageClock:
    """Wall and CPU seconds (this process, all threads) per stage of the demo, for its closing table."""

    def __init__(self) -> None:
        self.seconds: dict[str, tuple[float, float]] = {}
        self._name, self._t0, self._c0 = None, 0.0, 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._t0, self._c0 = name, time.perf_counter(), time.process_time()

    def stop(self) -> None:
        if self._name is not None:
            wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
            self.seconds[self._name] = (round(wall, 1), round(cpu, 1))
            self._name = None

    def table(self) -> str:
        rows = [f"  {name:<10} {wall:7.1f} s wall {cpu:8.1f} s CPU" for name, (wall, cpu) in self.seconds.items()]
        total = [sum(v[i] for v in self.seconds.values()) for i in (0, 1)]
        return "\n".join(rows + [f"  {'total':<10} {total[0]:7.1f} s wall {total[1]:8.1f} s CPU"])


def sparkline(values: list[float], width: int = 60) -> str:
    """The loss curve as one line of block characters (high loss = tall block)."""
    if not values:
        return ""
    step = max(1, len(values) // width)
    points = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    points = [math.log(max(p, 1e-9)) for p in points]  # log scale: the first steps would flatten the rest
    lo, hi = min(points), max(points)
    blocks = "▁▂▃▄▅▆▇█"
    return "".join(blocks[min(7, int((p - lo) / max(hi - lo, 1e-9) * 7.999))] for p in points)


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import ChatDataConfig, DataConfig, TokenizerConfig, check_device, check_number
    from .recipes import CHAT_FINETUNE, DEMO, DEMO_QUICK, DemoSizes, demo_configs, scale_lr
    from .runs import RunPaths
    from .tokenizer_cli import train_tokenizer

    t_start = time.time()
    run, paths = args.run, RunPaths.for_run(args.run)
    sizes = DEMO_QUICK if args.quick else config_from_args(args, DemoSizes, DEMO)
    check_device(args.device)
    check_number("rl_steps", args.rl_steps, lo=0, hi=10**6)
    configs = demo_configs(sizes, run, args.device)
    data = DataConfig()
    clock = StageClock()

    clock.start("tokenizer")
    _banner("1/5  tokenizer: byte-level BPE on the embedded corpus")
    stats = train_tokenizer(run, data, TokenizerConfig(vocab_size=sizes.tokenizer_vocab))
    print(f"learned {stats['vocab_size']} tokens from {stats['chars'] / 1e6:.1f}M characters "
          f"in {stats['seconds']:.1f}s ({stats['mb_per_s']} MB/s)")
    _show_batches(run, data, sizes.seq_len)

    clock.start("pretrain")
    _banner(f"2/5  pretraining a depth-{sizes.depth} GPT")
    from .train.cli import pretrain

    pretrain(configs["base"][0], data)
    losses = [json.loads(line)["loss"] for line in (paths.logs / "train_base.jsonl").read_text().splitlines()]
    print(f"loss {losses[0]:.2f} → {losses[-1]:.2f}   {sparkline(losses)}")
    _show_samples(run, "base")

    _banner("3/5  midtraining + SFT on the synthetic chat tasks (packed, document-masked)")
    from .train.sft import chat_train

    chat_data = ChatDataConfig(synthetic_size=sizes.synthetic_size)
    for stage in CHAT_FINETUNE:
        clock.start(stage)
        stage_cfg, lr_frac = configs[stage]
        result = chat_train(scale_lr(stage_cfg, lr_frac), chat_data)
        print(f"{stage}: {stage_cfg.num_steps} steps, final loss {result['final_loss']:.3f}, "
              f"padding {100 * result.get('padding_frac', 0):.1f}% of positions")

    last = "sft"
    if args.rl_steps > 0:
        clock.start("rl")
        _banner("3+/5  reinforcement learning on arithmetic (calculator rollouts, group advantages)")
        last = _rl(run, args.rl_steps, args.device)

    clock.start("eval")
    _banner("4/5  accuracy on held-out synthetic questions (greedy) vs a trivial baseline")
    from .eval.chat_eval import DEFAULT_TASKS, evaluate_run, format_table

    rows = evaluate_run(run, last, DEFAULT_TASKS, max_examples=sizes.eval_examples, device=args.device)
    print(format_table(rows))
    print("(trivial = the best single constant answer, chosen with hindsight on the same questions)")

    clock.start("chat")
    _banner("5/5  chatting with the model")
    from .common import detect_device
    from .config import SamplingConfig
    from .infer.chat_cli import ChatSession
    from .infer.engine import Engine
    from .runs import load_model

    model, tok, _ = load_model(run, last, detect_device(args.device))
    session = ChatSession(Engine(model, tok), tok, SamplingConfig(temperature=0.0, max_tokens=64))
    for question in ("Who are you?", "What is 23 plus 19?", "Spell the word garden.",
                     "What is the capital of France?"):
        print(f"\nyou> {question}\nbot> ", end="", flush=True)
        session.reply(question)
        session.messages.clear()
    from .report import write_report

    report = write_report(run)
    clock.stop()
    seconds = time.time() - t_start
    print(f"\ntime per stage (wall; CPU = this process's seconds on all cores):\n{clock.table()}")
    if args.append:
        _append_record(args.append, sizes, clock, rows, seconds)
    print(f"\ndemo finished in {seconds:.0f}s. Talk to it: picochat chat --run {run}")
    print(f"Or serve it (API + chat page): picochat serve --run {run}   then open http://127.0.0.1:8000/")
    print(f"report card: {report}")
    return 0


def _append_record(path: str, sizes, clock: StageClock, rows: list[dict], seconds: float) -> None:
    """One JSON line (bench "demo") with the CPU, the sizes, seconds per stage and the accuracies."""
    import os
    import sys
    from dataclasses import asdict

    import torch

    from .common import cpu_description, git_commit

    rec = {"bench": "demo", "gpu": cpu_description(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "depth": sizes.depth,
           "command": "picochat " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
           "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "seconds": round(seconds, 1),
           "cpu_seconds": round(sum(cpu for _, cpu in clock.seconds.values()), 1),
           "stage_seconds": {k: wall for k, (wall, _) in clock.seconds.items()},
           "stage_cpu_seconds": {k: cpu for k, (_, cpu) in clock.seconds.items()},
           "accuracy": {r["task"]: round(r["accuracy"], 4) for r in rows},
           "trivial": {r["task"]: round(r["trivial"], 4) for r in rows},
           "sizes": {k: v for k, v in asdict(sizes).items() if k != "chat_lr_frac"}}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"record appended to {path}")


def _rl(run: str, steps: int, device: str) -> str:
    """A short RL stage at demo sizes; returns the stage to evaluate and chat with."""
    from .config import RLConfig
    from .train.rl import rl_train

    cfg = RLConfig(run=run, num_steps=steps, prompts_per_step=8, samples_per_prompt=8, max_new_tokens=96,
                   eval_prompts=32, eval_samples=4, eval_every=0, save_every=0, lr_frac=0.2, device=device)
    r = rl_train(cfg)
    print(f"rl: {steps} steps, held-out pass@1 {r['first_eval']['pass@1']:.2f} → {r['final_eval']['pass@1']:.2f}, "
          f"pass@4 {r['first_eval']['pass@4']:.2f} → {r['final_eval']['pass@4']:.2f}")
    return "rl"


def _show_batches(run: str, data, seq_len: int) -> None:
    from .data.loader import PretrainLoader
    from .data.sources import open_source
    from .runs import load_tokenizer

    tok = load_tokenizer(run)
    loader = PretrainLoader(open_source(data), tok, batch_size=2, seq_len=seq_len)
    try:
        x, _ = next(loader)
    finally:
        loader.close()
    for i, row in enumerate(x.tolist()):
        text = tok.decode(row).replace("\n", " ⏎ ")
        print(f"sample batch row {i} ({len(row)} tokens): {text[:300]}…")


def _show_samples(run: str, stage: str) -> None:
    from .common import detect_device
    from .runs import load_model
    from .train.loop import greedy_sample

    device = detect_device("cpu")
    model, tok, _ = load_model(run, stage, device)
    for prompt in ("Once upon a time", "The capital of", "7 plus 5 is"):
        print(f"  {prompt!r} → {greedy_sample(model, tok, prompt, 24, device)!r}")
