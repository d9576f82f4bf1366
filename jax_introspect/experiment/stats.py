"""Small statistics helpers for the report: Wilson score intervals for binomial proportions (scipy's)."""
from __future__ import annotations

import functools

from scipy import stats as scipy_stats

LEVEL = 0.95
Z95 = 1.959963984540054  # the two-sided 95% normal quantile scipy uses for LEVEL (recorded in summary.json)


@functools.lru_cache(maxsize=None)  # a report's cells share few (k, n) pairs; scipy takes ~0.3 ms a call
def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials, at confidence `level`.

    n == 0 carries no information and gives (0.0, 1.0). The ends are exact at k == 0 (low 0) and
    k == n (high 1).
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0  # scipy refuses n == 0
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def proportion(k: int, n: int, level: float = LEVEL) -> dict:
    """{"k", "n", "rate", "low", "high"} for k of n (rate None when n == 0)."""
    low, high = wilson(k, n, level)
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "low": low, "high": high}
