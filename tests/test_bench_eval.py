"""`picochat bench eval` on CPU: CORE and a chat task, batched beside the eager per-item baseline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from evalkit import bigram_model, save_as_checkpoint, teach
from test_chat_suite import ARC_ROWS
from test_core_eval import write_bundle

from picochat.cli import main
from picochat.tokenizer import Tokenizer


def test_bench_eval_records(home, tiny_run, tmp_path, capsys) -> None:
    tok = Tokenizer.load(home / "runs" / tiny_run / "tokenizer")
    model = bigram_model(tok.vocab_size, {})
    teach(model, tok.special("<|assistant_start|>"), tok.encode("C")[0])
    save_as_checkpoint(model, tiny_run, "base")
    save_as_checkpoint(model, tiny_run, "sft")
    arc = tmp_path / "arc.parquet"
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), arc)
    out_file = tmp_path / "results.jsonl"
    rc = main(["bench", "eval", "--run", tiny_run, "--tasks", "core,arc-easy", "--bundle", str(write_bundle(tmp_path)),
               "--data", f"arc-easy={arc}", "--eager", "--eager-items", "2", "--device", "cpu",
               "--append", str(out_file)])
    assert rc == 0
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(r["bench"] == "eval" and {"task", "items", "seconds", "score", "mode", "gpu", "commit"} <= set(r)
               for r in records)
    by = {(r["task"], r["mode"], r["items"]): r for r in records}
    # the eager baseline and the fast mode score the same subset identically
    assert by[("core", "eager", 6)]["score"] == by[("core", "fast", 6)]["score"]
    assert by[("arc-easy", "eager", 2)]["score"] == by[("arc-easy", "fast", 2)]["score"] == 1.0
    assert by[("arc-easy", "fast", 5)]["score"] == 3 / 5  # C, except q3 (A) and q4 (E)
    assert len(out_file.read_text().splitlines()) == len(records)


def test_bench_eval_on_standin_data(home, tiny_run, tmp_path, capsys) -> None:
    from picochat.eval.core_bundle import load_tasks

    from picochat.bench.eval_standin import CORE_TASKS, write_core_bundle

    tasks = load_tasks(write_core_bundle(tmp_path / "b", 3))
    assert len(tasks) == 22 == len(CORE_TASKS) and {t.task_type for t in tasks} == {
        "multiple_choice", "schema", "language_modeling"}
    tok = Tokenizer.load(home / "runs" / tiny_run / "tokenizer")
    save_as_checkpoint(bigram_model(tok.vocab_size, {}, seq_len=256), tiny_run, "base")
    rc = main(["bench", "eval", "--run", tiny_run, "--stage", "base", "--tasks", "core,mmlu", "--standin", "3",
               "--max-per-task", "2", "--device", "cpu"])
    assert rc == 0
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    core = [r for r in records if r["task"] == "core"][0]
    assert core["items"] == 44 and core["data"] == "standin"
    assert [r["items"] for r in records if r["task"] == "mmlu"] == [3] and records[-1]["data"] == "standin"
