"""ARC (allenai/ai2_arc): grade-school science questions, ARC-Easy and ARC-Challenge, answered with a letter.

Rows (the public parquet layout): `question`, `choices` = {"text": [...], "label": [...]}, `answerKey`.
Labels are letters ("A".."E") or, in a few rows, digits ("1".."4"); digits become letters so every
question is asked the same way (the rendering MMLU uses), with 3 to 5 choices.
"""

from __future__ import annotations

from pathlib import Path

from .base import Conversation, Task
from .files import read_records, source_or_default
from .mmlu import render_multiple_choice

# Hub "resolve" URLs are plain HTTPS files (no hub client needed); point them at a mirror if you must.
ARC_BASE = "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/"
ARC_SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}
LETTERS = ("A", "B", "C", "D", "E")


def arc_urls(subset: str) -> dict[str, str]:
    folder = ARC_SUBSETS[subset]
    return {split: f"{ARC_BASE}{folder}/{split}-00000-of-00001.parquet" for split in ("train", "validation", "test")}


def _normalise(row: dict) -> dict | None:
    """question, choice texts and the answer's index; None for a malformed row."""
    choices = row.get("choices") or {}
    texts, labels = list(choices.get("text") or []), [str(x) for x in choices.get("label") or []]
    key = str(row.get("answerKey", ""))
    if not row.get("question") or len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS) \
            or key not in labels:
        return None
    return {"question": row["question"], "choices": texts, "answer": labels.index(key), "id": row.get("id", "")}


class ARC(Task):
    """`subset`: "easy" or "challenge"; `source`: local parquet/jsonl file or folder, or a URL
    (default: the split's HF parquet URL)."""

    eval_type = "categorical"

    def __init__(self, subset: str = "easy", split: str = "test", source: str | Path | None = None):
        if subset not in ARC_SUBSETS:
            raise ValueError(f"ARC subset must be one of {sorted(ARC_SUBSETS)}, got {subset!r}")
        self.name = f"arc-{subset}"
        rows = read_records(source_or_default(ARC_SUBSETS[subset], split, source, arc_urls(subset)))
        self.rows = [r for r in map(_normalise, rows) if r is not None]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> Conversation:
        row = self.rows[index]
        letters = LETTERS[:len(row["choices"])]
        letter = letters[row["answer"]]
        user = render_multiple_choice(row["question"], row["choices"], letters)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letter}],
                "choices": list(letters), "answer_letter": letter, "id": row["id"]}
