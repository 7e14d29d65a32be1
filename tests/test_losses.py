"""Loss maths against values worked out by hand (log sigmoid(x) = -log(1 + e^-x))."""

import math

import pytest
import torch

from losses import coh_loss, dpo_loss, ipo_loss, masked_nll, sft_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# policy chosen/rejected, reference chosen/rejected for two examples
PC, PR, RC, RR = t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -3.0), t(-2.0, -3.0)
# h = (pc - pr) - (rc - rr) = (2 - 0, -2 - 0) = (2, -2)


def test_dpo_hand_computed():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # beta * h = (1, -1): loss = log(1 + e^-1), log(1 + e^1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.e)])
    assert chosen.tolist() == pytest.approx([0.5 * 1.0, 0.5 * -1.0])     # beta (pc - rc)
    assert rejected.tolist() == pytest.approx([0.5 * -1.0, 0.5 * 1.0])   # beta (pr - rr)


def test_conservative_dpo_hand_computed():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.25)
    a, b = math.log1p(math.exp(-1)), math.log1p(math.e)  # -log sig(1), -log sig(-1)
    assert losses.tolist() == pytest.approx([0.75 * a + 0.25 * b, 0.75 * b + 0.25 * a])


def test_dpo_reference_free_ignores_reference():
    losses, chosen, _ = dpo_loss(PC, PR, RC * 100, RR * 7, beta=1.0, reference_free=True)
    # h = pc - pr = (2, -2)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-2)), math.log1p(math.exp(2))])
    assert chosen.tolist() == pytest.approx([-1.0, -4.0])


def test_ipo_hand_computed():
    losses, _, _ = ipo_loss(PC, PR, RC, RR, beta=0.25)
    # target 1 / (2 * 0.25) = 2: (2 - 2)^2 = 0, (-2 - 2)^2 = 16
    assert losses.tolist() == pytest.approx([0.0, 16.0])


def test_dpo_gradient_sign():
    pc = t(-1.0).requires_grad_()
    losses, _, _ = dpo_loss(pc, t(-1.0), t(-1.0), t(-1.0), beta=0.1)
    losses.sum().backward()
    # d/dpc -log sig(beta h) = -beta * sig(-beta h) = -0.1 * 0.5 at h = 0
    assert pc.grad.item() == pytest.approx(-0.05)


def test_sft_sequence_and_token_mean():
    logps, n = t(-6.0, -2.0), torch.tensor([3, 1])
    assert sft_loss(logps, n).tolist() == [6.0, 2.0]
    # token mean: total NLL 8 over 4 tokens = 2 per token
    assert sft_loss(logps, n, token_mean=True).mean().item() == pytest.approx(2.0)


# ---------------------------------------------------------------- Chain of Hindsight
def test_masked_nll_averages_over_trained_tokens_only():
    # log p = ln(1/2), ln(1/4), ln(1/8) on trained tokens; the last column is padding
    logps = t(math.log(0.5), math.log(0.25), -99.0), t(math.log(0.125), -7.0, -99.0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (ln 2 + ln 4 + ln 8) / 3 = 6 ln 2 / 3 = 2 ln 2 (dividing by all 6 tokens would give ln 2)
    assert masked_nll(torch.stack(logps), mask).item() == pytest.approx(2 * math.log(2))


def test_coh_loss_hand_computed():
    chain_logps, n = t(-3.0, -1.0), torch.tensor([2, 2])
    loss, chain, pt = coh_loss(chain_logps, n)
    assert loss.item() == chain.item() == pytest.approx(1.0) and pt is None   # 4 / 4 tokens
    loss, chain, pt = coh_loss(chain_logps, n, t(-6.0), torch.tensor([3]), pt_loss_weight=0.5)
    assert pt.item() == pytest.approx(2.0) and loss.item() == pytest.approx(1.0 + 0.5 * 2.0)
    loss0, _, _ = coh_loss(chain_logps, n, t(-6.0), torch.tensor([3]), pt_loss_weight=0.0)
    assert loss0.item() == pytest.approx(1.0)


def test_coh_loss_equals_masked_nll_of_the_tiny_model():
    """Chunked summed log-probs of a chain batch -> coh_loss == masked NLL from full logits."""
    from harness.models.modeling import load_model, sequence_logps
    model = load_model("assets/tiny_model", "float32").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 1]])
    attn = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, 10], [-100, 12, 13, -100, -100, -100]])
    with torch.no_grad():
        logps, n = sequence_logps(model, ids, attn, labels, chunk_size=2)
        token_logps = model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)[:, :-1] \
            .gather(-1, ids[:, 1:, None])[..., 0]
    loss, _, _ = coh_loss(logps, n)
    expected = masked_nll(token_logps, labels[:, 1:] != -100)
    assert n.tolist() == [3, 2]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- KTO, SimPO, ORPO
