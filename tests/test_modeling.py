"""The chunked log-prob head equals the plain full-logits computation, values and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.models.modeling import check_model_source, load_archive, plain_sequence_logps, sequence_logps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0          # right padding
    labels = ids.clone()
    labels[:, :4] = -100     # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_equals_plain(model, chunk):
    ids, mask, labels = batch()
    model.zero_grad()
    fast, n_fast = sequence_logps(model, ids, mask, labels, chunk_size=chunk)
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain, n_plain = plain_sequence_logps(model, ids, mask, labels)
    plain.sum().backward()
    assert torch.equal(n_fast, n_plain) and n_fast.tolist() == [8, 5, 8]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for a, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        check_model_source(str(tmp_path / "nope"))


def test_archive_mismatch_is_clear(model, tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 3, "state": {"foo.weight": torch.zeros(1)}, "metrics": {}}, path)
    with pytest.raises(ValueError, match="does not match"):
        load_archive(model, str(path))
