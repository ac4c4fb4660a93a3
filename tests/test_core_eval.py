"""CORE on a hand-built bundle in the DCLM layout, scored with a model whose knowledge we set by hand.

The bundle has one task of each type. The bigram model (tests/evalkit.py) is given the token chains
of the right answers of some items only, so the accuracy each task must get is known in advance."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from evalkit import bigram_model, serve_directory
from picochat.eval import core, core_bundle
from picochat.eval.core import centered_accuracy, evaluate_core
from picochat.eval.core_bundle import CORRECTED_BASELINES, load_tasks, open_bundle
from picochat.eval.loglik import Scored, score_rows
from picochat.tokenizer import Tokenizer

# Words that are single tokens of the test tokenizer, so each answer is one successor pair away.
MC_ITEMS = [  # the query's last word and the right answer differ between items
    {"query": "Zork looked", "choices": ["tree", "water", "planet", "home"], "gold": 0},
    {"query": "Mira walked", "choices": ["tree", "water", "planet", "home"], "gold": 1},
    {"query": "Tobin asked", "choices": ["tree", "water", "planet", "home"], "gold": 2},
    {"query": "Quill lived", "choices": ["tree", "water", "planet", "home"], "gold": 3},
]
SCHEMA_ITEMS = [
    {"context_options": ["They said", "They went"], "continuation": "down under", "gold": 1},
    {"context_options": ["Her friend felt", "Her friend went"], "continuation": "more help", "gold": 0},
]
LM_ITEMS = [
    {"context": "One plus", "continuation": "every year"},
    {"context": "Two minus", "continuation": "little colour"},
]
CORE_YAML = """icl_tasks:
- label: commonsense_qa
  dataset_uri: commonsense/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
- label: winograd
  dataset_uri: language/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: lambada_openai
  dataset_uri: language/lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
META_CSV = ("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
            "commonsense_qa,commonsense reasoning,multiple choice,10,1221,20,,\"four, choices\"\n"
            "winograd,language understanding,schema,0,273,50,,x\n"
            "lambada_openai,language understanding,language modeling,0,5153,0,,x\n")


def write_bundle(root: Path) -> Path:
    bundle = root / "eval_bundle"
    for rel, items in (("commonsense/mc.jsonl", MC_ITEMS), ("language/schema.jsonl", SCHEMA_ITEMS),
                       ("language/lm.jsonl", LM_ITEMS)):
        path = bundle / "eval_data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(it) + "\n" for it in items))
    (bundle / "core.yaml").write_text(CORE_YAML)
    (bundle / "eval_meta_data.csv").write_text(META_CSV)
    return bundle


@pytest.fixture
def tok(tiny_run, home) -> Tokenizer:
    return Tokenizer.load(home / "runs" / tiny_run / "tokenizer")


def knowledge(tok: Tokenizer, tasks, taught: dict[str, dict[str, int]]) -> dict[int, int]:
    """Successor pairs that make the model prefer option `taught[task][item]` of those items: the last
    context token -> that option's continuation tokens, chained (language modelling: option 0 is the
    continuation; -1 teaches a wrong next token). Fails on a conflicting pair, so the construction
    cannot silently teach something else."""
    import random

    pairs: dict[int, int] = {}
    for task in tasks:
        items = core.prepare(task, tok, 256)
        raw = core_bundle.read_items(task)
        random.Random(core.SHUFFLE_SEED).shuffle(raw)
        for it, item in zip(items, raw):
            option = taught.get(task.label, {}).get(key(item))
            if option is None:
                continue
            row = it.rows[max(option, 0)]
            span = list(row.tokens[row.start - 1:row.end])
            if option < 0:
                span = [span[0], tok.encode(" water")[0]]
            for a, b in zip(span, span[1:]):
                assert pairs.get(a, b) == b, f"conflicting successor for token {a}"
                pairs[a] = b
    return pairs


def key(item: dict) -> str:
    return json.dumps(item, sort_keys=True)


def test_centered_accuracy_by_hand() -> None:
    # 3 of 4 right on a 4-way task: (0.75 - 0.25) / 0.75 = 2/3; chance scores 0, a wrong-every-time model < 0
    assert centered_accuracy(0.75, 0.25) == pytest.approx(2 / 3)
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(0.0, 0.5) == -1.0
    assert centered_accuracy(0.5, 0.0) == 0.5
    with pytest.raises(ValueError):
        centered_accuracy(0.5, 1.0)


def test_bundle_layout_and_corrected_baselines(tmp_path) -> None:
    root = open_bundle(write_bundle(tmp_path))
    tasks = load_tasks(root)
    assert [(t.label, t.task_type, t.num_fewshot, t.delimiter) for t in tasks] == [
        ("commonsense_qa", "multiple_choice", 2, " "), ("winograd", "schema", 0, " "),
        ("lambada_openai", "language_modeling", 1, " ")]
    assert tasks[0].baseline == pytest.approx(CORRECTED_BASELINES["commonsense_qa"] / 100) == pytest.approx(0.403)
    assert load_tasks(root, baselines="bundle")[0].baseline == pytest.approx(0.20)
    assert tasks[1].baseline == 0.5 and tasks[2].baseline == 0.0


