"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") as
`loss=kto`: unpaired desirable / undesirable completions, each valued against a reference point
z0, the KL(policy || reference) estimated from mismatched prompt / completion pairs.

    python train.py loss=kto loss.beta=0.1 model.archive=SFT/LATEST/policy.pt

Data: every preference pair of a canonical record becomes two examples, its chosen response
desirable and its rejected one undesirable (as TRL's unpair_preference_dataset); a record without
pairs gives its SFT target as a desirable example. Once a split is loaded, each example is given
the completion of another prompt (a seeded shuffle of the split, the next example with a
different prompt): that (prompt, foreign completion) pair is what z0 is estimated from. Examples
are ordinary pairs for the rest of the harness, chosen = the completion and rejected = the
foreign completion, so the reference cache, packing and sharding handle both as they handle DPO
pairs.

z0 is a statistic of the whole batch (LossSpec.batch_stats): the policy's log-probs of the
batch's foreign completions are summed over its micro-batches and ranks before the first
micro-batch's step (no gradient, as in the paper and TRL), so gradient accumulation and data
parallelism leave the loss unchanged (TRL estimates it per device micro-batch instead).
"""

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import losses
from harness.objectives import LossSpec, StepContext, register_loss
from harness.objectives.core import positive_beta
from preference_datasets import Example, ExampleFormat, load_examples


@dataclass(frozen=True)
class KTOOptions:
    """config/loss/kto.yaml documents each option and its source."""
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        positive_beta("kto", self.beta)
        for key in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value < math.inf:
                raise ValueError(f"loss.{key}={value!r} must be a positive finite number")


@dataclass(frozen=True)
class KTOExample(Example):
    """chosen: the completion; rejected: another prompt's completion (z0's); desirable: its label."""
    desirable: bool = True


def record_examples(prompt: str, record: dict) -> list[KTOExample]:
    """Both sides of every pair, or the SFT target (desirable) of a record without pairs; the
    foreign completions come later (KTOData.finish)."""
    mode, responses = record["truncation_mode"], record["responses"]
    if record["pairs"]:
        labelled = [(responses[i], desirable) for pair in record["pairs"]
                    for i, desirable in zip(pair, (True, False))]
    else:
        labelled = [(record["sft_target"], True)] if record["sft_target"] is not None else []
    return [KTOExample(prompt, text, None, mode, "", desirable=desirable) for text, desirable in labelled]


def pair_with_foreign_completions(examples: list, seed: int) -> list[KTOExample]:
    """Each example with the completion of the next example of a seeded shuffle whose prompt
    differs (deterministic per split and seed, so the reference cache can key on it)."""
    n = len(examples)
    if len({ex.prompt for ex in examples}) < 2:
        raise ValueError(f"loss=kto needs completions of at least 2 different prompts per split "
                         f"(its KL estimate pairs a prompt with another prompt's completion); got "
                         f"{n} examples of {len({ex.prompt for ex in examples})} prompt(s): give "
                         "more data, or a larger n_eval_examples for the held-out split")
    order = np.random.default_rng([seed, 0x4B544F]).permutation(n)
    out = [None] * n
    for pos, i in enumerate(order):
        ex = examples[i]
        step = 1
        while examples[order[(pos + step) % n]].prompt == ex.prompt:
            step += 1
        foreign = examples[order[(pos + step) % n]].chosen
        key = json.dumps([ex.prompt, ex.chosen, foreign, ex.desirable]).encode("utf-8")
        out[i] = replace(ex, rejected=foreign, uid=hashlib.sha256(key).hexdigest()[:16])
    return out


@dataclass(frozen=True)
class KTOData(ExampleFormat):
    """KTO's example format; `desirable` maps every loaded example's uid to its label."""
    seed: int = 0
    desirable: dict = field(default_factory=dict)

    def finish(self, examples: list) -> list:
        paired = pair_with_foreign_completions(examples, self.seed)
        self.desirable.update((ex.uid, ex.desirable) for ex in paired)
        return paired

    def describe(self, examples: list) -> str:
        good = sum(ex.desirable for ex in examples)
        return f"; KTO: {good} desirable / {len(examples) - good} undesirable completions"


def kto_data(cfg, tokenizer) -> KTOData:
    return KTOData(record_examples=record_examples, seed=cfg.seed)


def foreign_side(batch: dict) -> dict:
    """The batch with its foreign completions (rejected_*) in the chosen_* places."""
    return {**{k: v for k, v in batch.items() if not k.startswith(("chosen_", "rejected_"))},
            **{"chosen_" + k[len("rejected_"):]: v for k, v in batch.items()
               if k.startswith("rejected_")}}


def own_side(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("rejected_")}


def labels_of(ctx: StepContext, batch: dict) -> torch.Tensor:
    return torch.tensor([ctx.data.desirable[u] for u in batch["uid"]], device=ctx.device)


def kto_batch_stats(ctx: StepContext, part: dict, n: int) -> dict:
    """Sums over the n real examples of `part`: the foreign log-ratios (for z0), the examples and
    the desirable ones among them."""
    with torch.no_grad():
        policy, _ = ctx.forward(ctx.policy, foreign_side(part), paired=False)
        _, reference = ctx.reference_logps(part)
    return {"kl_sum": (policy - reference)[:n].sum(), "count": torch.tensor(float(n)),
            "desirable": labels_of(ctx, part)[:n].float().sum()}


def kto_step(ctx: StepContext, batch, split: str):
    """KTO's loss of each completion against the whole batch's z0. Rewards are logged as the
    means over the batch's desirable (rewards_*/chosen) and undesirable (rejected) ones."""
    logps, _ = ctx.forward(ctx.policy, own_side(batch), paired=False)
    reference, _ = ctx.reference_logps(batch)
    desirable = labels_of(ctx, batch)
    stats, o = ctx.batch_stats, ctx.options
    z0 = losses.kto_reference_point(stats["kl_sum"], stats["count"])
    losses_, rewards = losses.kto_loss(logps, reference, desirable, z0, o.beta,
                                       o.desirable_weight, o.undesirable_weight)
    good, count = stats["desirable"], stats["count"]
    # per example, so that their mean over the batch is the mean over its desirable ones
    weight = torch.where(desirable, count / max(good, 1), count / max(count - good, 1))
    return losses_.mean(), {
        f"loss/{split}": losses_, f"kl_{split}/reference_point": z0.expand(len(losses_)),
        f"rewards_{split}/chosen": rewards * desirable * weight,
        f"rewards_{split}/rejected": rewards * ~desirable * weight,
        f"logps_{split}/chosen": logps.detach()}


def check(cfg, world_size: int):
    """Data with both labels and two prompts, before any model loads (the train split is read
    here once; hub datasets come from their local cache the second time)."""
    train = load_examples(list(cfg.datasets), "train", sft_mode=False, seed=cfg.seed,
                          data_fraction=cfg.data_fraction, prefs_path=cfg.prefs_path,
                          num_turns=cfg.num_turns, record_examples=record_examples)
    good = sum(ex.desirable for ex in train)
    if good == len(train) or good == 0:
        raise ValueError(
            f"loss=kto needs desirable and undesirable completions, but datasets="
            f"{list(cfg.datasets)} gave {good} desirable and {len(train) - good} undesirable "
            "ones (records without preference pairs give only desirable SFT targets): train on "
            "preference data, whose pairs split into a desirable and an undesirable example")
    pair_with_foreign_completions(train, cfg.seed)


register_loss("kto", LossSpec(paired=True, step=kto_step, options=KTOOptions,
                              uses_reference=True, data=kto_data, check=check,
                              batch_stats=kto_batch_stats, ignores=("prefix_sharing",),
                              from_sft=True))
