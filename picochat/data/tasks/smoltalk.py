"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn conversations for SFT.

Rows carry `messages`: a list of {"role", "content"} with an optional leading system message. Rows
whose roles do not alternate user/assistant (after an optional system message) or that do not end
with the assistant are skipped at load time, so every index renders.
"""

from __future__ import annotations

from pathlib import Path

from .base import Conversation, Task
from .files import read_records, source_or_default

# Hub "resolve" URLs are plain HTTPS files (no hub client needed); point them at a mirror if you must.
SMOLTALK_BASE = "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/"
SMOLTALK_URLS: dict[str, str] = {
    "train": SMOLTALK_BASE + "data/train-00000-of-00001.parquet",
    "test": SMOLTALK_BASE + "data/test-00000-of-00001.parquet",
}


def _well_formed(messages: object) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    msgs = messages[1:] if messages[0].get("role") == "system" else messages
    if not msgs or msgs[-1].get("role") != "assistant":
        return False
    return all(m.get("role") == ("user" if i % 2 == 0 else "assistant") and isinstance(m.get("content"), str)
               for i, m in enumerate(msgs))


class SmolTalk(Task):
    """`source`: local parquet/jsonl file or folder, or a URL; default: the split's HF parquet URL."""

    name = "smoltalk"
    eval_type = "generative"

    def __init__(self, split: str = "train", source: str | Path | None = None):
        source = source_or_default("SmolTalk", split, source, SMOLTALK_URLS)
        rows = read_records(source)
        # keep only the messages: other columns (source, etc.) are not needed for SFT
        self.conversations = [r["messages"] for r in rows if _well_formed(r.get("messages"))]
        self.n_skipped = len(rows) - len(self.conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    def get(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.conversations[index]]
        return {"messages": messages}

    def evaluate(self, conversation: Conversation, completion_text: str) -> bool:
        raise NotImplementedError("SmolTalk is open-ended chat: there is no single correct answer to check")
