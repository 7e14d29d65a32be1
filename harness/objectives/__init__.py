"""The loss table: `loss=NAME` picks a LossSpec here; the loop never branches on the name.

A LossSpec says what a loss trains on (pairs or single targets), which loss.* options it takes
(a dataclass whose constructor checks their values), and how one (micro-)batch turns into the
loss: `step(ctx, batch, split)` gets a small StepContext (the policy, a forward that gives
log-probs, the reference log-probs, the options, ...), never the trainer, and returns the mean
loss and per-example metric tensors named as in the reference code.

The table imports none of its entries. Each loss registers its spec from its own module
(`register_loss`), and the built-in ones are imported by name on first lookup (BUILTIN), as
torchtitan's get_train_spec does: a new objective adds one module and one BUILTIN line, or
registers itself from user code before train.run.
"""

import difflib
import importlib
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable

import torch
from omegaconf import OmegaConf

from harness import registry


@dataclass(frozen=True)
class LossSpec:
    paired: bool           # trains on (chosen, rejected) pairs rather than single SFT targets
    step: Callable | None  # step(ctx, batch, split) -> (mean loss, {metric: [batch] tensor})
    # the loss.* options: a dataclass whose constructor checks their values (field = option)
    options: type
    # needs reference log-probs (unless loss.reference_free=true); or uses_reference(loss_cfg)
    # -> bool when the options decide (GRPO: beta > 0)
    uses_reference: bool | Callable = False
    # load_policy(cfg, archive, device_map, meta) -> the model to train (default: the causal LM)
    load_policy: Callable | None = None
    # the loop class that runs this loss instead of the offline loop (PPO's rollout loop)
    loop: type | None = None
    # whether the offline loop may sample text from the policy at evaluation (not a reward model)
    samples: bool = True
    # checkpoint_files(ctx, ckpt_dir, eval_batches, cfg): extra files in every checkpoint dir
    checkpoint_files: Callable | None = None
    # data(cfg, tokenizer) -> ExampleFormat: how records become examples and tokens; None keeps
    # the standard SFT targets / preference pairs (CoH builds hindsight chains instead). The
    # step sees the returned object as ctx.data (CoH: its settings and pretraining stream)
    data: Callable | None = None
    # check(cfg, world_size) raises on bad loss options before any model loads
    # (train.check_config; world_size: the number of ranks the run will have)
    check: Callable | None = None
    # prompt_suffix(cfg) -> text appended to every prompt when sampling from a model trained
    # with this loss (CoH: its positive feedback phrase); None: prompts are used as they are
    prompt_suffix: Callable | None = None
    # top-level options the offline loop reads that this step cannot honour (refused when set)
    ignores: tuple[str, ...] = ()
    # batch_stats(ctx, part, n) -> {name: scalar tensor}: sums over the n real examples of a
    # part of a batch, added up over the whole batch (its micro-batches and ranks) before the
    # steps of its micro-batches, which read the totals as ctx.batch_stats (KTO's KL estimate)
    batch_stats: Callable | None = None
    # the rollout loop's per-method part (harness/rl: PPO, GRPO, RLOO, online DPO), built by
    # the loop as rollout(loop, policy, reference); with loop = harness.rl.loop.RolloutLoop
    rollout: Callable | None = None
    # meant to start from an SFT model (model.archive): without one, a notice says so
    from_sft: bool = False


@dataclass
class StepContext:
    """What a loss step may use. Built once by the loop; `step` is updated before each step."""
    policy: torch.nn.Module
    # forward(model, batch) -> summed log-probs of the responses: (chosen, n_chosen) for single
    # targets, (chosen, rejected, n_chosen, n_rejected) for pairs, with the run's autocast,
    # packing / prefix sharing and sharded-head gathering applied
    forward: Callable
    # reference_logps(batch) -> (chosen, rejected) under the reference (cached or computed);
    # None when the run is reference-free
    reference_logps: Callable | None
    options: object        # the loss's options dataclass
    device: torch.device
    tokenizer: object
    autocast: Callable = nullcontext  # () -> the run's autocast context (amp_dtype)
    data: object = None    # what spec.data returned (the loss's own state)
    micro_batches: int = 1  # micro-batches per optimizer step (gradient_accumulation_steps)
    step: int = 0          # optimizer steps taken so far
    batch_stats: dict | None = None  # spec.batch_stats totals of the current batch


