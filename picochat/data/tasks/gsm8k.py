"""GSM8K (openai/gsm8k, "main"): grade-school math word problems with calculator annotations.

Reference answers look like "She sold 48/2 = <<48/2=24>>24 clips ... #### 72". Each `<<expr=value>>`
becomes a python tool call: a `python` part with `expr` and a `python_output` part with what
`run_python_tool(expr)` prints (the annotated value when the sandbox cannot evaluate it), so training
matches what the inference engine will inject. The final "#### 72" line is kept as the answer format.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import Conversation, Task, numbers_equal
from .files import read_records, source_or_default

# Hub "resolve" URLs are plain HTTPS files (no hub client needed); point them at a mirror if you must.
GSM8K_BASE = "https://huggingface.co/datasets/openai/gsm8k/resolve/main/"
GSM8K_URLS: dict[str, str] = {
    "train": GSM8K_BASE + "main/train-00000-of-00001.parquet",
    "test": GSM8K_BASE + "main/test-00000-of-00001.parquet",
}
_ANNOTATION = re.compile(r"<<([^<>]*?)=([^<>=]*)>>")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def annotated_answer_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K answer into text / python / python_output parts (adjacent texts merged)."""
    from picochat.infer.tools import run_python_tool_inline  # lazy: data must not need the engine

    parts: list[dict] = []

    def text(s: str) -> None:
        if not s:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += s
        else:
            parts.append({"type": "text", "text": s})

    pos = 0
    for m in _ANNOTATION.finditer(answer):
        text(answer[pos:m.start()])
        expr, value = m.group(1).strip(), m.group(2).strip()
        result = run_python_tool_inline(expr)  # inline: GSM8K annotations are short arithmetic
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": value if result.startswith("Error:") else result})
        pos = m.end()
    text(answer[pos:])
    return parts or [{"type": "text", "text": ""}]


def final_answer(text: str) -> str | None:
    """The number after "####", commas removed, or None."""
    m = _FINAL.search(text)
    return m.group(1).replace(",", "") if m else None


class GSM8K(Task):
    """`source`: local parquet/jsonl file or folder, or a URL; default: the split's HF parquet URL."""

    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, split: str = "train", source: str | Path | None = None):
        source = source_or_default("GSM8K", split, source, GSM8K_URLS)
        self.rows = [r for r in read_records(source) if r.get("question") and r.get("answer")]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> Conversation:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": annotated_answer_to_parts(row["answer"])}],
                "answer": final_answer(row["answer"]) or ""}

    def evaluate(self, conversation: Conversation, completion_text: str) -> bool:
        """Correct when the completion's "#### N" equals the reference number."""
        got = final_answer(completion_text)
        return got is not None and numbers_equal(got, conversation["answer"])
