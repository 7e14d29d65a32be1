"""`loss=online_dpo`: online (iterative) DPO on the shared rollout loop (Guo et al. 2024, "Direct
Language Model Alignment from Online AI Feedback"; Xiong et al. 2024, iterative DPO).

    python train.py loss=online_dpo loss.scorer=gold:toy model.archive=SFT/LATEST/policy.pt
    python train.py loss=online_dpo loss.scorer=judge:llm loss.judge.base_url=URL loss.judge.model=M

One step: two responses for each of `batch_size` prompts from the current policy (keyed sampling)
-> a label from `loss.scorer` (a gold function or reward model: the higher score wins; an LLM
judge: both presentation orders, disagreeing orders are a tie) -> one optimizer step of the
DPO-family loss (loss.loss_type dpo or ipo; loss.label_smoothing > 0 is conservative DPO) over
the labelled pairs against the reference. Ties and failed labels (a judge that gave up, a
non-finite score) are skipped and counted (online_dpo/ties, online_dpo/failed); their rows stay
in the batch layout with weight 0, so every rank runs the same passes.

Log-probs are the models' own (temperature 1), as offline DPO's: the implicit reward
beta * log pi / pi_ref means the same in both. Metrics carry the offline names
(rewards_train/chosen, .../margins, loss/train, logps_train/chosen).
"""

from dataclasses import dataclass

import torch

import losses
from harness.data.gold import check_scorer
from harness.objectives import LossSpec, loss_options, register_loss
from harness.objectives.core import positive_beta
from harness.rl.loop import RolloutLoop, check_rollout_batch
from harness.rl.rollout import policy_logprobs
from harness.rl.scorers import make_scorer, parse_scorer


@dataclass
class OnlineDPOOptions:
    """config/loss/online_dpo.yaml documents each option and its source."""
    scorer: str | None = None
    scorer_import: str | None = None
    judge: dict | None = None
    normalize_reward: bool = True
    loss_type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    temperature: float = 0.9
    max_new_tokens: int = 64
    no_eos_penalty: float | None = None
    gold_reward: str | None = None
    static_cache: bool = False

    def __post_init__(self):
        kind, _ = parse_scorer("loss.scorer", self.scorer, self.judge, self.scorer_import)
        positive_beta("online_dpo", self.beta)
        if self.loss_type not in ("dpo", "ipo"):
            raise ValueError(f"loss.loss_type={self.loss_type!r}: use dpo or ipo (conservative "
                             "DPO is loss_type=dpo with loss.label_smoothing > 0)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "dpo":
            raise ValueError("loss.label_smoothing (conservative DPO) needs loss.loss_type=dpo")
        for key in ("temperature", "max_new_tokens"):
            if not getattr(self, key) > 0:
                raise ValueError(f"loss.{key}={getattr(self, key)} must be > 0")
        if self.no_eos_penalty is not None and kind == "judge":
            raise ValueError("loss.no_eos_penalty replaces a response's score, and a judge "
                             "scores pairs: set loss.no_eos_penalty=null with judge:llm")
        if self.gold_reward:
            check_scorer("loss.gold_reward", self.gold_reward)

    def loss(self, chosen, rejected, ref_chosen, ref_rejected):
        if self.loss_type == "ipo":
            return losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                               self.label_smoothing)


