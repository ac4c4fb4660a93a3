"""CORE: a base model's in-context accuracy on the DCLM tasks, scored the way nanochat scores it.

For every item of a task:
- few-shot examples: `num_fewshot` other items of the same task, drawn with `random.Random(1234 + i)`
  (i: the item's position after the task is shuffled with seed 1337), never the item itself;
- prompts (BOS first), one per option, by task type:
    multiple_choice   shots "{query}{delim}{right choice}\\n\\n", then "{query}{delim}{choice}" per
                      choice; the continuation is what follows the options' common token prefix;
    schema            shots "{right context}{delim}{continuation}\\n\\n", then
                      "{context option}{delim}{continuation}" per option; the continuation is the
                      options' common token suffix;
    language_modeling shots "{context}{delim}{continuation}\\n\\n", then the item's context with and
                      without the continuation; the continuation is what the longer one adds;
- rows longer than the model's context are cropped from the left;
- multiple choice and schema: the option whose continuation has the lowest mean cross-entropy is
  the answer; language modelling: correct only if every continuation token is the greedy argmax.

Accuracy a with random baseline b gives the centered accuracy (a - b) / (1 - b); CORE is its mean
over the tasks. Every item of every task is scored in large padded batches (`loglik.score_rows`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .core_bundle import CoreTask, read_items
from .loglik import Scored, score_rows

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 when every answer is right."""
    if not 0 <= baseline < 1:
        raise ValueError(f"baseline must be in [0, 1), got {baseline}")
    return (accuracy - baseline) / (1.0 - baseline)


@dataclass
class ItemRows:
    rows: list[Scored]  # one per option (language modelling: one)
    gold: int


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(s)) for s in seqs])


def render(task: CoreTask, item: dict, shots: Sequence[dict]) -> tuple[list[str], int]:
    """The prompts of one item (one per option) and the index of the right one."""
    d = task.delimiter
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{c}" for c in item["choices"]], int(item["gold"])
    if task.task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{c}{d}{item['continuation']}" for c in item["context_options"]], int(item["gold"])
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{d}".strip()
    return [without, f"{prefix}{item['context'].strip()}{d}{item['continuation']}"], 0


def _crop(tokens: list[int], start: int, end: int, limit: int) -> Scored:
    if len(tokens) > limit:
        cut = len(tokens) - limit
        tokens, start, end = tokens[cut:], max(1, start - cut), end - cut
    return Scored(tuple(tokens), start, end)


def item_rows(task: CoreTask, item: dict, shots: Sequence[dict], tokenizer, limit: int) -> ItemRows:
    """Tokenized rows with their continuation spans (see the module docstring)."""
    texts, gold = render(task, item, shots)
    seqs = tokenizer.encode_batch(texts, prepend_bos=True)
    if task.task_type == "language_modeling":
        without, with_ = seqs
        start = _common_prefix([without, with_])
        start = min(start, len(with_) - 1)
        return ItemRows([_crop(with_, start, len(with_), limit)], 0)
    if task.task_type == "multiple_choice":
        # every option keeps at least its last token as continuation, even if one option prefixes another
        start = _common_prefix(seqs)
        rows = [_crop(s, min(start, len(s) - 1), len(s), limit) for s in seqs]
    else:
        suffix = max(1, min(_common_suffix(seqs), min(len(s) for s in seqs) - 1))
        rows = [_crop(s, len(s) - suffix, len(s), limit) for s in seqs]
    return ItemRows(rows, gold)


def prepare(task: CoreTask, tokenizer, limit: int, max_items: int | None = None) -> list[ItemRows]:
    """Every evaluated item of `task` as scored rows (shuffled with SHUFFLE_SEED, then cut)."""
    items = read_items(task)
    random.Random(SHUFFLE_SEED).shuffle(items)
    chosen = items if max_items is None else items[:max_items]
    prepared = []
    for i, item in enumerate(chosen):
        k = min(task.num_fewshot, len(items) - 1)
        # positions in "every item but i" (the same draw as sampling that list), mapped back to items
        picks = random.Random(FEWSHOT_SEED + i).sample(range(len(items) - 1), k) if k > 0 else []
        shots = [items[p if p < i else p + 1] for p in picks]
        prepared.append(item_rows(task, item, shots, tokenizer, limit))
    return prepared


def correct_answers(task: CoreTask, items: Sequence[ItemRows], scores) -> list[bool]:
    out, pos = [], 0
    for it in items:
        s = scores[pos:pos + len(it.rows)]
        pos += len(it.rows)
        if task.task_type == "language_modeling":
            out.append(s[0].greedy)
        else:
            losses = [x.mean_loss for x in s]
            out.append(losses.index(min(losses)) == it.gold)
    return out


def evaluate_task(model, tokenizer, task: CoreTask, max_items: int | None = None, mode: str = "batched",
                  batch_tokens: int = 8192) -> dict:
    """One task's accuracy, centered accuracy and per-item correctness."""
    t0 = time.perf_counter()
    items = prepare(task, tokenizer, model.config.seq_len, max_items)
    rows = [r for it in items for r in it.rows]
    scores = score_rows(model, rows, pad_id=tokenizer.bos_id, mode=mode, batch_tokens=batch_tokens,
                        groups=[len(it.rows) for it in items])
    correct = correct_answers(task, items, scores)
    accuracy = sum(correct) / max(1, len(correct))
    return {"task": task.label, "type": task.task_type, "shots": task.num_fewshot, "n": len(correct),
            "accuracy": accuracy, "baseline": task.baseline, "centered": centered_accuracy(accuracy, task.baseline),
            "seconds": time.perf_counter() - t0, "correct": correct}


def evaluate_core(model, tokenizer, tasks: Sequence[CoreTask], max_items: int | None = None,
                  mode: str = "batched", progress: bool = True) -> dict:
    """Every task, then CORE = the mean centered accuracy."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(tasks, desc="CORE", unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.label)
        rows.append(evaluate_task(model, tokenizer, task, max_items, mode))
    core = sum(r["centered"] for r in rows) / max(1, len(rows))
    return {"core": core, "tasks": rows, "max_per_task": max_items, "mode": mode,
            "seconds": sum(r["seconds"] for r in rows)}
