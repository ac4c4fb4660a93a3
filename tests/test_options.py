"""Command-line options: generated from the config dataclasses, every field reachable, and bad values
refused with one line naming the option and its allowed range (exit 2), never a traceback.

The table below lists, for every numeric or path option of every command whose options come from the
configs, values that must be refused (zero, negative, absurd, not-a-number, missing paths). A
completeness check fails when a command grows a numeric option without a row here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picochat.cli import build_parser, main
from picochat.config import (ChatDataConfig, ConfigError, DataConfig, OptimConfig, SamplingConfig, TokenizerConfig,
                             TrainConfig)

RANGE_SEED = "from 0 to 4,294,967,295"
# option -> (bad values, text of the allowed range the message must show)
TRAIN = {
    "--depth": (["-3", "100000"], "from 0 to 256"),
    "--seq-len": (["0", "-5", "1", "10000000000"], "from 2 to 1,048,576"),
    "--device-batch-size": (["0", "-1", "1000000000", "big"], "'auto' or an integer from 1 to 65,536"),
    "--total-batch-tokens": (["0", "-1", "10000000000000000"], "from 1 to"),
    "--num-steps": (["-2", "1000000000000"], "-1 or an integer from 0 to"),
    "--data-param-ratio": (["0", "-1", "1e9", "nan", "inf"], "a number > 0 and <= 1e+06"),
    "--seed": (["-1", "10000000000000"], RANGE_SEED),
    "--eval-every": (["-1", "10000000000"], "from 0 to"),
    "--eval-tokens": (["0", "-4"], "from 1 to"),
    "--sample-every": (["-1"], "from 0 to"),
    "--save-every": (["-2", "100000000000"], "from -1 to"),
    "--keep-last": (["-1"], "an integer >= 0"),
    "--device": (["gpu", "cuda:x", "tpu"], "auto, cpu, cuda, cuda:N or mps"),
    "--matrix-lr": (["-0.1", "1e6", "nan"], "from 0 to 10"),
    "--embedding-lr": (["-1", "inf"], "from 0 to 10"),
    "--unembedding-lr": (["-1", "100"], "from 0 to 10"),
    "--scalar-lr": (["-1", "11"], "from 0 to 10"),
    "--weight-decay": (["-0.5", "1e9"], "from 0 to 10"),
    "--adam-betas": ([("1.5", "0.9"), ("0.9", "-0.1"), ("1", "1")], "from 0 to 0.9999"),
    "--warmup-frac": (["-0.1", "2"], "from 0 to 1"),
    "--warmdown-frac": (["-0.1", "1.5"], "from 0 to 1"),
    "--final-lr-frac": (["-1", "1.01"], "from 0 to 1"),
    "--grad-clip": (["-1", "1e12"], "from 0 to"),
}
DATA = {
    "--num-shards": (["0", "-1", "1000000000"], "from 1 to 100,000"),
    "--embedded-docs": (["0", "-5", "1000000000000"], "from 1 to"),
    "--embedded-seed": (["-1"], RANGE_SEED),
    "--val-fraction": (["0", "-0.1", "0.9", "nan"], "a number > 0 and <= 0.5"),
    "--paths": ([("missing.txt",), ("nothing-*.jsonl",)], "existing files or globs that match files"),
    "--shard-url": (["ftp://x", "not a url"], "an http://, https:// or file:// URL"),
    "--source": ([("files",)], "at least one file or glob with --source files"),  # names --paths
}
CHAT = {
    "--epochs": (["0", "-1", "1e9"], "a number > 0 and <= 10000"),
    "--synthetic-size": (["0", "-1"], "from 1 to"),
    "--synthetic-weight": (["-1", "1e9"], "from 0 to 10000"),
    "--smoltalk": (["/no/such/smoltalk.parquet"], "an existing file or folder, or a URL"),
    "--mmlu": (["/no/such/mmlu"], "an existing file or folder, or a URL"),
    "--gsm8k": (["missing-gsm8k.jsonl"], "an existing file or folder, or a URL"),
    "--smoltalk-weight": (["-1"], "from 0 to 10000"),
    "--mmlu-weight": (["-0.5"], "from 0 to 10000"),
    "--gsm8k-weight": (["nan"], "from 0 to 10000"),
    "--buffer-size": (["0", "-3"], "from 1 to"),
    "--val-size": (["0"], "from 1 to"),
    "--data-seed": (["-1"], RANGE_SEED),
    "--init-lr-frac": (["0", "-1", "1e6"], "a number > 0 and <= 100"),
    "--mode": (["bogus"], "invalid choice"),
}
TOKENIZER = {
    "--vocab-size": (["0", "-1", "100", "10000000000"], "from 265 to 1,048,576"),
    "--max-chars": (["0", "-1"], "from 1 to"),
    "--doc-cap": (["0"], "from 1 to"),
}
SAMPLING = {
    "--temperature": (["-1", "1e9", "nan"], "from 0 to 100"),
    "--top-k": (["-1"], "from 0 to"),
    "--top-p": (["0", "-0.5", "2"], "a number > 0 and <= 1"),
    "--max-tokens": (["0", "-1"], "from 1 to"),
    "--seed": (["-1"], "from 0 to"),
    "--device": (["gpu"], "auto, cpu, cuda, cuda:N or mps"),
}
RUN_EXTRA = {
    "--mid-steps": (["-7", "10000000000"], "-1 or an integer from 0 to"),
    "--sft-steps": (["-2"], "-1 or an integer from 0 to"),
    "--eval-examples": (["-1"], "from 0 to"),
    "--rl-steps": (["-2", "10000000000"], "from -1 to"),
    "--mid": ([("num_steps=-3",), ("matrix-lr=-1",), ("init-lr-frac=0",), ("nonsense=1",), ("depth",)],
              "must be"),
    "--sft": ([("seq-len=-5",), ("adam-betas=2,0.9",), ("resume=maybe",)], "must be"),
}
DEMO = {
    "--depth": (["0", "-1", "1000"], "from 1 to 64"),
    "--batch-size": (["0", "-2"], "from 1 to 4096"),
    "--seq-len": (["0", "8"], "from 16 to 65,536"),
    "--pretrain-steps": (["0"], "from 1 to"),
    "--mid-steps": (["0"], "from 1 to"),
    "--sft-steps": (["-1"], "from 1 to"),
    "--synthetic-size": (["0"], "from 1 to"),
    "--tokenizer-vocab": (["10"], "from 265 to"),
    "--eval-examples": (["0"], "from 1 to"),
    "--chat-warmdown-frac": (["1.5"], "from 0 to 1"),
    "--seed": (["-1"], RANGE_SEED),
    "--rl-steps": (["-1", "10000000"], "from 0 to 1,000,000"),
    "--device": (["gpu"], "auto, cpu, cuda, cuda:N or mps"),
}
PREVIEW = {"--num-docs": (["0", "-1"], "from 1 to"), "--max-chars": (["0"], "from 1 to")}
DOWNLOAD = {"--num-shards": (["0"], "from 1 to 100,000"), "--first": (["-1", "1000000"], "from 0 to 100,000"),
            "--shard-url": (["gopher://x"], "an http://, https:// or file:// URL")}
CHAT_TRAIN = {**TRAIN, "--depth": (["-1", "257"], "from 0 to 256"), **CHAT}

COMMANDS: dict[tuple[str, ...], dict] = {
    ("pretrain",): {**TRAIN, "--depth": (["0", "-3", "100000"], "from 1 to 256"), **DATA},
    ("midtrain",): CHAT_TRAIN,
    ("sft",): CHAT_TRAIN,
    ("run",): {**TRAIN, "--depth": (["0", "-3"], "from 1 to 256"), **DATA, **TOKENIZER,
               **{k: v for k, v in CHAT.items() if k != "--init-lr-frac"}, **RUN_EXTRA},
    ("tokenizer", "train"): {**TOKENIZER, **DATA},
    ("tokenizer", "info"): DATA,
    ("data", "preview"): {**DATA, **PREVIEW},
    ("data", "stats"): DATA,
    ("data", "download"): DOWNLOAD,
    ("demo",): DEMO,
    ("chat",): SAMPLING,
}


def _argv(command: tuple[str, ...], option: str, value) -> list[str]:
    values = list(value) if isinstance(value, tuple) else [value]
    run = ["--run", "bad-options"] if "--run" in _flags(command) else []
    return [*command, *run, option, *values]


@functools.lru_cache(maxsize=None)  # one parser per command, not one per row of its table
def _flags(command: tuple[str, ...]) -> frozenset[str]:
    return frozenset(s for a in _subparser(command)._actions for s in a.option_strings)


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_bad_values_get_one_line_naming_option_and_range(command, home, capsys, monkeypatch, tmp_path):
    """Every row of the command's table, through the real entry point (in this process: ~0.05 s each)."""
    monkeypatch.chdir(tmp_path)  # relative "missing" paths really are missing
    wrong = []
    for option, (values, rule) in COMMANDS[command].items():
        for value in values:
            argv = _argv(command, option, value)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own refusals (not a number, not a choice)
                code = e.code
            err = capsys.readouterr().err.strip()
            shown = "--paths" if option == "--source" else option
            if code != 2 or "Traceback" in err or len(err.splitlines()) != 1 or shown not in err or rule not in err:
                wrong.append(f"picochat {' '.join(argv)} -> exit {code}: {err!r} (wanted {shown} ... {rule!r})")
    assert not wrong, "\n".join(wrong)


