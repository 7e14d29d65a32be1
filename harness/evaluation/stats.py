"""Statistics the evaluations report: mean +- interval, per-prompt win scores and
sequence-level KL from samples (judged win rates: harness/feedback/win_rate.py, where the
judges are, so that training can report them too).

Intervals are normal approximations, mean +- Z_95 * sd / sqrt(n), with the sample standard
deviation (n - 1).
"""

import math

import torch

from harness.feedback.win_rate import Z_95


# ------------------------------------------------------------------------- statistics
def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of the 95% normal interval); the half-width is NaN for one value."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("no values to average")
    if x.numel() == 1:
        return x.item(), math.nan
    return x.mean().item(), Z_95 * x.std(correction=1).item() / math.sqrt(x.numel())


def win_scores(policy_rewards, reference_rewards) -> torch.Tensor:
    """Per prompt: 1 if the policy's reward is higher, 0.5 on a tie, 0 if lower."""
    p = torch.as_tensor(policy_rewards, dtype=torch.float64)
    r = torch.as_tensor(reference_rewards, dtype=torch.float64)
    if p.shape != r.shape:
        raise ValueError(f"{p.numel()} policy rewards but {r.numel()} reference rewards")
    return (p > r).double() + 0.5 * (p == r).double()


def sequence_kl(policy_logps, reference_logps) -> torch.Tensor:
    """Per-sequence log-ratios log pi(y|x) - log ref(y|x) of samples y ~ pi: their mean is the
    Monte Carlo estimate of KL(pi || ref). Inputs: summed log-probs [n] (or per-token [n, T]
    with padding already 0, which sums to the same)."""
    p = torch.as_tensor(policy_logps, dtype=torch.float64)
    r = torch.as_tensor(reference_logps, dtype=torch.float64)
    if p.shape != r.shape:
        raise ValueError(f"policy log-probs {tuple(p.shape)} vs reference {tuple(r.shape)}")
    diff = p - r
    return diff.sum(-1) if diff.dim() > 1 else diff
