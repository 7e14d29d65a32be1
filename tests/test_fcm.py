"""Forgetful causal masking: the mask's structure, its drop rate, that the Hugging Face model
really attends through it (sdpa and eager), and that it is off at evaluation."""

from types import SimpleNamespace

import pytest
import torch

from harness.objectives.coh import coh_step
from harness.objectives.fcm import fcm_attention_mask, past_drop_fraction
from harness.models.modeling import load_model


def visible(mask4d):
    return mask4d[:, 0] == 0  # [batch, query, key]


def test_structure_first_token_self_causal_padding():
    attn = torch.ones(8, 12, dtype=torch.long)
    attn[3, 9:] = 0  # a right-padded example
    v = visible(fcm_attention_mask(attn, 0.5, 0.9, generator=torch.Generator().manual_seed(0)))
    assert v[:, :, 0].all()                                    # token 0 always visible
    assert v[:, torch.arange(12), torch.arange(12)][:, :9].all()  # every real query sees itself
    assert not (v & ~torch.ones(12, 12, dtype=torch.bool).tril()).any()  # never the future
    assert not v[3, :, 9:].any()                               # never padding
    assert (~v[:, 5:, 1:5]).any()                              # and it does drop past keys


def test_zero_rate_is_the_plain_causal_mask():
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    v = visible(fcm_attention_mask(attn, 0.0, 0.0))
    expected = torch.ones(4, 4, dtype=torch.bool).tril()[None] & attn.bool()[:, None, :]
    assert torch.equal(v, expected)


@pytest.mark.parametrize("low, high", [(0.0, 0.15), (0.3, 0.3), (0.1, 0.5)])
def test_hits_the_requested_drop_rate_on_average(low, high):
    attn = torch.ones(64, 48, dtype=torch.long)
    mask = fcm_attention_mask(attn, low, high, generator=torch.Generator().manual_seed(1))
    rates = past_drop_fraction(mask, attn)
    assert rates.mean().item() == pytest.approx((low + high) / 2, abs=0.02)
    # each example stays near its own r in [low, high] (binomial noise: ~0.015 per example)
    assert rates.min().item() >= low - 0.06 and rates.max().item() <= high + 0.06


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="fcm_min"):
        fcm_attention_mask(torch.ones(1, 3), 0.2, 0.1)


@pytest.fixture(scope="module")
def model():
    return load_model("assets/tiny_model", "float32").eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_model_attends_through_the_4d_mask(model, impl):
    model.set_attn_implementation(impl)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attn).logits
        same = model(input_ids=ids, attention_mask=fcm_attention_mask(attn, 0.0, 0.0)).logits
        torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
        # query 3 may only see token 0 and itself: tokens 1 and 2 cannot reach it any more,
        # while under the plain mask they do
        custom = fcm_attention_mask(attn, 0.0, 0.0)
        custom[0, 0, 3, 1:3] = torch.finfo(torch.float32).min
        other = ids.clone()
        other[0, 1:3] = torch.tensor([40, 41])
        a = model(input_ids=ids, attention_mask=custom).logits[0, 3]
        b = model(input_ids=other, attention_mask=custom).logits[0, 3]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        changed = model(input_ids=other, attention_mask=attn).logits[0, 3]
        assert not torch.allclose(plain[0, 3], changed, atol=1e-4)
    model.set_attn_implementation("sdpa")


def test_fcm_is_applied_in_training_and_off_at_eval():
    seen = []

    def forward(model, batch):
        seen.append(batch["chosen_attention_mask"].dim())
        n = batch["chosen_labels"].ne(-100).sum(-1)
        return -n.float(), n

    data = SimpleNamespace(settings=SimpleNamespace(fcm_min=0.0, fcm_max=0.15), pt_stream=None)
    from harness.objectives import StepContext
    ctx = StepContext(policy=torch.nn.Linear(1, 1), forward=forward, reference_logps=None,
                      options=SimpleNamespace(pt_loss_weight=0.0), device="cpu", tokenizer=None,
                      data=data)
    batch = {"uid": ["a", "b"], "chosen_attention_mask": torch.ones(2, 5, dtype=torch.long),
             "chosen_labels": torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]])}
    _, train_metrics = coh_step(ctx, batch, "train")
    _, eval_metrics = coh_step(ctx, batch, "eval")
    assert seen == [4, 2]
    assert "fcm/drop_rate" in train_metrics and "fcm/drop_rate" not in eval_metrics
    assert eval_metrics["loss/eval"].tolist() == [1.0, 1.0]  # 5 tokens, NLL 1 each
