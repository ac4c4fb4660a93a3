"""The policy-gradient arithmetic of `picochat rl`, as pure functions (no model, no I/O).

- `group_advantages`: reward minus the mean of its prompt's group (optionally over the group's std);
- `token_rows`: a sample (prompt + completion) as (inputs, targets, per-token advantage), with the
  loss only on tokens the policy SAMPLED: the prompt, tool outputs and other forced tokens get target
  -1 and weight 0, since the model did not choose them and must not be credited or blamed for them;
- `collate`: rows padded into one (B, T) micro-batch;
- `policy_loss`: -Σ advantage · log p(token) over sampled tokens, divided by the number of sampled
  tokens in the whole step (all samples, all ranks), plus an optional KL penalty to a reference model.

Every sampled token of a step weighs the same, whatever sample or micro-batch it falls in; samples
whose group all scored alike carry advantage 0 but their tokens still count in the denominator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -1


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards: (P, n), one row per prompt group. Returns reward - group mean, divided by the group's
    population std when `std_normalize` (a group whose rewards are all equal gets 0, never a division
    by zero)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    rewards = rewards.double()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.float()


def token_rows(prompt: Sequence[int], completion: Sequence[int], sampled: Sequence[bool], advantage: float
               ) -> tuple[list[int], list[int], list[float]]:
    """One training row: inputs = (prompt + completion)[:-1], targets = the next tokens, weights =
    `advantage` where the target is a sampled completion token, else 0 (target -1)."""
    if len(completion) != len(sampled):
        raise ValueError(f"completion has {len(completion)} tokens but {len(sampled)} sampled flags")
    if not prompt:
        raise ValueError("a sample needs a non-empty prompt")
    seq = list(prompt) + list(completion)
    inputs = seq[:-1]
    targets = [IGNORE] * (len(prompt) - 1)
    weights = [0.0] * (len(prompt) - 1)
    for tok, was_sampled in zip(completion, sampled):
        targets.append(int(tok) if was_sampled else IGNORE)
        weights.append(float(advantage) if was_sampled else 0.0)
    return inputs, targets, weights


def collate(rows: Sequence[tuple[list[int], list[int], list[float]]], pad_id: int = 0
            ) -> dict[str, torch.Tensor]:
    """Right-pad rows into inputs (B, T) long, targets (B, T) long (-1 = no loss), weights (B, T)."""
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float32)
    for i, (x, y, w) in enumerate(rows):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, :len(y)] = torch.tensor(y, dtype=torch.long)
        weights[i, :len(w)] = torch.tensor(w, dtype=torch.float32)
    return {"inputs": inputs, "targets": targets, "weights": weights}


def sampled_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["targets"] != IGNORE).sum()


def policy_loss(logp: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, n_tokens: torch.Tensor | float,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl) of one micro-batch, both already divided by `n_tokens` (the step's sampled tokens).

    logp: (B, T) log-probabilities of the targets under the policy (anything where targets == -1).
    With `ref_logp` and kl_coef > 0, adds kl_coef · KL(policy ‖ reference) per sampled token, by the
    non-negative estimator exp(r) - r - 1 with r = ref_logp - logp (unbiased for samples drawn from
    the policy). `kl` is returned detached, for logging."""
    mask = (targets != IGNORE).to(logp.dtype)
    logp = logp * mask  # positions without a target may hold anything (padding, prompt): zero them
    loss = -(weights.to(logp.dtype) * logp).sum() / n_tokens
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        r = (ref_logp.to(logp.dtype) - logp) * mask
        kl = ((torch.exp(r) - r - 1) * mask).sum() / n_tokens
        loss = loss + kl_coef * kl
    return loss, kl.detach()


def target_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position (B, T) under the distribution the rollouts sampled from, softmax of
    logits / temperature (the policy being improved); 0 where the target is -1. At temperature 1 this
    is the model's own cross-entropy path (logp = -CE)."""
    if temperature == 1.0:
        return -model(inputs, targets, loss_reduction="none").view(targets.shape)
    logits = model(inputs) / temperature
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                            reduction="none")
    return -nll.view(targets.shape)