def _numeric_options(parser: argparse.ArgumentParser) -> set[str]:
    from picochat.options import _int_or_word

    out = set()
    for action in parser._actions:
        if action.option_strings and (action.type in (int, float, _int_or_word) or action.dest in
                                      ("paths", "smoltalk", "mmlu", "gsm8k", "device", "shard_url", "mid", "sft")):
            out.add(max(action.option_strings, key=len))
    return out


def _subparser(command: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_every_numeric_and_path_option_has_a_row(command):
    missing = _numeric_options(_subparser(command)) - set(COMMANDS[command])
    assert not missing, f"picochat {' '.join(command)}: add bad-value rows for {sorted(missing)}"


@pytest.mark.parametrize("command,classes", [
    (("pretrain",), (TrainConfig, OptimConfig, DataConfig)),
    (("sft",), (TrainConfig, OptimConfig, ChatDataConfig)),
    (("midtrain",), (TrainConfig, OptimConfig, ChatDataConfig)),
    (("run",), (TrainConfig, OptimConfig, DataConfig, ChatDataConfig, TokenizerConfig)),
    (("tokenizer", "train"), (TokenizerConfig, DataConfig)),
    (("chat",), (SamplingConfig,)),
], ids=lambda x: " ".join(x) if isinstance(x, tuple) and isinstance(x[0], str) else "")
def test_every_config_field_is_reachable(command, classes):
    flags = _flags(command)
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True) or dataclasses.is_dataclass(f.type) or f.name == "optim":
                continue
            flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
            assert flag in flags, f"{cls.__name__}.{f.name} has no option in picochat {' '.join(command)}"


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("--scalar-lr SCALAR_LR", "AdamW learning rate of everything else (default: 0.004)",
                 "--adam-betas BETA BETA", "--smoltalk PATH_OR_URL", "--init-lr-frac INIT_LR_FRAC",
                 "chat data", "(default: 65536)", "--warmdown-frac", "(default: 1.0)"):
        assert text in out, text


