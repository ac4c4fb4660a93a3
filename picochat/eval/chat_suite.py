"""The chat benchmarks: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval (and the synthetic demo tasks),
and ChatCORE.

How each kind of task is scored:
- multiple choice (ARC, MMLU): no generation; the next-token logits right after `<|assistant_start|>`,
  restricted to the question's answer letters, pick the answer (`loglik.letter_choice`, batched);
- generative (GSM8K, the synthetic tasks): greedy completion with the calculator tool, through the
  decode loop, checked by the task's own `evaluate` (GSM8K: the number after "####", commas removed);
- execution (HumanEval): greedy completion, then the program (prompt + completion + the problem's
  tests) runs in the sandbox (`execution.py`); it passes when it exits cleanly.

ChatCORE is the mean centered accuracy over the benchmarks run, with baselines 0.25 for the
four-way multiple-choice tasks (ARC, MMLU) and 0 for GSM8K and HumanEval. Results carry every item
(right or wrong, and what the model said) so the report can show failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..common import log
from ..config import check_fields, opt
from .execution import MAX_SLOTS

# name -> random baseline for ChatCORE (None: not part of ChatCORE)
BENCHMARKS: dict[str, float] = {"arc-easy": 0.25, "arc-challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0,
                                "humaneval": 0.0}
ITEM_TEXT_CHARS = 600  # of each completion kept in the per-item results


@dataclass(frozen=True)
class ChatEvalConfig:
    max_examples: int | None = opt(None, "items per task (default: all)", lo=1)
    max_tokens: int = opt(512, "longest generated answer (GSM8K, HumanEval)", lo=1, hi=1 << 20)
    batch_size: int = opt(64, "rows the decode loop keeps running (scheduler slots)", lo=1, hi=4096)
    sandbox_workers: int = opt(8, "HumanEval programs run at once", lo=1, hi=MAX_SLOTS)
    batch_tokens: int = opt(8192, "tokens per forward when scoring answer letters", lo=1, hi=1 << 24)

    def __post_init__(self) -> None:
        check_fields(self)


def load_task(name: str, source: str | None = None, synthetic_size: int = 200, seed: int = 1):
    """A task by name (see BENCHMARKS and the synthetic tasks); `source` overrides its data file."""
    from ..data.tasks.synthetic import SYNTHETIC_TASKS

    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name](split="test", size=synthetic_size, seed=seed)
    if name in ("arc-easy", "arc-challenge"):
        from ..data.tasks.arc import ARC

        return ARC(name.split("-", 1)[1], split="test", source=source)
    if name == "mmlu":
        from ..data.tasks.mmlu import MMLU

        return MMLU(split="test", source=source)
    if name == "gsm8k":
        from ..data.tasks.gsm8k import GSM8K

        return GSM8K(split="test", source=source)
    if name == "humaneval":
        from ..data.tasks.humaneval import HumanEval

        return HumanEval(source=source)
    raise ValueError(f"unknown task {name!r}: pick from {', '.join([*BENCHMARKS, *SYNTHETIC_TASKS])}")


# ---------------------------------------------------------------------------------------------------
# generation (one decode loop for every generative task)


class GreedyDecoder:
    """Greedy completions (tools on) through the scheduler, the one decode loop; one scheduler serves
    every generative task of an evaluation, so its cache and CUDA graphs are built once.

    Every prompt is submitted at once; the scheduler keeps `slots` rows decoding and starts the next
    prompt the step a row finishes (continuous batching)."""

    def __init__(self, model, tokenizer, slots: int):
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self._sched = None

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                 progress: Callable[[int], None] | None = None) -> list[str | None]:
        """Visible text of each completion (tool calls and outputs included, special tokens left
        out); None for a prompt that leaves no room in the context."""
        from ..infer.request import SamplingParams
        from ..infer.scheduler import Scheduler, SchedulerConfig

        if self._sched is None:
            self._sched = Scheduler(self.model, self.tokenizer, SchedulerConfig(slots=self.slots, max_queue=1 << 20))
        limit = self.model.config.seq_len
        pending = {}
        for i, p in enumerate(prompts):
            room = min(max_tokens, limit - len(p))
            if room >= 1:
                pending[i] = self._sched.submit(list(p), SamplingParams(max_tokens=room, temperature=0.0, tools=True))
        out: list[str | None] = [None] * len(prompts)
        if progress and len(pending) < len(prompts):
            progress(len(prompts) - len(pending))
        try:
            while pending:
                self._sched.advance()
                for i in [i for i, h in pending.items() if h.done]:
                    out[i] = pending.pop(i).result().samples[0].text
                    if progress:
                        progress(1)
        finally:
            for h in pending.values():  # interrupted: leave nothing running
                h.cancel()
        return out

    def close(self) -> None:
        if self._sched is not None:
            self._sched.close()
            self._sched = None


def generate_greedy(model, tokenizer, prompts: Sequence[Sequence[int]], max_tokens: int, slots: int,
                    progress: Callable[[int], None] | None = None) -> list[str | None]:
    """`GreedyDecoder(...).generate(...)` for a single batch of prompts."""
    decoder = GreedyDecoder(model, tokenizer, max(1, min(slots, len(prompts))))
    try:
        return decoder.generate(prompts, max_tokens, progress)
    finally:
        decoder.close()


# ---------------------------------------------------------------------------------------------------
# scoring


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


def score_choice(model, tokenizer, convs: list[dict], cfg: ChatEvalConfig) -> list[dict]:
    from .loglik import letter_choice

    prompts = [tokenizer.render_for_completion({"messages": c["messages"][:-1]}) for c in convs]
    # a letter may encode to several tokens with a tiny vocabulary: its first token stands for it
    letter_ids = [[tokenizer.encode(letter)[0] for letter in c["choices"]] for c in convs]
    picks = letter_choice(model, prompts, letter_ids, batch_tokens=cfg.batch_tokens, pad_id=tokenizer.bos_id)
    return [{"answer": c["choices"][p], "expected": c["answer_letter"], "correct": c["choices"][p] == c["answer_letter"]}
            for c, p in zip(convs, picks)]


def score_generation(tokenizer, task, convs: list[dict], cfg: ChatEvalConfig, progress: bool,
                     decoder: GreedyDecoder) -> list[dict]:
    prompts = [tokenizer.render_for_completion({"messages": c["messages"][:-1]}) for c in convs]
    with _bar(len(prompts), f"{task.name} (generating)", progress) as bar:
        texts = decoder.generate(prompts, cfg.max_tokens, bar.update)
    items = []
    for c, text in zip(convs, texts):
        ok = text is not None and bool(task.evaluate(c, text))
        items.append({"answer": (text or "<prompt fills the context>")[:ITEM_TEXT_CHARS],
                      "expected": str(c.get("answer", ""))[:ITEM_TEXT_CHARS], "correct": ok})
    return items


def score_execution(tokenizer, convs: list[dict], cfg: ChatEvalConfig, progress: bool,
                    decoder: GreedyDecoder) -> list[dict]:
    from ..data.tasks.humaneval import program
    from .execution import run_program

    prompts = [tokenizer.render_for_completion({"messages": c["messages"][:-1]}) for c in convs]
    with _bar(len(prompts), "humaneval (generating)", progress) as bar:
        texts = decoder.generate(prompts, cfg.max_tokens, bar.update)

    def run(i: int) -> dict:
        if texts[i] is None:
            return {"answer": "<prompt fills the context>", "status": "skipped", "correct": False}
        result = run_program(program(convs[i]["problem"], texts[i]))
        return {"answer": texts[i][:ITEM_TEXT_CHARS], "status": result.status, "correct": result.passed,
                "error": result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else ""}

    with ThreadPoolExecutor(cfg.sandbox_workers) as pool, _bar(len(convs), "humaneval (running)", progress) as bar:
        items = []
        for item in pool.map(run, range(len(convs))):
            items.append(item)
            bar.update(1)
    for c, item in zip(convs, items):
        item["id"] = c["task_id"]
    return items


def evaluate_chat_task(model, tokenizer, task, cfg: ChatEvalConfig, progress: bool = True,
                       decoder: GreedyDecoder | None = None) -> dict:
    """One task: accuracy, centered accuracy (benchmarks), time and every item's outcome. Generative
    tasks decode with `decoder` (default: one of their own, closed afterwards)."""
    t0 = time.perf_counter()
    n = len(task) if cfg.max_examples is None else min(len(task), cfg.max_examples)
    convs = [task[i] for i in range(n)]
    was_training = model.training
    model.eval()
    own = decoder is None and task.eval_type != "categorical"
    if own:
        decoder = GreedyDecoder(model, tokenizer, max(1, min(cfg.batch_size, n)))
    try:
        if task.eval_type == "categorical":
            items = score_choice(model, tokenizer, convs, cfg)
        elif task.eval_type == "execution":
            items = score_execution(tokenizer, convs, cfg, progress, decoder)
        else:
            items = score_generation(tokenizer, task, convs, cfg, progress, decoder)
    finally:
        if own:
            decoder.close()
        model.train(was_training)
    for i, item in enumerate(items):
        item.setdefault("id", convs[i].get("id") or i)
        question = convs[i]["messages"][-2]["content"]
        item["question"] = question[:ITEM_TEXT_CHARS] if isinstance(question, str) else ""
    correct = sum(item["correct"] for item in items)
    accuracy = correct / max(1, n)
    row = {"task": task.name, "n": n, "correct": correct, "accuracy": accuracy,
           "seconds": time.perf_counter() - t0, "items": items}
    if task.name in BENCHMARKS:
        b = BENCHMARKS[task.name]
        row.update(baseline=b, centered=(accuracy - b) / (1 - b))
    return row


def chatcore(rows: Sequence[dict]) -> float | None:
    """Mean centered accuracy over the benchmark rows (None when none of them was run)."""
    centered = [r["centered"] for r in rows if "centered" in r]
    return sum(centered) / len(centered) if centered else None


def evaluate_chat(model, tokenizer, names: Sequence[str], cfg: ChatEvalConfig, sources: dict[str, str] | None = None,
                  progress: bool = True, seed: int = 1) -> dict:
    """Every named task, ChatCORE, and the sandbox mode HumanEval ran under."""
    rows = []
    decoder = GreedyDecoder(model, tokenizer, cfg.batch_size)
    try:
        for name in names:
            task = load_task(name, (sources or {}).get(name), synthetic_size=cfg.max_examples or 200, seed=seed)
            row = evaluate_chat_task(model, tokenizer, task, cfg, progress, decoder)
            log.info(f"{name}: {100 * row['accuracy']:.1f}% of {row['n']} in {row['seconds']:.1f}s")
            rows.append(row)
    finally:
        decoder.close()
    result = {"tasks": rows, "chatcore": chatcore(rows), "max_examples": cfg.max_examples}
    if "humaneval" in names:
        from .execution import describe_isolation

        result["sandbox"] = describe_isolation()
    return result


def format_chat_table(result: dict) -> str:
    lines = ["| task | n | accuracy | centered | seconds |", "|---|---:|---:|---:|---:|"]
    for r in result["tasks"]:
        centered = f"{r['centered']:.4f}" if "centered" in r else "–"
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['accuracy']:.2f}% | {centered} | {r['seconds']:.1f} |")
    if result.get("chatcore") is not None:
        lines.append(f"| **ChatCORE** | | | **{result['chatcore']:.4f}** | |")
    return "\n".join(lines)
