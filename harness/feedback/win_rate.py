"""Judged win rates: how often output_2 beats output_1 over a list of judged preferences.

A judged preference follows the AlpacaEval convention: 1 = output_1 is better, 2 = output_2 is
better, values in between are soft (weighted) preferences, 1.5 is a tie and None a failed item.
The interval is the normal approximation mean +- Z_95 * sd / sqrt(n) with the sample standard
deviation (n - 1), the standard error AlpacaEval reports.
"""

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


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
