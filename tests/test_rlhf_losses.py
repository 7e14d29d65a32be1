"""Reward-model and PPO maths against values worked out by hand."""

import math

import pytest
import torch

from losses import (adaptive_kl_coef, binned_rating_loss, bradley_terry_loss, expected_rating,
                    explained_variance, gae, kl_penalty, masked_whiten, ppo_policy_loss,
                    ppo_value_loss)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_bradley_terry_with_margin_and_centering():
    rc, rr = t(2.0, 0.0), t(0.0, 1.0)
    losses, chosen, rejected = bradley_terry_loss(rc, rr)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-2)), math.log1p(math.exp(1))])
    assert chosen.tolist() == [2.0, 0.0] and rejected.tolist() == [0.0, 1.0]
    # margin 1: -log sig(2 - 1), -log sig(-1 - 1); centering 0.5 * (r_w + r_l)^2 = 2, 0.5
    losses, _, _ = bradley_terry_loss(rc, rr, margin=1.0, center_coef=0.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)) + 2.0,
                                             math.log1p(math.exp(2)) + 0.5])


def test_binned_head_expected_rating_and_cross_entropy():
    logits = t([0.0, 0.0, math.log(2.0)])  # probabilities 1/4, 1/4, 1/2
    assert expected_rating(logits).item() == pytest.approx(0.25 + 0.5 + 1.5)
    assert binned_rating_loss(logits, torch.tensor([3])).item() == pytest.approx(math.log(2))
    assert binned_rating_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="1..3"):
        binned_rating_loss(logits, torch.tensor([4]))


def test_gae_hand_computed():
    rewards, values = t([0, 0, 1], [0, 2, 9]), t([0.5, 0.5, 0.5], [1, 2, 7])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas (0, 0, 0.5) -> A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0 + 0.5 * 0.25
    # row 1: the episode ends at t=1: delta1 = 2 - 2 = 0, delta0 = 0 + 2 - 1 = 1 -> A = (1, 0, 0)
    assert adv.tolist() == [[0.125, 0.25, 0.5], [1.0, 0.0, 0.0]]
    assert ret.tolist() == [[0.625, 0.75, 1.0], [2.0, 2.0, 0.0]]
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    # deltas (0 + .25 - .5, 0 + .25 - .5, .5) -> A2 = .5, A1 = -.25 + .25, A0 = -.25 + 0
    assert adv.tolist() == [[-0.25, 0.0, 0.5]]


def test_whitening_hand_computed():
    x, mask = t([2, 4, 6, 100]), t([1, 1, 1, 0])
    # masked mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2; padding -> 0
    assert masked_whiten(x, mask)[0].tolist() == pytest.approx([-1, 0, 1, 0])
    assert masked_whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([3, 4, 5, 0])


def test_clipped_policy_loss_hand_computed():
    new = torch.log(t([1.5, 0.5, 1.1]))
    old, adv, mask = torch.zeros_like(new), t([1, 1, -1]), torch.ones_like(new)
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    # max(-A r, -A clip(r)): (-1.5, -1.2) -> -1.2 (clipped); (-0.5, -0.8) -> -0.5; (1.1, 1.1) -> 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert approx_kl.item() == pytest.approx(sum(k3) / 3)


def test_policy_gradient_is_zero_where_clipped():
    new = torch.log(t([1.5, 0.5])).requires_grad_()
    loss, _, _ = ppo_policy_loss(new, torch.zeros(1, 2, dtype=torch.float64), t([1, 1]),
                                 torch.ones(1, 2), clip_range=0.2)
    loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlogp (-A r) / 2 = -0.5 / 2
    assert new.grad[0].tolist() == pytest.approx([0.0, -0.25])


def test_clipped_value_loss_hand_computed():
    values, old, returns = t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.6])
    loss, clipfrac = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # v_clip = (0.7, 0.3): max((1-2)^2, (0.7-2)^2) = 1.69; max(0.36, 0.09) = 0.36
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == [[1.0, -1.0]]
    # k3 with log r = ref - logp = (-1, 1): e^-1 - 1 + 1, e^1 - 1 - 1
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-1), math.e - 2])
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=gen) * 3, torch.randn(64, 32, generator=gen) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(a, b, "k2")


