"""Loss maths against values worked out by hand (log sigmoid(x) = -log(1 + e^-x))."""

import math

import pytest
import torch

from losses import dpo_loss, ipo_loss, sft_loss


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
