"""Rollouts for `picochat rl`: sampling completions of training prompts, and scoring them.

A `Rollouts` backend turns prompts into `Sample`s (tokens, which of them the policy sampled, why it
stopped) and takes fresh weights after every update:
- `EngineRollouts(eager=True)`: the `--eager-rollouts` baseline, as upstream nanochat samples: the
  eager engine (static KV cache, one host sync per token), one prompt's n samples at a time;
- `EngineRollouts(eager=False)`: every prompt of the step in one engine batch.
(The scheduler backend, one decode loop shared with chat and serving, plugs in the same way.)

Each prompt's samples come from their own seed, derived from (run seed, step, prompt index), so a
step's rollouts do not depend on what ran before: resuming re-draws exactly what was drawn.
Rewards come from the task's own checker applied to the decoded completion (tool calls and outputs
included, stop token excluded), the very text `picochat eval` scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    tokens: list[int]  # everything the sample appended, stop token included
    sampled: list[bool]  # per token: chosen by the policy (True) or forced, e.g. a tool output (False)
    finish_reason: str | None = None  # stop | length
    reward: float = 0.0


@dataclass
class Group:
    """One prompt and its samples (advantages are relative within a group)."""

    index: int  # the prompt's index in its task
    prompt: list[int]
    samples: list[Sample] = field(default_factory=list)


def request_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, step, prompt index...), the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stop_tokens(tokenizer) -> list[int]:
    return [tokenizer.special("<|assistant_end|>"), tokenizer.bos_id]


def sampled_flags(tokens: list[int], tokenizer) -> list[bool]:
    """Which tokens of an engine completion were sampled, by the engine's tool protocol: after
    <|python_start|> ... <|python_end|> (both sampled) the engine forces <|output_start|> result
    <|output_end|>. The forced text is encoded without specials, so the run of forced tokens is
    exactly <|output_start|> up to the next <|output_end|> that follows a closed tool call."""
    py_start, py_end = tokenizer.special("<|python_start|>"), tokenizer.special("<|python_end|>")
    out_end = tokenizer.special("<|output_end|>")
    flags, state = [], "text"  # text | python | forcing
    for i, tok in enumerate(tokens):
        if state == "forcing":
            flags.append(False)
            if tok == out_end:
                state = "text"
            continue
        flags.append(True)
        if state == "text" and tok == py_start:
            state = "python"
        elif state == "python" and tok == py_end:
            state = "forcing"
    return flags


def completion_text(tokens: list[int], tokenizer) -> str:
    """The decoded completion without its stop token (what `picochat eval` checks)."""
    if tokens and tokens[-1] in stop_tokens(tokenizer):
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def score(task, conversation: dict, tokens: list[int], tokenizer) -> float:
    """The task's reward for one completion (1/0 from its checker unless the task defines a scalar)."""
    text = completion_text(tokens, tokenizer)
    reward = getattr(task, "reward", None)
    return float(reward(conversation, text)) if reward is not None else float(task.evaluate(conversation, text))


# ---------------------------------------------------------------------------------------------------
# backends


class EngineRollouts:
    """Rollouts through `infer.engine.Engine` (see the module docstring)."""

    def __init__(self, model, tokenizer, eager: bool, max_context: int | None = None):
        from ..infer.engine import Engine

        self.tokenizer, self.eager = tokenizer, eager
        mode = "eager" if eager else None
        self.engine = Engine(model, tokenizer, mode=mode, max_context=max_context)

    def refresh_weights(self, model) -> None:
        """The engine decodes from `model` itself on CPU, else from a private copy: update it in place
        (captured graphs keep reading the same storage, so nothing is rebuilt)."""
        target = self.engine.model
        if target is model:
            return
        with torch.no_grad():
            src = dict(model.named_parameters())
            for name, p in target.named_parameters():
                if name.endswith("attn.c_qkv.weight"):
                    prefix = name[: -len("c_qkv.weight")]
                    w = torch.cat([src[prefix + "c_q.weight"], src[prefix + "c_k.weight"], src[prefix + "c_v.weight"]])
                    p.copy_(w)
                else:
                    p.copy_(src[name])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_k: int | None, seeds: list[int]) -> list[list[Sample]]:
        """n samples per prompt: one engine call per prompt (eager) or one for all prompts."""
        if self.eager:
            out = []
            for prompt, seed in zip(prompts, seeds):
                out += self._generate([prompt], n, max_tokens, temperature, top_k, seed)
            return out
        return self._generate(prompts, n, max_tokens, temperature, top_k, seeds[0] if seeds else 0)

    def _generate(self, prompts, n, max_tokens, temperature, top_k, seed) -> list[list[Sample]]:
        rows: list[list[int]] = [[] for _ in range(len(prompts) * n)]
        reasons: list[str | None] = [None] * len(rows)
        for step in self.engine.generate(prompts, num_samples=n, max_tokens=max_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed, tools=True):
            for r, tok in enumerate(step.tokens):
                if tok is not None:
                    rows[r].append(tok)
            reasons = step.reasons
        samples = [Sample(t, sampled_flags(t, self.tokenizer), reasons[r]) for r, t in enumerate(rows)]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        pass