class OnlineDPO:
    """Online DPO's part of the rollout loop: two samples per prompt, labels, a pair step."""
    prefix = "online_dpo"
    samples_per_prompt = 2
    logprob_temperature = 1.0

    def __init__(self, loop, policy, reference):
        self.loop, self.opts = loop, loop.opts
        self.policy = self.trained = loop.dist.wrap(policy)
        self.reference = self.policy if reference is policy else \
            loop.dist.wrap(reference.requires_grad_(False), train=False)
        for model in (self.policy, self.reference):
            model.eval()  # dropout off: the rollout's log-probs are the update's at step 0
        self.scorer = make_scorer(loop, self.opts, next(self.policy.parameters()).device)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": lr}]

    def fill(self, part) -> dict:
        return {}

    def checkpoint_files(self) -> dict:
        return {}

    def restore(self, ckpt_dir):
        pass

    def labels(self, batch):
        """(chosen row [G], rejected row [G], usable [G], ties [G], failed [G]) per prompt."""
        o, scores = self.opts, batch.scores
        if o.no_eos_penalty is not None:
            scores = torch.where(batch.finished, scores, torch.full_like(scores, o.no_eos_penalty))
        scores = scores.view(-1, 2)
        failed = ~torch.isfinite(scores).all(1)
        ties = (scores[:, 0] == scores[:, 1]) & ~failed
        first = torch.arange(len(scores), device=scores.device) * 2
        second_wins = (scores[:, 1] > scores[:, 0]).long()
        return first + second_wins, first + 1 - second_wins, ~(failed | ties), ties, failed

    def learn(self, batch) -> dict:
        chosen, rejected, usable, ties, failed = self.labels(batch)
        stats = {}
        if usable.any():
            stats = self.loop.update(len(usable), 1, len(usable), lambda part, index, first:
                                     self.loss(batch, chosen, rejected, usable, part, index,
                                               first), usable=usable)
        finite = batch.scores[torch.isfinite(batch.scores)]
        stats.update({f"{self.prefix}/pairs": float(usable.sum()),
                      f"{self.prefix}/ties": float(ties.sum()),
                      f"{self.prefix}/failed": float(failed.sum())})
        if len(finite):
            stats["rewards_train/score"] = finite.mean().item()
        return stats

    def loss(self, batch, chosen, rejected, usable, part, index, first: bool):
        """The DPO-family loss of the prompts `part` of minibatch `index`, averaged over the
        minibatch's labelled pairs; statistics as the offline loop names them."""
        n, weight = len(part), usable[part].float()
        mb = batch.select(torch.cat([chosen[part], rejected[part]]))
        token_logps = policy_logprobs(self.policy, mb, 1.0)
        logps = (token_logps * mb.mask).sum(-1)
        reference = (mb.ref_logprobs * mb.mask).sum(-1)
        losses_, r_chosen, r_rejected = self.opts.loss(logps[:n], logps[n:], reference[:n],
                                                       reference[n:])
        count = weight.sum()
        values = {"loss/train": losses_.detach(), "rewards_train/chosen": r_chosen,
                  "rewards_train/rejected": r_rejected,
                  "rewards_train/accuracies": (r_chosen > r_rejected).float(),
                  "rewards_train/margins": r_chosen - r_rejected,
                  "logps_train/chosen": logps[:n].detach(),
                  "logps_train/rejected": logps[n:].detach()}
        sums = {k: ((v * weight).sum(), count) for k, v in values.items()}
        maxima = {}
        if first:  # nothing has changed since the rollout: its log-probs are the update's
            dev = ((token_logps - mb.logprobs).detach().exp() - 1).abs() * mb.mask
            maxima[f"{self.prefix}/first_ratio_max_dev"] = dev.max()
        return (losses_ * weight).sum() / max(float(usable[index].sum()), 1.0), sums, maxima


def check(cfg, world_size: int):
    """Lengths and the scorer's files, before any model loads (batch_size splits over the ranks
    and micro-batches: train.check_batch_split)."""
    o = loss_options(cfg.loss)
    check_rollout_batch(cfg, o, world_size, cfg.batch_size, cfg.batch_size)
    kind, arg = parse_scorer("loss.scorer", o.scorer, o.judge, o.scorer_import)
    if kind == "reward_model":
        from harness.checkpoints import reward_checkpoint_dir
        reward_checkpoint_dir(arg)


register_loss("online_dpo", LossSpec(paired=False, step=None, options=OnlineDPOOptions,
                                     loop=RolloutLoop, rollout=OnlineDPO, check=check,
                                     uses_reference=True))