LOSSES: dict[str, LossSpec] = {}
# the built-in losses: name -> the module that registers it, imported on first lookup
BUILTIN = {"sft": "harness.objectives.core", "dpo": "harness.objectives.core",
           "ipo": "harness.objectives.core", "coh": "harness.objectives.coh",
           "reward": "harness.objectives.reward", "kto": "harness.objectives.kto",
           "simpo": "harness.objectives.simpo", "orpo": "harness.objectives.orpo",
           "ppo": "harness.rl.ppo", "grpo": "harness.rl.grpo", "rloo": "harness.rl.rloo",
           "online_dpo": "harness.rl.online_dpo"}


def register_loss(name: str, spec: LossSpec) -> LossSpec:
    return registry.add(LOSSES, "loss", name, spec)


def known_losses() -> list[str]:
    return sorted(set(LOSSES) | set(BUILTIN))


def get_loss_spec(name: str) -> LossSpec:
    if name not in LOSSES and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in LOSSES:
        raise ValueError(f"unknown loss={name!r}; choose one of {known_losses()}")
    return LOSSES[name]


def option_names(spec: LossSpec) -> list[str]:
    return [f.name for f in fields(spec.options)]


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def loss_options(loss_cfg):
    """The options object of loss_cfg (its name removed): unknown keys are refused with the real
    options and a near match; the options class refuses bad values, naming the key."""
    spec = get_loss_spec(loss_cfg.name)
    given = {k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items()
             if k != "name"}
    known = option_names(spec)
    for key in sorted(set(given) - set(known)):
        raise ValueError(f"loss.{key} is not an option of loss={loss_cfg.name}: "
                         f"{did_you_mean(key, known)}its options are {', '.join(known)}")
    return spec.options(**given)


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    """The model that `loss=` trains: the loss's own loader, or the causal LM of model.*.
    device_map / meta place it as harness.models.modeling.load_model does."""
    spec = get_loss_spec(cfg.loss.name)
    if spec.load_policy is not None:
        return spec.load_policy(cfg, archive, device_map, meta)
    from harness.models.modeling import load_model
    return load_model(cfg.model.name_or_path, cfg.model.policy_dtype, archive, device_map, meta)


def base_model_notice(cfg):
    """One line when a loss meant to start from an SFT model runs without model.archive (DPO
    would otherwise train the base model against itself without a word)."""
    spec = get_loss_spec(cfg.loss.name)
    if spec.from_sft and not cfg.model.archive:
        who = "the policy and the reference are" if needs_reference(cfg.loss) else "the policy is"
        print(f"notice: loss={cfg.loss.name} without model.archive: {who} the base model "
              f"{cfg.model.name_or_path} (these losses usually start from an SFT checkpoint: "
              "model.archive=SFT_RUN_DIR)")


def needs_reference(loss_cfg) -> bool:
    """Whether this loss config reads reference log-probs (so a reference model must load)."""
    spec = get_loss_spec(loss_cfg.name)
    if callable(spec.uses_reference):
        return bool(spec.uses_reference(loss_cfg))
    return spec.uses_reference and not loss_cfg.get("reference_free", False)


def sampling_prompt_suffix(cfg) -> str:
    """What to append to prompts when sampling from a model trained with run config `cfg`."""
    spec = get_loss_spec(cfg.loss.name)
    return spec.prompt_suffix(cfg) if spec.prompt_suffix else ""


def preference_metrics(split: str, losses_, chosen_rewards, rejected_rewards, chosen_logps=None,
                       rejected_logps=None) -> dict:
    """The reference code's metrics of a pairwise loss, per example."""
    out = {f"rewards_{split}/chosen": chosen_rewards, f"rewards_{split}/rejected": rejected_rewards,
           f"rewards_{split}/accuracies": (chosen_rewards > rejected_rewards).float(),
           f"rewards_{split}/margins": chosen_rewards - rejected_rewards, f"loss/{split}": losses_}
    if chosen_logps is not None:
        out.update({f"logps_{split}/chosen": chosen_logps, f"logps_{split}/rejected": rejected_logps})
    return out
