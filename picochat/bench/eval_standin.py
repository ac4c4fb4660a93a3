"""Stand-in evaluation data for timing on a machine that cannot download the real sets.

`write_standin(root, items)` writes, in the exact public layouts, data of the real sets' shapes:
- a CORE bundle with the 22 tasks nanochat's core.yaml lists (label, task type, few-shot count and
  continuation delimiter as there; facts, from DCLM's eval configs) and `items` items each;
- ARC-Easy / ARC-Challenge / MMLU parquet (question and four choices) and GSM8K parquet.
The text is random words of roughly each task's typical length (our rough estimate, not measured),
so the timings show how the batching behaves at realistic sizes; the scores mean nothing. Benchmark
records made on it say `"data": "standin"`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# label: (type, shots, delimiter, words in the query/context, words per choice/continuation, options)
CORE_TASKS: dict[str, tuple[str, int, str, int, int, int]] = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 40, 20, 4),
    "jeopardy": ("language_modeling", 10, "\nAnswer: ", 25, 3, 1),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 10, 2, 1),
    "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 25, 4, 4),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 30, 5, 4),
    "copa": ("multiple_choice", 0, " ", 12, 8, 2),
    "commonsense_qa": ("multiple_choice", 10, " ", 15, 2, 5),
    "piqa": ("multiple_choice", 10, "\nAnswer: ", 12, 20, 2),
    "openbook_qa": ("multiple_choice", 0, " ", 15, 5, 4),
    "lambada_openai": ("language_modeling", 0, " ", 70, 1, 1),
    "hellaswag": ("multiple_choice", 10, " ", 40, 20, 4),
    "winograd": ("schema", 0, " ", 12, 8, 2),
    "winogrande": ("schema", 0, " ", 15, 6, 2),
    "bigbench_dyck_languages": ("language_modeling", 10, " ", 20, 4, 1),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 180, 15, 5),
    "bigbench_cs_algorithms": ("language_modeling", 10, " ", 25, 1, 1),
    "bigbench_operators": ("language_modeling", 10, " ", 20, 1, 1),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 20, 10, 1),
    "squad": ("language_modeling", 10, " ", 130, 3, 1),
    "coqa": ("language_modeling", 0, " ", 250, 3, 1),
    "boolq": ("multiple_choice", 10, "\nAnswer: ", 110, 1, 2),
    "bigbench_language_identification": ("multiple_choice", 10, " ", 20, 2, 4),
}
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health").split()


def _text(rng: random.Random, words: int) -> str:
    n = max(1, int(words * rng.uniform(0.6, 1.4)))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _core_item(rng: random.Random, kind: str, query: int, choice: int, options: int) -> dict:
    if kind == "multiple_choice":
        return {"query": _text(rng, query), "choices": [_text(rng, choice) for _ in range(options)],
                "gold": rng.randrange(options)}
    if kind == "schema":
        return {"context_options": [_text(rng, query) for _ in range(options)], "continuation": _text(rng, choice),
                "gold": rng.randrange(options)}
    return {"context": _text(rng, query), "continuation": _text(rng, choice)}


def write_core_bundle(root: Path, items: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["icl_tasks:"]
    meta = ["Eval Task,Random baseline"]
    for label, (kind, shots, delim, query, choice, options) in CORE_TASKS.items():
        path = root / "eval_data" / f"{label}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(_core_item(rng, kind, query, choice, options)) + "\n"
                                for _ in range(items)))
        lines += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
        meta.append(f"{label},{0 if kind == 'language_modeling' else round(100 / options, 1)}")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return root


# test-split sizes of the real sets (facts: the public datasets' row counts)
CHAT_SIZES = {"arc-easy": 2376, "arc-challenge": 1172, "mmlu": 14042, "gsm8k": 1319}


def write_chat_sets(root: Path, items: int, seed: int = 0) -> dict[str, str]:
    """Stand-in parquet files for ARC-Easy, ARC-Challenge, MMLU and GSM8K, each the real test split's
    size or `items`, whichever is smaller; returns task -> path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, words in (("arc-easy", 22), ("arc-challenge", 28)):
        rows = [{"id": f"{name}-{i}", "question": _text(rng, words),
                 "choices": {"text": [_text(rng, 4) for _ in range(4)], "label": list("ABCD")},
                 "answerKey": rng.choice("ABCD")} for i in range(min(items, CHAT_SIZES[name]))]
        out[name] = str(root / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), out[name])
    rows = [{"question": _text(rng, 45), "subject": "standin", "choices": [_text(rng, 6) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(min(items, CHAT_SIZES["mmlu"]))]
    out["mmlu"] = str(root / "mmlu.parquet")
    pq.write_table(pa.Table.from_pylist(rows), out["mmlu"])
    rows = [{"question": _text(rng, 45), "answer": f"{_text(rng, 30)}\n#### {rng.randrange(1000)}"}
            for _ in range(min(items, CHAT_SIZES["gsm8k"]))]
    out["gsm8k"] = str(root / "gsm8k.parquet")
    pq.write_table(pa.Table.from_pylist(rows), out["gsm8k"])
    return out
