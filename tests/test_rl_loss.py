"""The policy-gradient arithmetic of `picochat rl` against a small example computed by hand:
group advantages (plain and std-normalised), the masking of prompt and forced (tool output) tokens,
and the per-token normalisation over the whole step;."""

from __future__ import annotations

import math

import pytest
import torch

from picochat.train.rl_loss import IGNORE, collate, group_advantages, policy_loss, token_rows


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0],   # mean 0.5, std 0.5
                            [1.0, 1.0, 1.0, 1.0],   # all alike: no signal
                            [0.0, 0.0, 0.0, 1.0]])  # mean 0.25, std sqrt(3)/4
    adv = group_advantages(rewards)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    normed = group_advantages(rewards, std_normalize=True)
    s = math.sqrt(3) / 4
    expected = [[1.0, -1.0, -1.0, 1.0], [0.0] * 4, [-0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s]]
    assert torch.allclose(normed, torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError, match="prompts, samples"):
        group_advantages(torch.ones(4))


def test_token_rows_mask_prompt_and_forced_tokens() -> None:
    # prompt [10, 11, 12]; completion: 20 (text) 21 (python_start) 22 (expr) 23 (python_end)
    # 24 25 26 (forced: output_start, result, output_end) 27 (text) 28 (stop)
    prompt = [10, 11, 12]
    completion = [20, 21, 22, 23, 24, 25, 26, 27, 28]
    sampled = [True, True, True, True, False, False, False, True, True]
    x, y, w = token_rows(prompt, completion, sampled, advantage=0.75)
    assert x == [10, 11, 12, 20, 21, 22, 23, 24, 25, 26, 27]
    #            predicts: 11  12  20  21  22  23  24  25  26  27  28
    assert y == [IGNORE, IGNORE, 20, 21, 22, 23, IGNORE, IGNORE, IGNORE, 27, 28]
    assert w == [0, 0, 0.75, 0.75, 0.75, 0.75, 0, 0, 0, 0.75, 0.75]
    with pytest.raises(ValueError, match="sampled flags"):
        token_rows(prompt, completion, sampled[:-1], 1.0)


def test_loss_is_per_token_normalised_over_the_step_by_hand() -> None:
    """Two samples of different lengths in two micro-batches: the sum of the micro-batch losses is
    -Σ adv·log p over sampled tokens / (sampled tokens of the whole step), computed by hand."""
    a = token_rows([1, 2], [3, 4, 5], [True, False, True], advantage=0.5)  # sampled targets: 3, 5
    b = token_rows([1], [6, 7], [True, True], advantage=-0.5)  # sampled targets: 6, 7
    m1, m2 = collate([a]), collate([b])
    assert m1["targets"].tolist() == [[IGNORE, 3, IGNORE, 5]]
    assert m2["targets"].tolist() == [[6, 7]]
    n_tokens = 4  # 2 + 2 sampled tokens in the step
    # made-up log-probabilities per position (only where there is a target do they matter)
    lp1 = torch.tensor([[-9.0, -0.2, -9.0, -1.0]])
    lp2 = torch.tensor([[-0.5, -2.0]])
    l1, _ = policy_loss(lp1, m1["targets"], m1["weights"], n_tokens)
    l2, _ = policy_loss(lp2, m2["targets"], m2["weights"], n_tokens)
    by_hand = -(0.5 * (-0.2) + 0.5 * (-1.0) + (-0.5) * (-0.5) + (-0.5) * (-2.0)) / 4  # = -0.1625
    assert (l1 + l2).item() == pytest.approx(by_hand) == pytest.approx(-0.1625)
    # the same two rows in ONE padded micro-batch give the same loss (padding carries nothing)
    both = collate([a, b])
    assert both["targets"].tolist() == [[IGNORE, 3, IGNORE, 5], [6, 7, IGNORE, IGNORE]]
    lp = torch.tensor([[-9.0, -0.2, -9.0, -1.0], [-0.5, -2.0, -7.0, -7.0]])
    l, _ = policy_loss(lp, both["targets"], both["weights"], n_tokens)
    assert l.item() == pytest.approx(by_hand)


def test_kl_penalty_by_hand() -> None:
    y = torch.tensor([[5, IGNORE, 6]])
    w = torch.zeros(1, 3)  # advantage 0: only the KL term remains
    logp = torch.tensor([[-1.0, -3.0, -2.0]])
    ref = torch.tensor([[-1.5, 0.0, -2.0]])
    loss, kl = policy_loss(logp, y, w, 2, ref, kl_coef=0.1)
    r = -0.5  # ref - logp at the first target; 0 at the second
    expected_kl = (math.exp(r) - r - 1) / 2
    assert kl.item() == pytest.approx(expected_kl)
    assert loss.item() == pytest.approx(0.1 * expected_kl)
    no_kl, _ = policy_loss(logp, y, w, 2, ref, kl_coef=0.0)
    assert no_kl.item() == 0.0


def test_gradient_pushes_up_positive_advantage_tokens() -> None:
    """With the real model path (logp = -CE), one SGD step on the loss makes the positively rewarded
    sampled token more likely and the negatively rewarded one less likely, and leaves the masked
    (forced) position's target without gradient."""
    from picochat.config import ModelConfig
    from picochat.model.gpt import build_model
    from picochat.train.rl_loss import target_logprobs

    model = build_model(ModelConfig(vocab_size=32, seq_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=2),
                        torch.device("cpu"), seed=0)
    good = token_rows([1, 2], [7], [True], advantage=1.0)
    bad = token_rows([1, 2], [9], [True], advantage=-1.0)
    batch = collate([good, bad])
    before = torch.log_softmax(model(batch["inputs"])[0, -1], -1)
    logp = target_logprobs(model, batch["inputs"], batch["targets"])
    assert logp[0, 0].item() == 0.0  # no target at the prompt position
    loss, _ = policy_loss(logp, batch["targets"], batch["weights"], 2)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = torch.log_softmax(model(batch["inputs"])[0, -1], -1)
    assert after[7] > before[7] and after[9] < before[9]


def test_logprobs_are_those_of_the_sampling_temperature() -> None:
    from picochat.config import ModelConfig
    from picochat.model.gpt import build_model
    from picochat.train.rl_loss import target_logprobs

    model = build_model(ModelConfig(vocab_size=32, seq_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=2),
                        torch.device("cpu"), seed=0)
    batch = collate([token_rows([1, 2, 3], [4, 5], [True, True], 1.0)])
    x, y = batch["inputs"], batch["targets"]
    logits = model(x)
    for t in (1.0, 1.5):
        got = target_logprobs(model, x, y, temperature=t)
        want = torch.log_softmax(logits / t, -1)[0, torch.arange(4), y[0].clamp(min=0)] * (y[0] != IGNORE)
        assert torch.allclose(got[0], want, atol=1e-5), t