def test_run_reaches_every_stage(home):
    """`picochat run` options: training options follow into the chat stages unless a recipe sets
    them; --mid/--sft set any option for one stage; chat-data options reach both chat stages."""
    from picochat.pipeline import stage_configs

    smol = home / "smol.jsonl"
    smol.parent.mkdir(parents=True)
    smol.write_text("")
    args = build_parser().parse_args(
        ["run", "--depth", "4", "--total-batch-tokens", "131072", "--matrix-lr", "0.01", "--seed", "7",
         "--smoltalk", str(smol), "--vocab-size", "4096", "--mid", "matrix-lr=0.03", "eval-every=5",
         "--sft", "init-lr-frac=0.5", "num-steps=9", "adam-betas=0.9,0.99", "--sft-steps", "3"])
    c = stage_configs(args)
    assert c["tokenizer"].vocab_size == 4096 and c["chat_data"].smoltalk == str(smol)
    base, mid, sft = c["base"], c["mid"], c["sft"]
    assert (base.depth, base.seed, base.optim.matrix_lr, base.resume) == (4, 7, 0.01, True)
    assert (mid.depth, mid.seed, mid.stage) == (4, 7, "mid")
    assert mid.total_batch_tokens == 131072 and mid.eval_every == 5 and mid.optim.warmdown_frac == 0.8
    assert mid.optim.matrix_lr == pytest.approx(0.03) and mid.num_steps == -1
    assert sft.total_batch_tokens == 2**16 and sft.eval_every == 100 and sft.num_steps == 9
    assert sft.optim.matrix_lr == pytest.approx(0.01 * 0.5) and sft.optim.adam_betas == (0.9, 0.99)
    assert sft.optim.warmdown_frac == 1.0