def test_fewshot_draws_exclude_the_item_and_are_fixed(tmp_path, tok) -> None:
    task = load_tasks(open_bundle(write_bundle(tmp_path)))[0]
    items = core_bundle.read_items(task)
    import random
    random.Random(core.SHUFFLE_SEED).shuffle(items)
    for i, item in enumerate(items):
        texts, gold = core.render(task, item, [])
        assert gold == item["gold"] and texts[gold] == f"{item['query']} {item['choices'][gold]}"
    first = core.prepare(task, tok, 256)
    again = core.prepare(task, tok, 256)
    assert first == again
    for i, it in enumerate(first):  # the item's own query never appears among its shots
        text = tok.decode(it.rows[0].tokens)
        assert text.count(items[i]["query"]) == 1 and text.count("\n\n") == 2


def test_core_on_a_model_that_knows_some_answers(tmp_path, tok) -> None:
    root = open_bundle(write_bundle(tmp_path))
    tasks = load_tasks(root)
    taught = {"commonsense_qa": {key(MC_ITEMS[0]): 0, key(MC_ITEMS[1]): 1, key(MC_ITEMS[3]): 3,
                                 key(MC_ITEMS[2]): 0},  # 3 of 4 right, one believed wrongly
              "winograd": {key(SCHEMA_ITEMS[0]): 1, key(SCHEMA_ITEMS[1]): 0},  # 2 of 2
              "lambada_openai": {key(LM_ITEMS[1]): 0, key(LM_ITEMS[0]): -1}}  # 1 of 2
    model = bigram_model(tok.vocab_size, knowledge(tok, tasks, taught))
    result = evaluate_core(model, tok, tasks, progress=False)
    acc = {r["task"]: r["accuracy"] for r in result["tasks"]}
    assert acc == {"commonsense_qa": 0.75, "winograd": 1.0, "lambada_openai": 0.5}
    expected = [(0.75 - 0.403) / 0.597, (1.0 - 0.5) / 0.5, 0.5]
    assert result["core"] == pytest.approx(sum(expected) / 3)
    # taught the wrong option everywhere, it gets every multiple choice and schema item wrong
    wrong = {"commonsense_qa": {key(it): (it["gold"] + 1) % 4 for it in MC_ITEMS},
             "winograd": {key(it): 1 - it["gold"] for it in SCHEMA_ITEMS}}
    result = evaluate_core(bigram_model(tok.vocab_size, knowledge(tok, tasks, wrong)), tok, tasks[:2], progress=False)
    assert [r["accuracy"] for r in result["tasks"]] == [0.0, 0.0]


def test_batched_and_eager_scoring_agree(tmp_path, tok) -> None:
    tasks = load_tasks(open_bundle(write_bundle(tmp_path)))
    model = bigram_model(tok.vocab_size, {}, strength=0.0)
    import torch
    torch.manual_seed(0)
    with torch.no_grad():  # give the blocks real work so padding and batching would show if wrong
        for p in model.blocks.parameters():
            p.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.05)
    for task in tasks:
        items = core.prepare(task, tok, model.config.seq_len)
        rows = [r for it in items for r in it.rows]
        fast = score_rows(model, rows, batch_tokens=512)
        slow = score_rows(model, rows, mode="eager", groups=[len(it.rows) for it in items])
        for a, b in zip(fast, slow):
            assert a.mean_loss == pytest.approx(b.mean_loss, rel=1e-4, abs=1e-5) and a.greedy == b.greedy


def test_rows_are_cropped_from_the_left(tok) -> None:
    row = core._crop(list(range(1, 301)), 250, 300, 256)
    assert len(row.tokens) == 256 and row.tokens[-1] == 300 and row.tokens[row.start] == 251
    with pytest.raises(ValueError):
        Scored((1, 2, 3), 0, 2)


def test_bundle_from_a_url_and_from_a_zip(tmp_path, home) -> None:
    bundle = write_bundle(tmp_path / "src")
    archive = tmp_path / "site" / "eval_bundle.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for f in bundle.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(bundle.parent))
    with serve_directory(archive.parent) as url:
        root = open_bundle(url + "eval_bundle.zip")
    assert root.is_relative_to(home) and (root / "core.yaml").read_text() == CORE_YAML
    assert [t.label for t in load_tasks(root)] == ["commonsense_qa", "winograd", "lambada_openai"]
    assert open_bundle(url + "eval_bundle.zip") == root  # downloaded once: no server needed now
    assert (open_bundle(archive) / "core.yaml").exists()
    with pytest.raises(FileNotFoundError):
        open_bundle(tmp_path / "missing")
