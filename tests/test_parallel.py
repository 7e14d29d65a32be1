"""Parallelism helpers without processes: bad input named clearly, batch shares, clipping, LoRA
merging against hand-computed values."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.parallel import distributed, parallelize
from harness.models import lora
from train import check_config



@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_batch_that_ranks_do_not_divide_names_the_numbers(compose):
    cfg = compose("trainer=FSDPTrainer", "batch_size=6", "gradient_accumulation_steps=2")
    check_config(cfg, world_size=1)
    with pytest.raises(ValueError, match=r"batch_size=6 .* gradient_accumulation_steps=2 x 2 "
                                         r"data-parallel rank\(s\) = 4.*e\.g\. 8"):
        check_config(cfg, world_size=2)
    # tensor-parallel ranks share the same examples: only the data-parallel ones divide the batch
    check_config(compose("trainer=TensorParallelTrainer", "batch_size=6",
                      "gradient_accumulation_steps=2"), world_size=2)
    with pytest.raises(ValueError, match="tp_size=2 does not divide the 3 ranks"):
        check_config(compose("trainer=TensorParallelTrainer", "trainer.tp_size=2"), world_size=3)


def test_unknown_block_name_lists_the_blocks(model):
    with pytest.raises(ValueError, match=r"GPT2Block.*block classes found: \['LlamaDecoderLayer'\]"):
        parallelize.find_blocks(model, "GPT2Block")
    assert len(parallelize.find_blocks(model, None)) == 2  # from _no_split_modules


def test_tp_degree_must_divide_heads(model):
    with pytest.raises(ValueError, match=r"tp_size=3 .*num_attention_heads=4.*\[1, 2, 4\]"):
        parallelize.check_tp_degree(model.config, 3)
    with pytest.raises(ValueError, match=r"tp_size=4 .*num_key_value_heads=2"):
        parallelize.check_tp_degree(model.config, 4)
    parallelize.check_tp_degree(model.config, 2)
    assert set(parallelize.tp_plan(model)) >= {"model.layers.*.self_attn.q_proj",
                                            "model.layers.*.mlp.down_proj"}


def test_processes_to_spawn(monkeypatch, compose):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.processes_to_spawn(compose("trainer=FSDPTrainer", "nproc_per_node=3")) == 3
    assert distributed.processes_to_spawn(compose("nproc_per_node=3")) == 0  # BasicTrainer
    assert distributed.processes_to_spawn(compose("trainer=FSDPTrainer")) == \
        (torch.cuda.device_count() if torch.cuda.device_count() > 1 else 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.processes_to_spawn(compose("trainer=FSDPTrainer", "nproc_per_node=3")) == 0
    assert distributed.planned_world_size(compose("trainer=FSDPTrainer")) == 2


def test_shard_batch_shares_and_stand_in():
    batch = {"uid": ["a", "b", "c"], "x": torch.arange(3)}
    part, n = distributed.shard_batch(batch, 0, 2)
    assert part["uid"] == ["a", "b"] and part["x"].tolist() == [0, 1] and n == 2
    part, n = distributed.shard_batch(batch, 1, 2)
    assert part["uid"] == ["c"] and n == 1
    part, n = distributed.shard_batch({"uid": ["a"], "x": torch.arange(1)}, 1, 2)
    assert part["uid"] == ["a"] and n == 0  # an empty share runs one stand-in row of weight 0
    whole, n = distributed.shard_batch(batch, 0, 1)
    assert whole["uid"] == ["a", "b", "c"] and n == 3


def test_clip_grad_norm_matches_torch():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    assert parallelize.clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.8]), atol=1e-6, rtol=0)


def test_merged_state_by_hand(compose):
    """W + (alpha / r) B A with r=1, alpha=2: [[1, 0], [0, 1]] + 2 * [[1], [2]] @ [[3, 4]]."""
    p = "base_model.model.layer"
    state = {f"{p}.base_layer.weight": torch.eye(2), f"{p}.base_layer.bias": torch.ones(2),
             f"{p}.lora_A.default.weight": torch.tensor([[3.0, 4.0]]),
             f"{p}.lora_B.default.weight": torch.tensor([[1.0], [2.0]]),
             "base_model.model.other.weight": torch.zeros(1)}
    merged = lora.merged_state(state, compose("model.lora.r=1", "model.lora.alpha=2").model.lora)
    assert set(merged) == {"layer.weight", "layer.bias", "other.weight"}
    torch.testing.assert_close(merged["layer.weight"], torch.tensor([[7.0, 8.0], [12.0, 17.0]]))
    torch.testing.assert_close(merged["layer.bias"], torch.ones(2))


def test_lora_reference_is_the_base_model(model, compose):
    policy = lora.apply_lora(LlamaForCausalLM(model.config), compose("model.lora.r=2").model.lora)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # adapters that change the output
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        with lora.adapters_disabled(policy):
            off = policy(input_ids=ids).logits
        base = lora.causal_lm(policy)
        assert not torch.allclose(adapted, off)
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="model.lora.r=0"):
        lora.apply_lora(LlamaForCausalLM(model.config), compose("model.lora.r=0").model.lora)


@pytest.mark.slow
def test_self_launch_checks_the_batch_before_starting_processes(tmp_path):
    """`python train.py trainer=FSDPTrainer nproc_per_node=2` with a batch 2 ranks cannot split
    fails at once, naming the numbers, and no process, run dir or model is started."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "train.py"), "trainer=FSDPTrainer",
                          "nproc_per_node=2", "batch_size=5", f"local_dirs=[{tmp_path}]"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert "batch_size=5 is not divisible by gradient_accumulation_steps=1 x 2" in out.stderr
    assert "starting 2 processes" not in out.stdout and not list(tmp_path.glob("toy_sft_*"))