def test_stage_defaults_come_from_the_recipes():
    from picochat.recipes import RECIPES

    parser = build_parser()
    for stage, recipe in RECIPES.items():
        args = parser.parse_args([recipe.command])
        assert args.total_batch_tokens == recipe.train.total_batch_tokens
        assert args.warmdown_frac == recipe.train.optim.warmdown_frac
        assert args.eval_every == recipe.train.eval_every
        assert getattr(args, "init_lr_frac", 1.0) == recipe.lr_frac


def test_demo_numbers_are_unchanged():
    """The demo's sizes are what `make demo` always ran (changing them changes its results)."""
    from picochat.recipes import DEMO, DEMO_QUICK, demo_configs

    c = demo_configs(DEMO, "demo", "cpu")
    base, mid, sft = (c[s][0] for s in ("base", "mid", "sft"))
    assert (base.depth, base.seq_len, base.device_batch_size, base.total_batch_tokens) == (3, 256, 8, 2048)
    assert (base.num_steps, base.eval_every, base.eval_tokens, base.sample_every, base.save_every) == \
        (300, 75, 16384, 0, 0)
    # compiled since 2026-12-02 (the same steps ~1.7x faster on CPU); --quick stays eager
    assert base.compile is True and base.optim == OptimConfig() and base.seed == TrainConfig().seed
    assert demo_configs(DEMO_QUICK, "demo", "cpu")["base"][0].compile is False
    assert demo_configs(dataclasses.replace(DEMO, compile=False), "demo", "cpu")["base"][0].compile is False
    assert (mid.num_steps, mid.eval_every, mid.total_batch_tokens, mid.optim.warmdown_frac, c["mid"][1]) == \
        (450, 0, 2048, 0.5, 1.0)
    assert (sft.num_steps, sft.eval_every, sft.optim.warmdown_frac, c["sft"][1]) == (150, 0, 0.5, 0.3)
    assert (DEMO.synthetic_size, DEMO.tokenizer_vocab, DEMO.eval_examples) == (8000, 4096, 60)
    assert (DEMO_QUICK.depth, DEMO_QUICK.seq_len, DEMO_QUICK.pretrain_steps, DEMO_QUICK.synthetic_size,
            DEMO_QUICK.mid_steps, DEMO_QUICK.sft_steps, DEMO_QUICK.eval_examples) == (2, 128, 30, 500, 10, 10, 20)


