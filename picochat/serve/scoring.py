"""Log-probabilities of a prompt's own tokens (`/v1/completions` with `echo` and `logprobs`).

Likelihood-based harnesses score multiple choice by asking for the log-probability of each prompt
token given the ones before it. That is one forward pass of the model over the prompt (no decoding,
so it does not go through the scheduler); it runs in a worker thread, one prompt at a time, so a
long prompt never blocks the event loop and many of them never pile up in memory.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, ids: list[int], top: int = 0
                    ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """For each token after the first: (its log-probability, the `top` most likely tokens there with
    theirs). Computed in float32 from the model's own logits."""
    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    with _lock:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logprobs = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # position t predicts token t+1
        chosen = logprobs.gather(1, x[0, 1:, None])[:, 0].tolist()
        if top > 0:
            values, indices = logprobs.topk(top, dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
    return list(zip(chosen, tops))