def test_adaptive_kl_controller():
    # error clipped to +0.2: 0.2 * (1 + 0.2 * 100 / 10000)
    assert adaptive_kl_coef(0.2, kl=12.0, target=6.0, horizon=10000, n_steps=100) == \
        pytest.approx(0.2004)
    # error 5.4 / 6 - 1 = -0.1
    assert adaptive_kl_coef(0.2, kl=5.4, target=6.0, horizon=10000, n_steps=100) == \
        pytest.approx(0.2 * (1 - 0.001))


def test_explained_variance():
    returns, mask = t([1, 2, 3]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)


# ------------------------------------------------------- GRPO / RLOO / DAPO / Dr. GRPO
def test_group_advantages_hand_computed():
    from losses import group_advantages
    rewards = t([1, 2, 3], [0, 0, 0])
    # group: centred by each group's mean, divided by its unbiased std (1 and 0) + 1e-4
    assert group_advantages(rewards).flatten().tolist() == pytest.approx(
        [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0])
    assert group_advantages(rewards, "none").tolist() == [[-1, 0, 1], [0, 0, 0]]  # Dr. GRPO
    # batch: the std of all six rewards: mean 1, squares 0+1+4+1+1+1 = 8, unbiased 8 / 5
    std = math.sqrt(8 / 5)
    assert group_advantages(rewards, "batch")[0].tolist() == pytest.approx(
        [-1 / (std + 1e-4), 0, 1 / (std + 1e-4)])
    with pytest.raises(ValueError, match="group, batch or none"):
        group_advantages(rewards, "global")


def test_rloo_baseline_leaves_one_out():
    from losses import rloo_advantages
    # r_1 - mean(r_2, r_3) = 1 - 2.5; r_2 - mean(1, 3) = 0; r_3 - 1.5
    assert rloo_advantages(t([1, 2, 3])).tolist() == [[-1.5, 0.0, 1.5]]
    assert rloo_advantages(t([5, 1])).tolist() == [[4.0, -4.0]]


def test_clipped_surrogate_with_clip_higher():
    from losses import clipped_surrogate
    new = torch.log(t([1.5, 0.5, 1.1]))
    loss, clipped = clipped_surrogate(new, torch.zeros_like(new), t([1, -1, 1]), 0.2, 0.28)
    # A = 1, ratio 1.5: max(-1.5, -1.28) (the upper clip is 1.28, not 1.2); A = -1, ratio 0.5:
    # max(0.5, 0.8); A = 1, ratio 1.1 inside the range
    assert loss[0].tolist() == pytest.approx([-1.28, 0.8, -1.1])
    assert clipped.tolist() == [[True, True, False]]


def test_aggregations_hand_computed_and_parts_add_up():
    from losses import aggregate, aggregation_denominator
    x, mask = t([1, 2, 3], [4, 5, 6]), t([1, 1, 0], [1, 0, 0])
    assert aggregate(x, mask, "token").item() == pytest.approx(7 / 3)        # DAPO
    assert aggregate(x, mask, "sequence").item() == pytest.approx(2.75)      # (1.5 + 4) / 2
    assert aggregate(x, mask, "sum").item() == pytest.approx(3.5)            # (3 + 4) / 2
    assert aggregate(x, mask, "constant", max_tokens=3).item() == pytest.approx(7 / 6)
    for how in ("token", "sequence", "sum", "constant"):  # micro-batches with the whole's N
        whole = aggregation_denominator(mask, how, 3)
        parts = sum(aggregate(x[i:i + 1], mask[i:i + 1], how, whole, 3) for i in range(2))
        assert parts.item() == pytest.approx(aggregate(x, mask, how, max_tokens=3).item()), how
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "mean")
