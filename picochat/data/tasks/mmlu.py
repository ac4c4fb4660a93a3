"""MMLU (cais/mmlu): four-way multiple choice questions, answered with a letter.

The auxiliary_train split (about 100k questions from other benchmarks) is used for training the
multiple-choice format. Rows have `question`, `choices` (list of 4 strings) and `answer` (0-3); some
exports nest them under a `train` column, which is unwrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Conversation, Task
from .files import read_records, source_or_default

# Hub "resolve" URLs are plain HTTPS files (no hub client needed); point them at a mirror if you must.
MMLU_BASE = "https://huggingface.co/datasets/cais/mmlu/resolve/main/"
MMLU_URLS: dict[str, str] = {
    "auxiliary_train": MMLU_BASE + "all/auxiliary_train-00000-of-00001.parquet",
    "validation": MMLU_BASE + "all/validation-00000-of-00001.parquet",
    "test": MMLU_BASE + "all/test-00000-of-00001.parquet",
}
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")


def render_multiple_choice(question: str, choices: list[str], letters: tuple[str, ...] = LETTERS) -> str:
    """The user turn: question, lettered choices, and the instruction to answer with one letter."""
    lines = [question.strip(), ""]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return row["train"] if "question" not in row and isinstance(row.get("train"), dict) else row


class MMLU(Task):
    """`source`: local parquet/jsonl file or folder, or a URL; default: the split's HF parquet URL."""

    name = "mmlu"
    eval_type = "categorical"

    def __init__(self, split: str = "auxiliary_train", source: str | Path | None = None):
        source = source_or_default("MMLU", split, source, MMLU_URLS)
        rows = [_flat(r) for r in read_records(source)]
        self.rows = [r for r in rows if len(r.get("choices") or []) == len(LETTERS)
                     and int(r.get("answer", -1)) in range(len(LETTERS))]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> Conversation:
        row = self.rows[index]
        letter = LETTERS[int(row["answer"])]
        user = render_multiple_choice(row["question"], list(row["choices"]))
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letter}],
                "choices": list(LETTERS), "answer_letter": letter, "subject": row.get("subject", "")}
