"""Every option of every config group composes, and bad configs fail before any model loads."""

from pathlib import Path

import pytest

from train import check_config
from harness.objectives import known_losses
from harness.parallel.distributed import TRAINERS

MODEL_KEYS = {"name_or_path", "tokenizer_name_or_path", "archive", "block_name", "policy_dtype",
              "reference_dtype", "fsdp_policy_mp", "lora"}
REFERENCE_KEYS = {
    "seed", "exp_name", "batch_size", "eval_batch_size", "debug", "fsdp_port", "datasets", "wandb",
    "local_dirs", "sample_during_eval", "n_eval_model_samples", "do_first_eval", "local_run_dir",
    "lr", "gradient_accumulation_steps", "max_grad_norm", "max_length", "max_prompt_length",
    "n_epochs", "n_examples", "n_eval_examples", "trainer", "optimizer", "warmup_steps",
    "activation_checkpointing", "eval_every", "minimum_log_interval_secs", "save_every",
    "prefs_path", "data_fraction", "num_turns"}


def options(group):
    return sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "config" / group)
                  .glob("*.yaml"))


def test_groups_have_the_promised_options():
    assert set(options("loss")) == {"sft", "dpo", "ipo", "coh", "reward", "ppo", "kto", "simpo",
                                    "orpo", "grpo", "rloo", "online_dpo"} == set(known_losses())
    assert set(options("trainer")) == set(TRAINERS)
    assert {"blank_model", "tiny", "gpt2", "gpt2-large", "gpt2-xl", "pythia28", "pythia69", "gptj",
            "llama7b", "llama2_7b", "llama2_13b", "llama2_70b", "mistral7b",
            "mixtral"} <= set(options("model"))


def test_default_config_has_every_reference_key_and_passes_checks(compose):
    cfg = compose()
    assert REFERENCE_KEYS <= set(cfg)
    assert set(cfg.wandb) == {"enabled", "entity", "project"}
    check_config(cfg)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes(model, compose):
    cfg = compose(f"model={model}", "model.name_or_path=x", "model.block_name=B")
    assert set(cfg.model) == MODEL_KEYS
    check_config(cfg)


# a non-default value for an option of each loss, so every file's keys are exercised
LOSS_OVERRIDES = {"sft": ["loss.token_mean=true"], "dpo": ["loss.beta=0.1"],
                  "ipo": ["loss.beta=0.1"], "reward": ["loss.margin=0.5", "loss.center_coef=0.01"],
                  "ppo": ["loss.reward_model=RM_RUN", "loss.adaptive_kl=true",
                          "loss.kl_estimator=k3", "loss.gold_reward=toy"],
                  "coh": ["loss.feedback_set=qa", "loss.chain_weights.comparison=1",
                          "loss.chain_weights.positive=1", "loss.chain_weights.negative=1",
                          "loss.fcm_max=0.15", "loss.pt_data=toy", "loss.pt_loss_weight=0.1",
                          "loss.inference_phrase=' A correct answer:'"],
                  "kto": ["loss.beta=0.2", "loss.desirable_weight=1.3", "loss.undesirable_weight=1"],
                  "simpo": ["loss.beta=2.5", "loss.gamma=1.2", "loss.label_smoothing=0.1"],
                  "orpo": ["loss.beta=0.2"],
                  "grpo": ["loss.scorer=gold:toy", "loss.scale_rewards=none", "loss.beta=0",
                           "loss.aggregation=token", "loss.clip_range_high=0.28",
                           "loss.mini_batch_size=8", "loss.drop_uniform_groups=true",
                           "loss.no_eos_penalty=-1", "loss.kl_in=reward", "loss.ppo_epochs=2"],
                  "rloo": ["loss.scorer=gold:toy", "loss.whiten_advantages=true",
                           "loss.kl_estimator=k3", "loss.num_generations=2"],
                  "online_dpo": ["loss.scorer=gold:toy", "loss.loss_type=dpo",
                                 "loss.label_smoothing=0.1", "loss.gold_reward=toy"]}


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_composes(loss, compose):
    cfg = compose(f"loss={loss}", *LOSS_OVERRIDES[loss])
    assert cfg.loss.name == loss
    check_config(cfg)


PRESET_OVERRIDES = {"ppo_toy": ["loss.reward_model=RM_RUN"], "reward_toy": [],
                    "grpo_toy": ["loss.scorer=gold:toy"], "rloo_toy": ["loss.scorer=gold:toy"],
                    "online_dpo_toy": ["loss.scorer=gold:toy"]}


@pytest.mark.parametrize("preset", options("preset"))
def test_every_preset_composes(preset, compose):
    cfg = compose(f"+preset={preset}", *PRESET_OVERRIDES[preset])
    assert cfg.loss.name == preset.rsplit("_", 1)[0]
    check_config(cfg)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_composes(trainer, compose):
    cfg = compose(f"trainer={trainer}", "model.lora.r=8" if trainer != "TensorParallelTrainer"
               else "trainer.tp_size=2", "nproc_per_node=2")
    assert cfg.trainer.name == trainer
    check_config(cfg, world_size=1 if trainer == "BasicTrainer" else 2)