def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_computed():
    from losses import kto_loss, kto_reference_point
    # r = policy - reference = (1, 0, -2); z0 = 0.5; beta = 1
    policy, reference = t(-1.0, -2.0, -3.0), t(-2.0, -2.0, -1.0)
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, reference, desirable, 0.5, beta=1.0,
                               desirable_weight=2.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([2 * (1 - sig(0.5)), 0.5 * (1 - sig(0.5)),
                                             2 * (1 - sig(-2.5))])
    assert rewards.tolist() == [1.0, 0.0, -2.0]
    # z0: the mean foreign log-ratio, clamped at 0 (a negative KL estimate is noise)
    assert kto_reference_point(3.0, 2).item() == 1.5 and kto_reference_point(-3.0, 2).item() == 0
    # policy == reference: r = 0 and z0 = 0, so every loss is lambda * (1 - sigmoid(0)) = lambda / 2
    losses, rewards = kto_loss(policy, policy, desirable, kto_reference_point(0.0, 3), beta=0.1)
    assert losses.tolist() == [0.5, 0.5, 0.5] and rewards.tolist() == [0.0, 0.0, 0.0]


def test_kto_gradient_pushes_desirable_up_and_undesirable_down():
    from losses import kto_loss
    policy = t(-2.0, -2.0).requires_grad_()
    losses, _ = kto_loss(policy, t(-2.0, -2.0), torch.tensor([True, False]), 0.0, beta=0.5)
    losses.sum().backward()
    # d/dr lambda (1 - sigmoid(beta r)) = -beta sigmoid'(0) = -0.5 * 0.25; the undesirable: +
    assert policy.grad.tolist() == pytest.approx([-0.125, 0.125])


def test_simpo_hand_computed():
    from losses import simpo_loss
    # mean log-probs: chosen (-4/2, -6/3) = (-2, -2), rejected (-3/1, -2/4) = (-3, -0.5)
    chosen, rejected, n_c, n_r = t(-4.0, -6.0), t(-3.0, -2.0), torch.tensor([2, 3]), torch.tensor([1, 4])
    losses, r_c, r_r = simpo_loss(chosen, rejected, n_c, n_r, beta=2.0, gamma=1.0)
    # rewards beta * mean: (-4, -4) and (-6, -1); h = r_c - r_r - gamma = (1, -4)
    assert r_c.tolist() == [-4.0, -4.0] and r_r.tolist() == [-6.0, -1.0]
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(4))])
    smoothed, _, _ = simpo_loss(chosen, rejected, n_c, n_r, beta=2.0, gamma=1.0,
                                label_smoothing=0.25)
    a, b = math.log1p(math.exp(-1)), math.log1p(math.exp(1))  # -log sig(1), -log sig(-1)
    assert smoothed[0].item() == pytest.approx(0.75 * a + 0.25 * b)
    # gamma = 0 and equal mean log-probs: ln 2, whatever the lengths
    losses, _, _ = simpo_loss(t(-2.0), t(-6.0), torch.tensor([1]), torch.tensor([3]), 1.0, 0.0)
    assert losses.item() == pytest.approx(math.log(2))


def test_orpo_hand_computed():
    from losses import orpo_log_odds_ratio, orpo_loss
    # mean log-probs m_c = -2 / 2 = -1, m_r = -6 / 3 = -2; log odds(m) = m - log(1 - e^m)
    log_odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    ratio = log_odds(-1.0) - log_odds(-2.0)
    assert ratio == pytest.approx(1 + math.log((1 - math.exp(-2)) / (1 - math.exp(-1))))
    assert orpo_log_odds_ratio(t(-1.0), t(-2.0)).item() == pytest.approx(ratio)
    losses, r_c, r_r = orpo_loss(t(-2.0), t(-6.0), torch.tensor([2]), torch.tensor([3]), beta=0.5)
    # SFT term: the chosen answer's mean NLL, 1; odds term -log sigmoid(ratio), weighted 0.5
    assert losses.item() == pytest.approx(1.0 + 0.5 * math.log1p(math.exp(-ratio)))
    assert (r_c.item(), r_r.item()) == pytest.approx((-0.5, -1.0))
    # P(y) = 1 exactly: finite (clamped), not inf / nan
    assert torch.isfinite(orpo_loss(t(0.0), t(-1.0), torch.tensor([2]), torch.tensor([2]), 0.1)[0]).all()
