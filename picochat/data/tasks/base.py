"""The Task interface shared by synthetic and real chat datasets, and answer-checking helpers.

A task is a finite, indexable list of conversations:

    task = SomeTask(...)
    len(task)                      # number of conversations
    conv = task[i]                 # {"messages": [...], plus optional metadata keys}
    task.evaluate(conv, text)      # did the completion `text` answer conv's last user turn?

A conversation is the tokenizer's format (`Tokenizer.render_conversation`), possibly with extra
keys the tokenizer ignores: `answer` (the reference answer, a string) for generative tasks, and
`choices` (the letters, e.g. ["A", "B", "C", "D"]) plus `answer_letter` for multiple choice ones.
For evaluation, the prompt is `conv["messages"][:-1]` (everything but the final assistant turn)
and the model's completion of it is checked with `evaluate`.

`task[i]` is deterministic: the same index gives the same conversation in every process, which is
what lets a task mixture shard and resume by index alone.
"""

from __future__ import annotations

import re
from typing import Any

Conversation = dict[str, Any]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class Task:
    """Base class: subclasses set `name` and implement `__len__` and `get(i)`.

    `eval_type` is "generative" (check the free-form completion against `answer`) or
    "categorical" (multiple choice: compare the chosen letter with `answer_letter`)."""

    name: str = "task"
    eval_type: str = "generative"

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> Conversation:
        """Conversation number `index`, 0 <= index < len(self)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Conversation:
        n = len(self)
        if not isinstance(index, int):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} conversations")
        return self.get(index)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)})"

    # -- evaluation ------------------------------------------------------------------------------
    @staticmethod
    def prompt(conversation: Conversation) -> Conversation:
        """The conversation without its final assistant turn: what the model is asked to complete."""
        return {"messages": conversation["messages"][:-1]}

    def evaluate(self, conversation: Conversation, completion_text: str) -> bool:
        """True when `completion_text` (the model's answer to `prompt(conversation)`) is correct.

        Default: generative tasks compare the last number in the completion with a numeric
        `answer`, or look for a textual `answer` (case-insensitive); categorical tasks compare
        the first choice letter in the completion with `answer_letter`."""
        if self.eval_type == "categorical":
            return extract_letter(completion_text, conversation["choices"]) == conversation["answer_letter"]
        answer = str(conversation["answer"])
        if _NUMBER.fullmatch(answer):
            got = last_number(completion_text)
            return got is not None and numbers_equal(got, answer)
        return answer.lower() in completion_text.lower()


def last_number(text: str) -> str | None:
    """The last number written in `text` (commas as thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def numbers_equal(a: str, b: str) -> bool:
    """Compare two numeric strings as numbers ("24.0" == "24", "1,000" == "1000")."""
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return a.strip() == b.strip()


def extract_letter(text: str, letters: list[str]) -> str | None:
    """First standalone choice letter in `text` (e.g. "B", "(B)", "B." or "The answer is B")."""
    stripped = text.strip()
    if stripped[:1] in letters and (len(stripped) == 1 or not stripped[1].isalpha()):
        return stripped[0]
    m = re.search(r"\b(" + "|".join(map(re.escape, letters)) + r")\b", text)
    return m.group(1) if m else None