@pytest.mark.parametrize("overrides, message", [
    (["loss=dpo"], "loss.beta"),
    (["model=blank_model"], "model.name_or_path"),
    (["datasets=[hh,nope]"], "registered"),
    (["optimizer=Adamm"], "torch.optim"),
    (["batch_size=5", "gradient_accumulation_steps=2"], "divisible"),
    (["save_every=epoch_x"], "save_every"),
    (["data_fraction=0"], "data_fraction"),
    (["micro_batch_tokens=0"], "micro_batch_tokens"),
    (["micro_batch_tokens=2048", "gradient_accumulation_steps=2", "batch_size=4"],
     "gradient_accumulation_steps=1"),
    (["loss=ppo", "loss.reward_model=R", "micro_batch_tokens=2048"],
     "micro_batch_tokens is not read by loss=ppo"),
    (["loss=coh", "loss.pt_data=toy", "micro_batch_tokens=2048"], "pretraining mix"),
    (["loss=dpo", "loss.beta=0.1", "+loss.gamma=1"], "loss.gamma"),
    # every accepted option is read: options no part of the run reads are refused, by name
    (["loss=ipo", "loss.beta=0.1", "+loss.label_smoothing=0.3"],
     "loss.label_smoothing is not an option of loss=ipo"),
    (["loss=dpo", "loss.beta=0.1", "+loss.bta=1"], "did you mean 'beta'"),
    (["loss=ppo", "loss.reward_model=R", "packing=true"], "packing is not read by loss=ppo"),
    (["loss=grpo", "loss.scorer=gold:toy", "health.max_grad_norm=5"],
     "health is not read by loss=grpo"),
    (["loss=ppo", "loss.reward_model=R", "amp_dtype=bfloat16"], "amp_dtype is not read"),
    (["loss=ppo", "loss.reward_model=R", "precompute_reference=false"],
     "precompute_reference is not read"),
    (["loss=reward", "prefix_sharing=true"], "prefix_sharing is not read by loss=reward"),
    (["loss=reward", "trainer=FSDPTrainer"], "trainer=BasicTrainer"),
    (["loss=sft", "precompute_reference=false"], "precompute_reference is not read by loss=sft"),
    (["loss=sft", "prefix_sharing=true"], "prefix_sharing is not read by loss=sft"),
    (["pack_length=64"], "pack_length is not read"),
    (["nproc_per_node=2"], "nproc_per_node is not read"),
    (["loss=dpo", "loss.beta=0"], "loss.beta=0"),
    (["loss=dpo", "loss.beta=-1"], "loss.beta=-1"),
    (["loss=ipo", "loss.beta=0"], "loss.beta=0"),
    (["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.6"], r"\[0, 0.5\)"),
    (["model.lora.r=0"], "model.lora.r"),
    (["model.lora.r=8", "trainer=TensorParallelTrainer"], "LoRA"),
    (["loss=ppo"], "loss=reward"),  # no reward model: says how to train one
    (["loss=ppo", "loss.reward_model=R", "batch_size=12", "loss.mini_batch_size=8"],
     "multiple of loss.mini_batch_size=8"),
    (["loss=ppo", "loss.reward_model=R", "loss.max_new_tokens=300"], "loss.max_new_tokens"),
    (["loss=ppo", "loss.reward_model=R", "activation_checkpointing=true"],
     "activation_checkpointing is not read by loss=ppo"),
    (["loss=ppo", "loss.reward_model=R", "gradient_accumulation_steps=3", "batch_size=24"],
     r"mini_batch_size=8 must be a multiple of the 1 data-parallel ranks x "
     "gradient_accumulation_steps=3"),
    (["loss=ppo", "loss.reward_model=R", "loss.kl_estimator=k2"], "loss.kl_estimator"),
    (["loss=reward", "loss.n_bins=5"], "loss.rating_source"),
    (["loss=reward", "loss.n_bins=5", "loss.rating_source=nope"], "registered"),
])
def test_bad_config_is_named(overrides, message, compose):
    with pytest.raises(ValueError, match=message):
        check_config(compose(*overrides), overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["loss=dpo", "loss.beta=0.1", "packing=true", "pack_length=256", "prefix_sharing=true",
     "amp_dtype=bfloat16", "precompute_reference=false", "logits_chunk_size=64"],
    ["loss=sft", "packing=true", "sample_temperature=0.7", "micro_batch_tokens=512"],
    ["loss=reward", "amp_dtype=bfloat16", "activation_checkpointing=true", "compile=true"],
    ["loss=ppo", "loss.reward_model=R", "fused_optimizer=true", "sample_during_eval=false",
     "minimum_log_interval_secs=5"],
    ["trainer=FSDPTrainer", "nproc_per_node=2", "fsdp_port=12355"],
])
def test_options_the_run_reads_are_accepted(overrides, compose):
    check_config(compose(*overrides), world_size=1, overrides=overrides)


def test_reference_command_lines_compose(compose):
    compose("model=blank_model", "model.name_or_path=PATH", "model.block_name=LlamaDecoderLayer",
         "datasets=[hh,shp]", "loss=sft", "exp_name=x", "gradient_accumulation_steps=2",
         "batch_size=64", "eval_batch_size=32", "trainer=BasicTrainer", "sample_during_eval=false")
    compose("model=pythia28", "datasets=[hh]", "loss=dpo", "loss.beta=0.1",
         "model.archive=RUN/LATEST/policy.pt", "exp_name=y")
    compose("loss=dpo", "loss.beta=0.05", "prefs_path=annotations.json", "datasets=[sharegpt]",
         "save_every=epoch_1", "n_epochs=3", "data_fraction=0.1")
