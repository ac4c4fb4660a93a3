"""Shared fixtures: an isolated PICOCHAT_HOME and a tiny trained tokenizer on the embedded corpus.

Under pytest-xdist (`make test` runs `pytest -n auto`), each worker gets its own PICOCHAT_HOME below
the one it was given (nothing a test writes outside its `home` fixture is shared between workers) and
one thread for torch, inherited by the processes tests start: two workers of two threads each on a
2-core machine would spin-wait on each other's cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _base = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()
    os.environ["PICOCHAT_HOME"] = str(_base / f"xdist-{_WORKER}")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def _tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from picochat.config import DataConfig, TokenizerConfig

    root = tmp_path_factory.mktemp("tok")
    old = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(root)
    try:
        from picochat.tokenizer_cli import train_tokenizer

        train_tokenizer("tok", DataConfig(embedded_docs=2000), TokenizerConfig(vocab_size=512))
    finally:
        if old is None:
            os.environ.pop("PICOCHAT_HOME")
        else:
            os.environ["PICOCHAT_HOME"] = old
    return root / "runs" / "tok" / "tokenizer"


@pytest.fixture
def tiny_run(home, _tiny_tokenizer_dir) -> str:
    """A run named 'tiny' whose tokenizer (512 tokens, embedded corpus) is already trained."""
    shutil.copytree(_tiny_tokenizer_dir, home / "runs" / "tiny" / "tokenizer")
    return "tiny"


# Under `pytest -n ... --dist loadfile` a worker takes whole files, in collection order, as it frees
# up: the files that take longest on 2 cores go first, so no worker is left running a long file after
# the other has finished everything else (their own order, and every other file's, is unchanged).
# Ordered by measured wall seconds per file in `make test` (2 workers, one torch thread each), largest
# first; docs/benchmarks.md has the table.
LONGEST_FIRST = ("test_rl.py", "test_train.py", "test_faults.py", "test_engine.py", "test_execution.py",
                 "test_demo.py", "test_serve_ui.py", "test_bench_serve.py", "test_options.py", "test_train_kernels.py",
                 "test_serve_cli.py", "test_export.py", "test_serve_errors.py", "test_chat_suite.py")


def pytest_configure(config) -> None:
    # pytest-xdist (>= 3.x) reorders loadfile's files by their number of tests unless told not to, which
    # put test_rl.py (6 tests, the longest file) last; keep the collection order above instead
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
