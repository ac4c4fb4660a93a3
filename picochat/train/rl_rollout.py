"""Rollouts for `picochat rl`: sampling completions of training prompts, and scoring them.

`SchedulerRollouts` submits prompts to the scheduler, the one decode loop chat, evaluation and the
server use too, and turns each completion into `Sample`s: the tokens, which of them the policy
sampled (tool outputs are forced: `TokenEvent.sampled` is False) and why it stopped. After every
update it copies the new weights into the scheduler's model in place.

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
# the backend: the one decode loop


class SchedulerRollouts:
    """Rollouts submitted to the scheduler (`infer/scheduler.py`), driven on this thread.

    Batched (default): every prompt of the step is submitted at once, n samples each, into a cache
    of `slots` rows (fast mode on CUDA: CUDA-graphed decode, the host reading tokens while the device
    runs ahead). `eager=True` is the `--eager-rollouts` baseline, as upstream nanochat samples: the
    eager step (one host sync per token), one prompt's n samples at a time."""

    def __init__(self, model, tokenizer, slots: int, eager: bool = False, max_context: int | None = None):
        from ..infer.scheduler import Scheduler, SchedulerConfig

        self.eager = eager
        config = SchedulerConfig(slots=slots, max_context=max_context, mode="eager" if eager else None,
                                 max_queue=max(1024, slots))
        self.scheduler = Scheduler(model, tokenizer, config)

    def refresh_weights(self, model) -> None:
        """New weights into the scheduler's copy in place: its cache and captured graphs stay."""
        if self.scheduler.model is not model:  # on CPU it decodes from the training model itself
            self.scheduler.refresh_weights(model)

    def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_k: int | None, seeds: list[int]) -> list[list[Sample]]:
        """n samples for each prompt, each prompt with its own seed."""
        from ..infer.request import SamplingParams

        def params(seed: int) -> SamplingParams:
            return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                  tools=True)

        if self.eager:
            groups = []
            for prompt, seed in zip(prompts, seeds):
                handle = self.scheduler.submit(prompt, params(seed))
                self.scheduler.run_until_idle()
                groups.append(self._samples(handle))
            return groups
        handles = [self.scheduler.submit(p, params(s)) for p, s in zip(prompts, seeds)]
        self.scheduler.run_until_idle()
        return [self._samples(h) for h in handles]

    @staticmethod
    def _samples(handle) -> list[Sample]:
        done = handle.result(timeout=0)
        return [Sample(list(s.tokens), list(s.sampled), s.finish_reason) for s in done.samples]

    def close(self) -> None:
        self.scheduler.close()
