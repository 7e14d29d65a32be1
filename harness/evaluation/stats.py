"""Statistics the evaluations report: the 95% z-value, mean +- interval, per-prompt win
scores, sequence-level KL from samples, and judged win rates.

Intervals are normal approximations, mean +- Z_95 * sd / sqrt(n), with the sample standard
deviation (n - 1). A judged preference follows the AlpacaEval convention: 1 = output_1 is
better, 2 = output_2 is better, values in between are soft (weighted) preferences, 1.5 is a tie
and None a failed item; `win_rate` reads a list of them as "how often output_2 beats output_1".
"""

import math
from dataclasses import asdict, dataclass

import torch

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


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




@dataclass(frozen=True)
class WinRate:
    n: int            # judged pairs (failed items excluded)
    wins: int         # output_2 preferred
    losses: int       # output_1 preferred
    ties: int
    failed: int       # no label: excluded from the rate, reported
    win_rate: float   # mean P(output_2 better), ties count 1/2
    ci_low: float     # 95% normal-approximation interval, clipped to [0, 1]
    ci_high: float
    std_error: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"win rate {100 * self.win_rate:.1f}% [95% CI {100 * self.ci_low:.1f}, "
                f"{100 * self.ci_high:.1f}] over {self.n} pairs: {self.wins} wins, {self.losses} "
                f"losses, {self.ties} ties, {self.failed} failed")


def win_rate(preferences) -> WinRate:
    """Win rate of output_2 over output_1 from preferences in [1, 2] (None = failed).

    Each pair scores s = preference - 1 (1 win, 0 loss, 1/2 tie, soft values in between);
    the rate is mean(s) and the interval mean(s) +- 1.96 * sd(s) / sqrt(n) with the sample
    standard deviation (ddof=1), the standard error AlpacaEval reports. Fewer than two pairs
    give the uninformative interval [0, 1].
    """
    scores, failed = [], 0
    for p in preferences:
        if p is None:
            failed += 1
            continue
        if isinstance(p, bool) or not 1.0 <= p <= 2.0:
            raise ValueError(f"a preference must be in [1, 2] or None, got {p!r}")
        scores.append(float(p) - 1.0)
    n = len(scores)
    wins = sum(s > 0.5 for s in scores)
    losses = sum(s < 0.5 for s in scores)
    if n == 0:
        return WinRate(0, 0, 0, 0, failed, math.nan, 0.0, 1.0, math.nan)
    mean = sum(scores) / n
    if n < 2:
        return WinRate(n, wins, losses, n - wins - losses, failed, mean, 0.0, 1.0, math.nan)
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)
    return WinRate(n, wins, losses, n - wins - losses, failed, mean,
                   max(0.0, mean - Z_95 * se), min(1.0, mean + Z_95 * se), se)
