"""Chat data: tasks, real-dataset loaders on local fixtures, the task mixture and the SFT packer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.data.chat import IGNORE, PAD_DOC, SFTBatcher, TaskMixture, synthetic_mixture, synthetic_tasks
from picochat.data.tasks import SYNTHETIC_TASKS, Task
from picochat.data.tasks.gsm8k import GSM8K, annotated_answer_to_parts, final_answer
from picochat.data.tasks.mmlu import MMLU
from picochat.data.tasks.smoltalk import SmolTalk
from picochat.infer.tools import run_python_tool
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # a byte-level tokenizer (no merges): enough to render, and built instantly
    return Tokenizer({bytes([b]): b for b in range(256)})


# --------------------------------------------------------------------------------------------------
# synthetic tasks


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_synthetic_deterministic_and_renders(name: str, tok: Tokenizer) -> None:
    cls = SYNTHETIC_TASKS[name]
    a, b = cls("train", size=40, seed=3), cls("train", size=40, seed=3)
    convs = [a[i] for i in range(len(a))]
    assert convs == [b[i] for i in range(len(b))]
    assert a[-1] == a[39]
    assert convs != [cls("train", size=40, seed=4)[i] for i in range(40)]  # the seed matters
    for conv in convs + [cls("test", size=10, seed=3)[i] for i in range(10)]:
        ids, mask = tok.render_conversation(conv)
        assert ids[0] == tok.bos_id and sum(mask) > 0
        prompt = tok.render_for_completion(a.prompt(conv))  # what evaluation feeds the model
        assert prompt[-1] == tok.special("<|assistant_start|>") and ids[:len(prompt)] == prompt
        # the reference completion is judged correct by the task's own evaluator
        final = conv["messages"][-1]["content"]
        text = final if isinstance(final, str) else "".join(p["text"] for p in final if p["type"] == "text")
        assert a.evaluate(conv, text), (conv, text)
    with pytest.raises(IndexError):
        a[40]


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_synthetic_splits_do_not_overlap(name: str) -> None:
    cls = SYNTHETIC_TASKS[name]
    n = 300 if name != "identity" else 100

    def questions(split: str) -> set[str]:
        t = cls(split, size=n, seed=0)
        return {t[i]["messages"][0]["content"] for i in range(n)}

    train, test = questions("train"), questions("test")
    assert train and test and not (train & test)


def test_tool_outputs_match_the_sandbox() -> None:
    n_checked = 0
    for name in ("letter_count", "arithmetic"):
        task = SYNTHETIC_TASKS[name]("train", size=50, seed=1)
        for i in range(len(task)):
            parts = task[i]["messages"][-1]["content"]
            for call, out in zip(parts, parts[1:]):
                if call["type"] == "python":
                    assert out["type"] == "python_output"
                    assert out["text"] == run_python_tool(call["text"])
                    assert not out["text"].startswith("Error")
                    n_checked += 1
    assert n_checked == 100


def test_letter_count_answers_are_right() -> None:
    task = SYNTHETIC_TASKS["letter_count"]("train", size=30, seed=0)
    for i in range(len(task)):
        conv = task[i]
        expr = conv["messages"][-1]["content"][1]["text"]
        word, letter = expr.split("'")[1], expr.split("'")[3]
        assert conv["answer"] == str(word.count(letter))
        assert task.evaluate(conv, f"It appears {word.count(letter)} times.")
        assert not task.evaluate(conv, f"It appears {word.count(letter) + 1} times.")


def test_identity_and_facts() -> None:
    ident = SYNTHETIC_TASKS["identity"]("train", size=20, seed=0)
    assert all("picochat" in ident[i]["messages"][1]["content"] for i in range(20))
    facts = SYNTHETIC_TASKS["facts"]("train", size=20, seed=0)
    for i in range(20):
        conv = facts[i]
        assert conv["answer"] in conv["messages"][1]["content"]


# --------------------------------------------------------------------------------------------------
# real loaders on local fixture files


def test_smoltalk_parquet(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "source": "x"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                      {"role": "assistant", "content": "6"}], "source": "y"},
        {"messages": [{"role": "user", "content": "dangling"}], "source": "bad"},  # skipped: no answer
    ]
    path = tmp_path / "smol.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = SmolTalk(source=str(path))
    assert len(task) == 2 and task.n_skipped == 1
    assert task[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    for i in range(len(task)):
        ids, mask = tok.render_conversation(task[i])
        assert sum(mask) > 0


def test_mmlu_parquet_and_nested_jsonl(tmp_path: Path, tok: Tokenizer) -> None:
    flat = [{"question": "What is 2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "Sky colour?", "subject": "misc", "choices": ["red", "green", "blue", "pink"], "answer": 2}]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"train": r}) for r in flat) + "\n")
    for source in (tmp_path / "a.parquet", tmp_path / "b.jsonl"):
        task = MMLU(source=str(source))
        assert len(task) == 2
        conv = task[0]
        assert conv["answer_letter"] == "B" and conv["choices"] == ["A", "B", "C", "D"]
        assert "B. 4" in conv["messages"][0]["content"]
        assert conv["messages"][1]["content"] == "B"
        assert task.eval_type == "categorical"
        assert task.evaluate(conv, "B") and task.evaluate(conv, " (B) 4") and not task.evaluate(conv, "A")
        tok.render_conversation(conv)
    assert len(MMLU(source=str(tmp_path))) == 4  # a folder reads every data file in it


GSM_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gsm8k_annotation_conversion() -> None:
    parts = annotated_answer_to_parts(GSM_ANSWER)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output",
                                          "text"]
    assert parts[0]["text"] == "Natalia sold 48/2 = "
    assert (parts[1]["text"], parts[2]["text"]) == ("48/2", "24")
    assert (parts[4]["text"], parts[5]["text"]) == ("48+24", "72")
    assert parts[-1]["text"].endswith("#### 72")
    assert "<<" not in "".join(p["text"] for p in parts)
    # an annotation the sandbox refuses keeps the dataset's value
    odd = annotated_answer_to_parts("x <<foo*2=8>>8")
    assert odd[2] == {"type": "python_output", "text": "8"}
    assert final_answer("so #### 1,234") == "1234"


def test_gsm8k_jsonl(tmp_path: Path, tok: Tokenizer) -> None:
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "Natalia sold clips ... How many?", "answer": GSM_ANSWER}) + "\n")
    task = GSM8K(source=path)
    conv = task[0]
    assert conv["answer"] == "72"
    assert task.evaluate(conv, "... #### 72") and not task.evaluate(conv, "72")
    ids, mask = tok.render_conversation(conv)
    assert tok.special("<|python_start|>") in ids and tok.special("<|output_start|>") in ids


# --------------------------------------------------------------------------------------------------
# mixture


class Numbers(Task):
    """A task whose conversation i says i, to see exactly which items a mixture yields."""

    def __init__(self, name: str, n: int, length: int = 1):
        self.name, self.n, self.length = name, n, length

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{self.name}{index}"},
                             {"role": "assistant", "content": "x" * (self.length + index % 7)}],
                "id": f"{self.name}{index}"}


def test_mixture_weights_epochs_and_determinism() -> None:
    tasks = [Numbers("a", 10), Numbers("b", 20)]
    mix = TaskMixture(tasks, weights=[2.0, 0.5], seed=1, epochs=2)
    ids = [c["id"] for c in mix]
    assert len(ids) == len(mix) == 2 * (20 + 10)
    first = ids[:30]
    assert sum(i.startswith("a") for i in first) == 20 and len({i for i in first if i.startswith("b")}) == 10
    assert ids == [c["id"] for c in TaskMixture(tasks, weights=[2.0, 0.5], seed=1, epochs=2)]
    assert ids != [c["id"] for c in TaskMixture(tasks, weights=[2.0, 0.5], seed=2, epochs=2)]


def test_mixture_sharding_is_disjoint() -> None:
    tasks = [Numbers("a", 13), Numbers("b", 8)]
    shards = [[c["id"] for c in TaskMixture(tasks, seed=0, rank=r, world_size=4)] for r in range(4)]
    assert all(len(s) == 21 // 4 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 20


def test_mixture_resume_is_exact() -> None:
    tasks = [Numbers("a", 7), Numbers("b", 5)]
    ref = [c["id"] for c in TaskMixture(tasks, seed=5, epochs=3)]
    for cut in (0, 3, 12, 13, 30):
        mix = TaskMixture(tasks, seed=5, epochs=3)
        it = iter(mix)
        head = [next(it)["id"] for _ in range(cut)]
        state = json.loads(json.dumps(mix.state_dict()))  # state survives serialisation
        resumed = TaskMixture(tasks, seed=5, epochs=3)
        resumed.load_state_dict(state)
        assert head + [c["id"] for c in resumed] == ref
    with pytest.raises(ValueError):
        TaskMixture(tasks, seed=6, epochs=3).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# batcher


def _check_batch(batch: dict, tok: Tokenizer, B: int, T: int) -> None:
    inputs, targets, doc_ids = batch["inputs"], batch["targets"], batch["doc_ids"]
    for t in (inputs, targets, doc_ids):
        assert t.shape == (B, T) and t.dtype == torch.long
    assert batch["n_loss_tokens"] == int((targets != IGNORE).sum())
    assert batch["n_real_tokens"] == int((doc_ids != PAD_DOC).sum())
    # padding never carries a target
    assert bool((targets[doc_ids == PAD_DOC] == IGNORE).all())
    for b in range(B):
        row = doc_ids[b].tolist()
        for d in set(row) - {PAD_DOC}:
            start = row.index(d)
            assert inputs[b, start] == tok.bos_id  # every conversation starts with <|bos|>
            assert row[start:start + row.count(d)] == [d] * row.count(d)  # contiguous


def test_packed_batches_match_rendering(tok: Tokenizer) -> None:
    B, T = 3, 256  # longer than any synthetic conversation in bytes: no truncation here
    mix = synthetic_mixture("train", seed=0, size=60)
    batcher = SFTBatcher(mix, tok, B, T, mode="packed", buffer_size=16)
    # rebuild each row's conversations from the rendering and compare targets exactly
    rendered = {}
    for conv in synthetic_mixture("train", seed=0, size=60):
        ids, mask = tok.render_conversation(conv)
        rendered.setdefault(tuple(ids[:T + 1]), []).append(mask[:T + 1])
    n_conv = 0
    for batch in batcher:
        _check_batch(batch, tok, B, T)
        inputs, targets, doc_ids = batch["inputs"], batch["targets"], batch["doc_ids"]
        for b in range(B):
            row_docs = doc_ids[b].tolist()
            for d in sorted(set(row_docs) - {PAD_DOC}):
                pos = [i for i, x in enumerate(row_docs) if x == d]
                s, e = pos[0], pos[-1] + 1
                ids = inputs[b, s:e].tolist()
                # the last input position's next token is the target (or the row's spare token)
                match = [k for k in rendered if list(k[:len(ids)]) == ids and len(k) in (len(ids), len(ids) + 1)]
                assert match, "a packed conversation must be a whole rendered conversation"
                full, mask = list(match[0]), rendered[match[0]][0]
                expected = [full[t + 1] if t + 1 < len(full) and mask[t + 1] else IGNORE for t in range(len(ids))]
                if len(full) == len(ids):  # conversation ends the row exactly at the shift boundary
                    expected[-1] = int(targets[b, e - 1])
                assert targets[b, s:e].tolist() == expected
                n_conv += 1
    stats = batcher.stats
    assert n_conv == stats["conversations"] == len(mix) == 60
    assert stats["truncated"] == 0
    assert 0 < stats["padding_frac"] < 1 and 0 < stats["loss_frac"] < 1


def test_truncation_is_counted_and_logged(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    tasks = [Numbers("a", 6, length=5), Numbers("long", 2, length=300)]
    batcher = SFTBatcher(TaskMixture(tasks, seed=0), tok, 2, 64, mode="packed")
    logger = logging.getLogger("picochat")
    logger.addHandler(caplog.handler)  # picochat's logger may not propagate to the root
    try:
        batches = list(batcher)
    finally:
        logger.removeHandler(caplog.handler)
    assert batcher.stats["truncated"] == 2 and batcher.stats["truncated_tokens"] > 0
    assert any("truncated" in r.getMessage() for r in caplog.records)
    for batch in batches:
        _check_batch(batch, tok, 2, 64)
    assert batcher.stats["conversations"] == 8


def test_padded_mode_one_conversation_per_row(tok: Tokenizer) -> None:
    B, T = 4, 200
    batcher = SFTBatcher(synthetic_mixture("test", seed=1, size=10), tok, B, T, mode="padded")
    batches = list(batcher)
    assert len(batches) == 3  # 10 conversations -> 4 + 4 + 2 (+ 2 all-padding rows, fixed shape)
    for batch in batches:
        _check_batch(batch, tok, B, T)
        assert int(batch["doc_ids"].max()) == 0
    assert int((batches[-1]["doc_ids"][2:] == PAD_DOC).all()) == 1
    packed = SFTBatcher(synthetic_mixture("test", seed=1, size=10), tok, B, T, mode="packed")
    list(packed)
    assert packed.stats["padding_frac"] < batcher.stats["padding_frac"]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_batcher_resume_is_exact(tok: Tokenizer, mode: str) -> None:
    def make() -> SFTBatcher:
        return SFTBatcher(synthetic_mixture("train", seed=2, size=50, epochs=2), tok, 2, 128, mode=mode,
                          buffer_size=8)

    ref = list(make())
    for cut in (1, 4):
        batcher = make()
        it = iter(batcher)
        for _ in range(cut):
            next(it)
        state = batcher.state_dict()
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        rest = list(resumed)
        assert len(rest) == len(ref) - cut
        for got, want in zip(rest, ref[cut:]):
            for key in ("inputs", "targets", "doc_ids"):
                assert torch.equal(got[key], want[key])
            assert got["n_loss_tokens"] == want["n_loss_tokens"]


def test_synthetic_tasks_sizes() -> None:
    tasks = synthetic_tasks("train", seed=0, size=100)
    assert sum(len(t) for t in tasks) == 100
    assert {t.name for t in tasks} == set(SYNTHETIC_TASKS)


def test_url_source_goes_through_the_downloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))

    import picochat.data.download as download_mod
    from picochat.data.tasks.gsm8k import GSM8K_URLS

    fixture = tmp_path / "fixture.jsonl"
    fixture.write_text(json.dumps({"question": "q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}) + "\n")
    fetched: list[str] = []

    def fake_download(url: str, dest: Path, **kwargs) -> Path:
        fetched.append(url)
        shutil.copy(fixture, dest)
        return Path(dest)

    monkeypatch.setattr(download_mod, "download", fake_download)
    url = GSM8K_URLS["train"].replace(".parquet", ".jsonl")
    assert GSM8K(source=url)[0]["answer"] == "2"
    assert GSM8K(source=url)[0]["answer"] == "2"  # the second load finds the downloaded file
    assert fetched == [url]
    assert list((home / "downloads").rglob("*.jsonl"))
