"""The loss table: `loss=NAME` picks a LossSpec here; the loop never branches on the name.

A LossSpec says which pure function from losses.py computes the loss, what examples it trains on,
and how one (micro-)batch turns into that loss: `step(trainer, batch, split)` returns the mean
loss and per-example metric tensors named as in the reference code. A new objective registers
its own spec (from its own module if it has one) and the loop, checkpoints and logging work
unchanged.
"""

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf

import losses
from harness import registry


@dataclass(frozen=True)
class LossSpec:
    fn: Callable           # the pure loss function of losses.py
    paired: bool           # trains on (chosen, rejected) pairs rather than single SFT targets
    step: Callable | None  # step(trainer, batch, split) -> (mean loss, {metric: [batch] tensor})
    uses_reference: bool = False  # needs reference log-probs (unless loss.reference_free=true)
    # a class whose constructor takes the loss.* options and checks their values (default: the
    # options are fn's keyword parameters, checked by name only)
    options: type | None = None
    # load_policy(cfg, archive, device_map, meta) -> the model to train (default: the causal LM of model.*)
    load_policy: Callable | None = None
    # {trainer name: loop class} used instead of trainer=...'s offline loop, same constructor
    # (PPO's rollout loop, in one process or on sharded models)
    trainer: dict | None = None
    # whether the offline loop may sample text from the policy at evaluation (not a reward model)
    samples: bool = True
    # checkpoint_files(trainer, tmp_dir): extra files written into every checkpoint dir
    checkpoint_files: Callable | None = None
    # loss.* keys read by the step / data hooks rather than by `fn` (so typos still fail)
    extra_options: tuple[str, ...] = ()
    # data(cfg, tokenizer) -> ExampleFormat: how records become examples and tokens; None keeps
    # the standard SFT targets / preference pairs (CoH builds hindsight chains instead)
    data: Callable | None = None
    # check(cfg, world_size) raises on bad loss options before any model loads
    # (train.check_config; world_size: the number of ranks the run will have)
    check: Callable | None = None
    # prompt_suffix(cfg) -> text appended to every prompt when sampling from a model trained
    # with this loss (CoH: its positive feedback phrase); None: prompts are used as they are
    prompt_suffix: Callable | None = None


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, spec: LossSpec) -> LossSpec:
    return registry.add(LOSSES, "loss", name, spec)


def get_loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss={name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def loss_kwargs(loss_cfg) -> dict:
    """The loss config minus its name and the spec's `extra_options`, checked by name against
    the parameters of `spec.options` (a class that also checks values) or else of `spec.fn`."""
    spec = get_loss_spec(loss_cfg.name)
    kwargs = {k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items()
              if k != "name" and k not in spec.extra_options}
    params = inspect.signature(spec.options or spec.fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = set(kwargs) - set(params)
        if unknown:
            known = (set(params) | set(spec.extra_options)) - {"policy_chosen_logps"}
            raise ValueError(f"loss.{sorted(unknown)[0]} is not an option of loss={loss_cfg.name}"
                             f" (options: {sorted(known)})")
    if spec.options is not None:
        spec.options(**kwargs)  # raises, naming the option, on a bad value
    return kwargs


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    """The model that `loss=` trains: the loss's own loader, or the causal LM of model.*.
    device_map / meta place it as harness.models.modeling.load_model does (GPUs; ranks without weights)."""
    spec = get_loss_spec(cfg.loss.name)
    if spec.load_policy is not None:
        return spec.load_policy(cfg, archive, device_map, meta)
    from harness.models.modeling import load_model
    return load_model(cfg.model.name_or_path, cfg.model.policy_dtype, archive, device_map, meta)


def needs_reference(loss_cfg) -> bool:
    """Whether this loss config reads reference log-probs (so a reference model must load)."""
    spec = get_loss_spec(loss_cfg.name)
    return spec.uses_reference and not loss_cfg.get("reference_free", False)


def sampling_prompt_suffix(cfg) -> str:
    """What to append to prompts when sampling from a model trained with run config `cfg`."""
    spec = get_loss_spec(cfg.loss.name)
    return spec.prompt_suffix(cfg) if spec.prompt_suffix else ""


def sft_step(trainer, batch, split: str):
    """Negative log-likelihood of the SFT targets."""
    logps, n = trainer.forward(trainer.policy, batch)
    losses_ = trainer.spec.fn(logps, n, **trainer.loss_kwargs)
    return losses_.mean(), {f"loss/{split}": losses_, f"logps_{split}/chosen": logps}


def preference_step(trainer, batch, split: str):
    """A DPO-family loss of (policy, reference) log-probs of chosen and rejected responses."""
    chosen, rejected, _, _ = trainer.forward(trainer.policy, batch)
    if needs_reference(trainer.cfg.loss):
        ref_chosen, ref_rejected = trainer.reference_logps(batch)
    else:
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    losses_, r_chosen, r_rejected = trainer.spec.fn(chosen, rejected, ref_chosen, ref_rejected,
                                                    **trainer.loss_kwargs)
    return losses_.mean(), {
        f"rewards_{split}/chosen": r_chosen, f"rewards_{split}/rejected": r_rejected,
        f"rewards_{split}/accuracies": (r_chosen > r_rejected).float(),
        f"rewards_{split}/margins": r_chosen - r_rejected,
        f"logps_{split}/chosen": chosen, f"logps_{split}/rejected": rejected,
        f"loss/{split}": losses_}


register_loss("sft", LossSpec(losses.sft_loss, paired=False, step=sft_step))
register_loss("dpo", LossSpec(losses.dpo_loss, paired=True, step=preference_step,
                              uses_reference=True))
register_loss("ipo", LossSpec(losses.ipo_loss, paired=True, step=preference_step,
                              uses_reference=True))


# Last, because these modules import LossSpec and register_loss from here: CoH, reward
# modelling and PPO live in their own modules and register their specs on import.
import harness.objectives.coh  # noqa: E402,F401
import harness.models.reward_model  # noqa: E402,F401
import harness.rl.ppo  # noqa: E402,F401
