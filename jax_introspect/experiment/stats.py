"""Small statistics helpers for the report: Wilson score intervals for binomial proportions."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials.

    p = k/n; centre = (p + z^2/2n) / (1 + z^2/n); half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    n == 0 carries no information and gives (0.0, 1.0). The ends are exact at k == 0 (low 0) and
    k == n (high 1).
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def proportion(k: int, n: int, z: float = Z95) -> dict:
    """{"k", "n", "rate", "low", "high"} for k of n (rate None when n == 0)."""
    low, high = wilson(k, n, z)
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "low": low, "high": high}
