"""Paired comparisons over seeds, and the words a report may use for them.

A seed fixes initialisation, data order and augmentation for every method, so two methods run
on the same seeds are compared by their differences seed by seed. :func:`paired` gives the mean
difference, a t-based confidence interval (95% by default), the exact two-sided sign-flip
(permutation) p-value over all ``2**n`` sign patterns, and ``n``; :func:`verdict` turns them into
words:

- against a goal (:class:`Goal`, e.g. "the gap is at least -0.3 points"): **met** only when the
  whole interval lies inside the goal, **not met** when it lies wholly outside, **undecided**
  otherwise;
- without a goal: **no difference detected** when the interval holds 0, **above zero** or
  **below zero** when it does not.

With fewer than two paired seeds there is no interval and the words say so. With ``n`` seeds the
sign-flip p cannot fall below ``2 / 2**n`` (0.5 for 2 seeds, 0.25 for 3, 0.0625 for 5): it checks
the interval's normality assumption, and small studies cannot pass it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
MAX_EXACT = 20
"""The largest ``n`` whose ``2**n`` sign patterns :func:`sign_flip_p` enumerates."""


def sign_patterns(n: int) -> np.ndarray:
    """Every vector of ``n`` signs (+1/-1), one per row: ``(2**n, n)`` int8."""
    if not 0 <= n <= MAX_EXACT:
        raise ValueError(f"sign patterns of n={n} values: at most {MAX_EXACT}")
    bits = (np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n)) & 1
    return (1 - 2 * bits).astype(np.int8)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided p of the mean difference under random sign flips (the null: each paired
    difference is symmetric about 0): the share of the ``2**n`` sign patterns whose ``|sum|``
    is at least the observed one. 1.0 when every difference is 0."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ValueError("sign_flip_p of no differences")
    observed = abs(d.sum())
    sums = np.abs(sign_patterns(d.size) @ d)
    tolerance = 1e-9 * max(float(np.abs(d).sum()), 1e-300)  # ties up to rounding
    return float(np.mean(sums >= observed - tolerance))


def t_quantile(probability: float, df: int) -> float:
    """Student's t quantile (scipy.stats.t)."""
    from scipy.stats import t

    return float(t.ppf(probability, df))


@dataclass(frozen=True)
class PairedComparison:
    """Differences ``a - b`` paired by seed, and what they say.

    ``sd`` is the sample standard deviation of the differences, ``ci`` the t-based interval of
    their mean at ``level`` and ``p`` the exact sign-flip p-value; all three are None for
    fewer than two differences. ``seeds`` names the pairs when they were given by seed."""

    differences: tuple[float, ...]
    seeds: tuple[Hashable, ...] = ()
    level: float = LEVEL

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return math.fsum(self.differences) / self.n if self.n else None

    @property
    def sd(self) -> float | None:
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(math.fsum((d - mean) ** 2 for d in self.differences) / (self.n - 1))

    @property
    def ci(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        half = t_quantile(0.5 + self.level / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)

    @property
    def p(self) -> float | None:
        return sign_flip_p(self.differences) if self.n >= 2 else None

    @property
    def equal(self) -> bool:
        """Two or more differences, all the same: the interval has no width."""
        return self.n >= 2 and self.sd == 0

    def to_dict(self, goal: Goal | None = None, digits: int = 2) -> dict[str, Any]:
        """What a results file keeps: n, mean, 95% CI, p, the differences and the words."""
        return {
            "n": self.n,
            "mean": self.mean,
            "ci95": self.ci,
            "p": self.p,
            "differences": list(self.differences),
            "words": summary(self, goal, digits),
        }


def paired(
    a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None], level: float = LEVEL
) -> PairedComparison:
    """``a - b`` over the seeds (keys) both have a value for, in sorted key order."""
    seeds = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    return PairedComparison(tuple(a[s] - b[s] for s in seeds), tuple(seeds), level)


def differences(values: Sequence[float], level: float = LEVEL) -> PairedComparison:
    """A comparison of differences already paired."""
    return PairedComparison(tuple(values), (), level)


def paired_ratio(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """``a / b`` for positive measurements paired by position (e.g. two settings' step times
    taken in the same rounds): the geometric mean of the pairs' ratios, ``ratio``, and its
    t-based interval on the log scale, ``ci95``, over ``n`` pairs (no interval below two)."""
    logs = differences([math.log(x / y) for x, y in zip(a, b, strict=False)], level)
    if not logs.n:
        return {"n": 0}
    out: dict[str, Any] = {"n": logs.n, "ratio": round(math.exp(logs.mean), 4)}
    if logs.ci is not None:
        out["ci95"] = [round(math.exp(v), 4) for v in logs.ci]
    return out


@dataclass(frozen=True)
class Goal:
    """What the difference should be: ``lower <= difference <= upper`` (None: unbounded)."""

    lower: float | None = None
    upper: float | None = None

    def holds(self, value: float) -> bool:
        return (self.lower is None or value >= self.lower) and (
            self.upper is None or value <= self.upper
        )

    def __str__(self) -> str:
        if self.upper is None:
            return f">= {self.lower:+g}"
        if self.lower is None:
            return f"<= {self.upper:+g}"
        return f"in [{self.lower:+g}, {self.upper:+g}]"


def signed(value: float, digits: int = 2) -> str:
    """``value`` with its sign, ``digits`` decimals (no ``-0.00``)."""
    text = f"{value:+.{digits}f}"
    return text.replace("-", "+", 1) if float(text) == 0 else text


def interval_text(c: PairedComparison, digits: int = 2) -> str:
    """``[a, b]``, or ``-`` without an interval."""
    if c.ci is None:
        return "-"
    lo, hi = c.ci
    return f"[{signed(lo, digits)}, {signed(hi, digits)}]"


def p_text(c: PairedComparison) -> str:
    """The sign-flip p to two significant digits, or ``-``."""
    return "-" if c.p is None else f"{c.p:.2g}"


def outcome(c: PairedComparison, goal: Goal | None = None) -> str:
    """The words for ``c`` alone (see the module docs): ``met``, ``not met``, ``undecided``;
    without a goal ``no difference detected``, ``above zero``, ``below zero``; with fewer than
    two differences ``one seed`` or ``no paired seeds``."""
    if c.n < 2:
        return "one seed" if c.n else "no paired seeds"
    lo, hi = c.ci
    if goal is not None:
        if goal.holds(lo) and goal.holds(hi):
            return "met"
        outside = (goal.upper is not None and lo > goal.upper) or (
            goal.lower is not None and hi < goal.lower
        )
        return "not met" if outside else "undecided"
    if lo <= 0 <= hi:
        return "no difference detected"
    return "above zero" if lo > 0 else "below zero"


def verdict(c: PairedComparison, goal: Goal | None = None, digits: int = 2) -> str:
    """The words for ``c`` with its interval (or, for one seed, its difference)."""
    if c.n == 0:
        return "no paired seeds"
    if c.n == 1:
        return f"one seed ({signed(c.mean, digits)}): no interval"
    text = f"{outcome(c, goal)}, {c.level:.0%} CI {interval_text(c, digits)}"
    if c.equal:
        text += f" (all {c.n} differences equal: an interval of no width)"
    return text


def summary(c: PairedComparison, goal: Goal | None = None, digits: int = 2) -> str:
    """Mean, words with interval, sign-flip p and seeds in one phrase."""
    if c.n < 2:
        return verdict(c, goal, digits)
    return (
        f"{signed(c.mean, digits)} ({verdict(c, goal, digits)}; sign-flip p {p_text(c)}, "
        f"{c.n} seeds)"
    )