def test_api_and_cli_share_the_validation():
    with pytest.raises(ConfigError, match=r"TrainConfig.seq_len \(--seq-len\) must be an integer from 2 to"):
        TrainConfig(seq_len=-5)
    with pytest.raises(ValueError, match=r"OptimConfig.warmdown_frac \(--warmdown-frac\) must be at most 1 - "):
        OptimConfig(warmup_frac=0.5, warmdown_frac=0.6)
    with pytest.raises(ConfigError, match=r"ChatDataConfig.seed \(--data-seed\)"):
        ChatDataConfig(seed=-1)
    with pytest.raises(ConfigError, match=r"depth \(--depth\) must be an integer from 1 to 256"):
        TrainConfig(depth=0)
    assert TrainConfig(stage="sft", depth=0).depth == 0  # chat stages: depth from the checkpoint


# -- the real command, as a new user types it ---------------------------------------------------------


def _picochat(home, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "picochat", *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=home.parent)


@pytest.mark.parametrize("argv,needle", [
    (("pretrain", "--device-batch-size", "0"), "--device-batch-size must be 'auto' or an integer from 1 to"),
    (("pretrain", "--seq-len", "-5"), "--seq-len must be an integer from 2 to"),
    (("sft", "--smoltalk", "nowhere.parquet"), "--smoltalk must be an existing file or folder, or a URL"),
])
def test_real_command_refuses_bad_options(home, argv, needle):
    home.mkdir(parents=True, exist_ok=True)
    proc = _picochat(home, *argv)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_cpu_machine(home):
    home.mkdir(parents=True, exist_ok=True)
    proc = _picochat(home, "pretrain", "--device", "cuda")
    assert proc.returncode == 2 and "--device must be auto or cpu here" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_tokenizer_on_too_little_text(home):
    """No text: refused. Too little for the vocabulary asked: trained, and it says so."""
    home.mkdir(parents=True, exist_ok=True)
    empty, small = home.parent / "empty.txt", home.parent / "small.txt"
    empty.write_text("")
    small.write_text("the cat sat on the mat.\n\nthe dog sat on the log.\n" * 3)
    proc = _picochat(home, "tokenizer", "train", "--source", "files", "--paths", str(empty))
    assert proc.returncode == 2 and "--paths must be files with text in them" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (home / "runs" / "default" / "tokenizer").exists()
    proc = _picochat(home, "tokenizer", "train", "--paths", str(small), "--vocab-size", "1000")
    said = " ".join(proc.stderr.split())  # the log handler wraps long lines
    assert proc.returncode == 0, proc.stderr
    assert "learned only" in said and "of the 1000 tokens asked for" in said, said


def test_cli_lets_waiting_cpu_threads_sleep_on_a_busy_machine():
    """OMP_WAIT_POLICY: passive when the load exceeds half the cores and work is still running now,
    OpenMP's default otherwise; set before anything imports torch in the CLI's process, and a value
    the user set wins."""
    from picochat.cli import busy_cores_now, cpu_wait_policy

    def never():
        raise AssertionError("a low load average needs no sample")

    assert cpu_wait_policy(7.0, 2, lambda: 1.9) == "PASSIVE" and cpu_wait_policy(1.1, 2, lambda: 0.8) == "PASSIVE"
    assert cpu_wait_policy(1.1, 2, lambda: None) == "PASSIVE"  # no /proc/stat: trust the average
    assert cpu_wait_policy(1.1, 2, lambda: 0.1) is None  # the average remembers an install that has ended
    assert cpu_wait_policy(0.4, 2, never) is None and cpu_wait_policy(3.0, 8, never) is None
    if Path("/proc/stat").exists():  # the real sample sees a spinning child (and whatever else runs)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            busy = busy_cores_now(0.5)
        finally:
            spinner.kill()
            spinner.wait()
        assert busy is not None and 0.7 <= busy <= (os.cpu_count() or 1) + 0.01, busy
    code = ("import os, sys; from picochat.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["ACTIVE", "False"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1] == "False" and out.stdout.split()[-2] in ("PASSIVE", "None"), out.stdout
