"""A checkpoint as a reward model, RewardBench style: how often it prefers the chosen response
of a held-out preference pair, per dataset.

A DPO-family checkpoint is scored by its implicit reward (Rafailov et al. 2023, eq. 5 without
the prompt-only term, which cancels within a pair)

    r(x, y) = beta * [log pi(y | x) - log pi_ref(y | x)]      (reference-free runs: beta * log pi)

with summed log-probs of the response tokens (its EOS included) given the prompt, encoded as in
training (no BOS, responses start with a space, EOS appended; no truncation). beta, the
reference and reference-freeness come from the run's config.yaml (the reference is its
model.archive, else its base model), or are given. A loss=reward checkpoint is scored by its
scalar head (harness.models.reward_model.RewardFunction). A pair counts 1 when r(chosen) >
r(rejected), 1/2 on a tie, 0 otherwise; accuracy is the mean with a 95% normal interval, per
dataset and over all pairs, with the mean over datasets (RewardBench's section average).
"""

import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from harness.checkpoints import (default_reference, resolve_checkpoint, reward_checkpoint_dir,
                                 run_config)
from harness.evaluation.stats import mean_ci


def implicit_rewards(policy_logps, reference_logps, beta: float, reference_free: bool = False):
    """beta * (log pi - log pi_ref) per sequence (reference_free: beta * log pi)."""
    p = torch.as_tensor(policy_logps, dtype=torch.float64)
    if reference_free:
        return beta * p
    return beta * (p - torch.as_tensor(reference_logps, dtype=torch.float64))


def pair_scores(chosen_rewards, rejected_rewards) -> torch.Tensor:
    """Per pair: 1 if the chosen response gets the higher reward, 1/2 on a tie, 0 if lower."""
    c = torch.as_tensor(chosen_rewards, dtype=torch.float64)
    r = torch.as_tensor(rejected_rewards, dtype=torch.float64)
    if c.shape != r.shape:
        raise ValueError(f"{c.numel()} chosen rewards but {r.numel()} rejected rewards")
    return (c > r).double() + 0.5 * (c == r).double()


def load_pairs(spec: str, split: str = "test", n_pairs: int | None = None) -> list[tuple]:
    """(prompt, chosen, rejected) of every preference pair of a registered dataset's split
    (NAME or NAME:PATH), in order; the first n_pairs when given."""
    from preference_datasets import get_dataset
    pairs = [(prompt, rec["responses"][w], rec["responses"][l])
             for prompt, rec in get_dataset(spec, split, silent=True).items()
             for w, l in rec["pairs"]]
    if not pairs:
        raise ValueError(f"dataset {spec!r} split {split!r} has no preference pairs")
    return pairs[:n_pairs] if n_pairs else pairs


@dataclass
class ImplicitRewardModel:
    """A DPO-family policy and its reference, scoring (prompt, response) text."""
    policy: object
    reference: object
    tokenizer: object
    beta: float
    reference_free: bool = False
    batch_size: int = 16

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from harness.models.generation import completion_logps, encode_completions
        samples = encode_completions(self.tokenizer, prompts, responses)
        pi, _ = completion_logps(self.policy, self.tokenizer, samples, self.batch_size)
        ref = None if self.reference_free else \
            completion_logps(self.reference, self.tokenizer, samples, self.batch_size)[0]
        return implicit_rewards(pi, ref, self.beta, self.reference_free).tolist()


def load_scorer(path: str, reference: str | None = None, beta: float | None = None,
                device: str = "cpu", dtype: str = "float32") -> tuple[object, dict]:
    """(scorer(prompts, responses) -> rewards, a description) for a DPO-family or reward-model
    checkpoint; beta / reference default to the run's own."""
    try:
        rm_dir = reward_checkpoint_dir(path)
    except FileNotFoundError:
        rm_dir = None
    if rm_dir is not None:
        from harness.models.reward_model import RewardFunction
        return RewardFunction(rm_dir, device=device), {"kind": "reward_model", "checkpoint": str(rm_dir)}
    from harness.models.modeling import load_checkpoint
    archive = resolve_checkpoint(path).archive
    cfg = run_config(archive) if archive else None
    loss = OmegaConf.select(cfg, "loss") if cfg is not None else None
    beta = beta if beta is not None else OmegaConf.select(loss, "beta") if loss is not None else None
    if beta is None or not beta > 0:
        raise ValueError(f"{path!r}: no loss.beta in its run config ({beta!r}); give --beta")
    reference_free = bool(OmegaConf.select(loss, "reference_free")) if loss is not None else False
    policy, tok = load_checkpoint(path, dtype=dtype, device=device)
    ref_model, reference = None, None
    if not reference_free:
        reference = reference or default_reference(path)
        ref_model, ref_tok = load_checkpoint(reference, dtype=dtype, device=device)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise ValueError("the policy and the reference use different tokenizers")
    scorer = ImplicitRewardModel(policy.eval(), ref_model.eval() if ref_model else None, tok,
                                 float(beta), reference_free)
    return scorer, {"kind": "implicit (beta * log pi / pi_ref)", "checkpoint": path,
                    "reference": reference, "beta": float(beta), "reference_free": reference_free}


def evaluate(scorer, datasets: list[str], split: str = "test", n_pairs: int | None = None) -> dict:
    """Accuracy per dataset and overall, with rewards and margins."""
    per, everything = {}, []
    for spec in datasets:
        pairs = load_pairs(spec, split, n_pairs)
        prompts = [p for p, _, _ in pairs]
        chosen = scorer(prompts, [c for _, c, _ in pairs])
        rejected = scorer(prompts, [r for _, _, r in pairs])
        scores = pair_scores(chosen, rejected)
        everything.append(scores)
        accuracy, ci = mean_ci(scores)
        margins = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
        per[spec] = {"pairs": len(pairs), "accuracy": accuracy, "accuracy_ci95": ci,
                     "ties": int((scores == 0.5).sum()), "chosen_reward": sum(chosen) / len(chosen),
                     "rejected_reward": sum(rejected) / len(rejected),
                     "margin": margins.mean().item()}
    accuracy, ci = mean_ci(torch.cat(everything))
    return {"split": split, "datasets": per, "accuracy": accuracy, "accuracy_ci95": ci,
            "pairs": sum(d["pairs"] for d in per.values()),
            "mean_over_datasets": sum(d["accuracy"] for d in per.values()) / len(per)}


def format_lines(result: dict) -> list[str]:
    ci = lambda x: "" if math.isnan(x) else f" +- {x:.3f}"  # noqa: E731
    lines = [f"{name}: accuracy {d['accuracy']:.3f}{ci(d['accuracy_ci95'])} over {d['pairs']} "
             f"pairs ({d['ties']} ties), margin {d['margin']:.4f}"
             for name, d in result["datasets"].items()]
    return lines + [f"all: accuracy {result['accuracy']:.3f}{ci(result['accuracy_ci95'])} over "
                    f"{result['pairs']} pairs; mean over datasets {result['mean_over_datasets']:.3f}"]


def plot(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["datasets"])
    acc = [result["datasets"][n]["accuracy"] for n in names]
    err = [0 if math.isnan(result["datasets"][n]["accuracy_ci95"]) else
           result["datasets"][n]["accuracy_ci95"] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 3))
    ax.bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("pairwise accuracy")
    ax.set_title(f"{result['scorer']['kind']}: {result['accuracy']:.3f} over "
                 f"{result['pairs']} pairs", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
