"""The chat benchmarks end to end on data in the public layouts, served from 127.0.0.1, scored with
models whose answers are set by hand (tests/evalkit.py), and HumanEval's real problems in the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evalkit import bigram_model, save_as_checkpoint, serve_directory, teach, teach_text
from picochat.data.tasks.arc import ARC
from picochat.data.tasks.humaneval import HumanEval, program
from picochat.eval import chat_suite
from picochat.eval.chat_suite import ChatEvalConfig, chatcore, evaluate_chat
from picochat.eval.execution import available_modes, run_program
from picochat.tokenizer import Tokenizer

ARC_ROWS = [  # answers: C, C, A, E (a five-choice row), and one with digit labels ("3" -> C)
    {"id": "q1", "question": "Which is a liquid?", "choices": {"text": ["rock", "ice", "water", "salt"],
                                                                "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "q2", "question": "What do plants need?", "choices": {"text": ["dark", "noise", "light"],
                                                                  "label": ["A", "B", "C"]}, "answerKey": "C"},
    {"id": "q3", "question": "Which is warm?", "choices": {"text": ["sun", "ice", "snow", "frost"],
                                                           "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q4", "question": "Pick the fifth.", "choices": {"text": ["a", "b", "c", "d", "e"],
                                                           "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"},
    {"id": "q5", "question": "Digits?", "choices": {"text": ["one", "two", "three", "four"],
                                                   "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
]
GSM8K_ROWS = [
    {"question": "Ann has 1000 apples and buys 234 more. How many?", "answer": "1000+234=<<1000+234=1234>>1234\n#### 1,234"},
    {"question": "Tom has 7 and 70 more. How many?", "answer": "7+70=<<7+70=77>>77\n#### 77"},
    {"question": "What is 617 * 2?", "answer": "617*2=<<617*2=1234>>1234\n#### 1234"},
]
PROBLEMS = [
    {"task_id": "T/0", "prompt": "def always_true(x):\n    \"\"\"Return True.\"\"\"\n", "entry_point": "always_true",
     "canonical_solution": "    return True\n", "test": "def check(candidate):\n    assert candidate(3) is True\n"},
    {"task_id": "T/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "entry_point": "double",
     "canonical_solution": "    return 2 * x\n", "test": "def check(candidate):\n    assert candidate(2) == 4\n"},
]


@pytest.fixture
def tok(tiny_run, home) -> Tokenizer:
    return Tokenizer.load(home / "runs" / tiny_run / "tokenizer")


@pytest.fixture
def site(tmp_path) -> Path:
    """Fixture files in the public layouts: ARC and GSM8K parquet, a HumanEval jsonl."""
    root = tmp_path / "site"
    (root / "ARC-Easy").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), root / "ARC-Easy" / "test-00000-of-00001.parquet")
    (root / "main").mkdir()
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), root / "main" / "test-00000-of-00001.parquet")
    mmlu = [{"question": f"Question {i}?", "subject": "astronomy", "choices": ["w", "x", "y", "z"], "answer": a}
            for i, a in enumerate([2, 0, 2, 3])]  # "C" is right twice
    (root / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(mmlu), root / "all" / "test-00000-of-00001.parquet")
    (root / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return root


def letter_model(tok: Tokenizer):
    """Always prefers "E", then "C", after <|assistant_start|>: C wherever E is not an allowed letter."""
    model = bigram_model(tok.vocab_size, {})
    start = tok.special("<|assistant_start|>")
    teach(model, start, tok.encode("E")[0], 0.1)
    teach(model, start, tok.encode("C")[0], 0.05)
    return model


def test_arc_layout_letters_and_digit_labels(site) -> None:
    task = ARC("easy", source=site / "ARC-Easy" / "test-00000-of-00001.parquet")
    assert task.name == "arc-easy" and len(task) == 5
    assert [task[i]["answer_letter"] for i in range(5)] == ["C", "C", "A", "E", "C"]
    assert task[1]["choices"] == ["A", "B", "C"] and task[3]["choices"] == ["A", "B", "C", "D", "E"]
    assert "C. three" in task[4]["messages"][0]["content"]


def test_letter_choice_is_restricted_to_the_allowed_letters(site, tok) -> None:
    with serve_directory(site) as url:
        task = ARC("easy", source=url + "ARC-Easy/test-00000-of-00001.parquet")
    row = chat_suite.evaluate_chat_task(letter_model(tok), tok, task, ChatEvalConfig(), progress=False)
    # E where allowed (q4, right), else C: q1, q2 and q5 right, q3 (A) wrong
    assert [it["answer"] for it in row["items"]] == ["C", "C", "C", "E", "C"]
    assert row["correct"] == 4 and row["accuracy"] == 0.8
    assert row["centered"] == pytest.approx((0.8 - 0.25) / 0.75)


def test_mmlu_test_split_from_its_parquet_layout(site, tok) -> None:
    with serve_directory(site) as url:
        result = evaluate_chat(letter_model(tok), tok, ["mmlu"], ChatEvalConfig(),
                               {"mmlu": url + "all/test-00000-of-00001.parquet"}, progress=False)
    row = result["tasks"][0]
    assert row["task"] == "mmlu" and row["n"] == 4 and row["accuracy"] == 0.5
    assert result["chatcore"] == pytest.approx((0.5 - 0.25) / 0.75)


def test_gsm8k_generation_reads_the_answer_after_hashes(site) -> None:
    # a tokenizer in which "####" is one token, so a bigram model can say "#### 1,234" without repeating a token
    tok = Tokenizer.train(["The answer is here.\n#### 1,234\n"] * 300, vocab_size=400)
    assert "####" in [tok.decode([i]) for i in tok.encode("#### 1,234")]
    model = bigram_model(tok.vocab_size, {})
    teach_text(model, tok, tok.special("<|assistant_start|>"), "#### 1,234", tok.special("<|assistant_end|>"))
    with serve_directory(site) as url:
        result = evaluate_chat(model, tok, ["gsm8k"], ChatEvalConfig(max_tokens=16),
                               {"gsm8k": url + "main/test-00000-of-00001.parquet"}, progress=False)
    row = result["tasks"][0]
    assert [it["correct"] for it in row["items"]] == [True, False, True]
    assert row["items"][0]["answer"] == "#### 1,234" and result["chatcore"] == pytest.approx(2 / 3)


@pytest.mark.skipif(not available_modes(), reason="no sandbox mode runs here")
def test_humaneval_completion_runs_against_the_tests(site) -> None:
    tok = Tokenizer.train(["def f(x):\n    return True\n"] * 300, vocab_size=400)  # "    return True" in few tokens
    model = bigram_model(tok.vocab_size, {})
    teach_text(model, tok, tok.special("<|assistant_start|>"), "    return True\n", tok.special("<|assistant_end|>"))
    result = evaluate_chat(model, tok, ["humaneval"], ChatEvalConfig(max_tokens=16, sandbox_workers=2),
                           {"humaneval": str(site / "HumanEval.jsonl")}, progress=False)
    row = result["tasks"][0]
    assert [(it["id"], it["correct"]) for it in row["items"]] == [("T/0", True), ("T/1", False)]
    assert row["items"][1]["status"] == "error" and "AssertionError" in row["items"][1]["error"]
    assert result["sandbox"]["mode"] in available_modes() and result["chatcore"] == 0.5


@pytest.mark.skipif(not available_modes(), reason="no sandbox mode runs here")
def test_real_humaneval_problems_canonical_solutions_pass() -> None:
    task = HumanEval()
    assert len(task) == 164 and task[0]["task_id"] == "HumanEval/0"
    for i in (0, 1, 2, 53, 163):
        p = task[i]["problem"]
        assert run_program(program(p, p["canonical_solution"])).passed, p["task_id"]
        whole = f"```python\n{p['prompt']}{p['canonical_solution']}```"
        assert run_program(program(p, whole)).passed, p["task_id"]
        assert not run_program(program(p, "    return None\n")).passed, p["task_id"]


def test_chatcore_is_the_mean_centered_accuracy() -> None:
    rows = [{"task": "arc-easy", "accuracy": 0.55, "centered": (0.55 - 0.25) / 0.75},  # 0.4
            {"task": "gsm8k", "accuracy": 0.1, "centered": 0.1},
            {"task": "spelling", "accuracy": 0.9}]  # not a benchmark: no centered accuracy, not averaged
    assert chatcore(rows) == pytest.approx((0.4 + 0.1) / 2)
    assert chatcore([{"task": "spelling", "accuracy": 1.0}]) is None
    with pytest.raises(ValueError):
        ChatEvalConfig(max_examples=0)


def test_eval_chat_command_writes_results(site, tok, tiny_run, capsys) -> None:
    from picochat.cli import main
    from picochat.runs import read_results

    save_as_checkpoint(letter_model(tok), tiny_run, "sft")
    with serve_directory(site) as url:
        rc = main(["eval", "chat", "--run", tiny_run, "--tasks", "arc-easy,spelling", "--max-examples", "4",
                   "--max-tokens", "8", "--data", f"arc-easy={url}ARC-Easy/test-00000-of-00001.parquet",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| arc-easy | 4 | 75.00% |" in out and "ChatCORE" in out
    result = read_results(tiny_run)["chat_eval_sft"]
    assert result["stage"] == "sft" and [t["task"] for t in result["tasks"]] == ["arc-easy", "spelling"]
    assert len(result["tasks"][0]["items"]) == 4 and result["chatcore"] == pytest.approx((0.75 - 0.25) / 0.75)
    assert main(["eval", "chat", "--run", tiny_run, "--tasks", "nonesuch", "--device", "cpu"]) == 1
    assert main(["eval", "chat", "--run", tiny_run, "--data", "novalue", "--device", "cpu"]) == 1


def test_run_option_before_or_after_the_subcommand() -> None:
    from picochat.cli import build_parser

    parser = build_parser()
    for argv in (["eval", "--run", "r1", "chat"], ["eval", "chat", "--run", "r1"], ["eval", "--run", "r1", "base"]):
        assert parser.parse_args(argv).run == "r1", argv
    assert parser.parse_args(["eval", "base"]).run == "default"
