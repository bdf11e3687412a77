"""metagrad.stats: paired intervals and sign-flip tests against independent references."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from metagrad.stats import (
    Goal,
    differences,
    interval_text,
    outcome,
    p_text,
    paired,
    paired_ratio,
    sign_flip_p,
    sign_patterns,
    summary,
    verdict,
)


def _brute_force_p(d: list[float] | list[str]) -> float:
    """Every sign pattern by itertools, in exact rational arithmetic (decimal strings exactly)."""
    exact = [Fraction(x) for x in d]
    observed = abs(sum(exact))
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, exact, strict=True))) >= observed
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    return hits / 2 ** len(d)


@pytest.mark.parametrize("seed", range(8))
def test_interval_and_p_match_references_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    a = rng.normal(75, 1, n)
    b = a + rng.normal(0.3 * (seed % 3 - 1), 0.5, n)
    c = paired(dict(enumerate(a)), dict(enumerate(b)))
    d = a - b
    assert c.n == n and c.seeds == tuple(range(n))
    assert c.mean == pytest.approx(d.mean(), abs=1e-12)
    assert c.sd == pytest.approx(d.std(ddof=1), rel=1e-12)
    # the interval inverts scipy's paired t-test: at its ends the test's p is exactly 0.05
    lo, hi = c.ci
    reference = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((reference.low, reference.high), rel=1e-10, abs=1e-10)
    for end in (lo, hi):
        assert sps.ttest_1samp(d, end).pvalue == pytest.approx(0.05, rel=1e-8)
    assert c.p == pytest.approx(_brute_force_p(d.tolist()), abs=1e-12)
    assert c.p >= 2 / 2**n


def test_sign_flip_p_small_cases_by_hand():
    assert sign_flip_p([1.0, 1.0]) == 0.5  # ++ and -- reach |2|
    assert sign_flip_p([1.0, 1.0, 1.0]) == 0.25
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([3.0, 1.0, 1.0]) == 0.25  # |3+1+1|=5: only +++ and ---
    # sums of +/-3 +/-1 +/-1: 5, 3, 3, 1, -1, -3, -3, -5; six reach |3|
    assert sign_flip_p([3.0, 1.0, -1.0]) == 0.75
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_ties_of_decimal_differences_count_as_ties(seed):
    """Accuracies are recorded to two decimals: |0.3 + 0.1 + 0.2 - 0.3| and |-0.3 + 0.1 + 0.2 -
    0.3| tie in decimals but not in binary floating point."""
    rng = np.random.default_rng(seed)
    d = [round(float(x), 1) for x in rng.integers(-3, 4, 7) / 10]
    assert sign_flip_p(d) == pytest.approx(_brute_force_p([str(x) for x in d]), abs=1e-12)
    # 12 of 16 patterns reach |0.3|, four of them only up to rounding
    assert (
        sign_flip_p([0.3, 0.1, 0.2, -0.3]) == 0.75 == _brute_force_p(["0.3", "0.1", "0.2", "-0.3"])
    )


def test_sign_patterns_are_every_pattern_once():
    s = sign_patterns(4)
    assert s.shape == (16, 4) and set(np.unique(s)) == {-1, 1}
    assert len({tuple(r) for r in s.tolist()}) == 16
    assert sign_patterns(0).shape == (1, 0)
    with pytest.raises(ValueError, match="at most 20"):
        sign_patterns(21)


def test_one_seed_has_no_interval_and_says_so():
    c = paired({0: 79.3, 1: 78.0}, {0: 79.0})
    assert (c.n, c.sd, c.ci, c.p) == (1, None, None, None)
    assert c.mean == pytest.approx(0.3)
    assert verdict(c) == "one seed (+0.30): no interval"
    assert verdict(c, Goal(lower=-0.3)) == "one seed (+0.30): no interval"
    assert interval_text(c) == "-" and p_text(c) == "-"
    empty = paired({0: 1.0}, {1: 1.0})
    assert empty.n == 0 and empty.mean is None and verdict(empty) == "no paired seeds"


def test_all_equal_differences_give_an_interval_of_no_width():
    c = differences([0.5, 0.5, 0.5])
    assert c.sd == 0 and c.ci == (0.5, 0.5) and c.equal
    assert c.p == 0.25
    assert verdict(c) == (
        "above zero, 95% CI [+0.50, +0.50] (all 3 differences equal: an interval of no width)"
    )
    zero = differences([0.0, 0.0])
    assert zero.ci == (0.0, 0.0) and zero.p == 1.0
    assert verdict(zero).startswith("no difference detected, 95% CI [+0.00, +0.00]")


def test_missing_values_are_not_paired():
    c = paired({0: 1.0, 1: None, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert c.seeds == (0, 2) and c.differences == (0.5, 1.0)


def test_words_against_a_goal():
    # the goal "at least -0.3 points"
    goal = Goal(lower=-0.3)
    assert verdict(differences([-0.10, -0.12, -0.14]), goal).startswith("met, 95% CI [-0.")
    assert verdict(differences([-1.0, -1.1, -0.9]), goal).startswith("not met, 95% CI")
    assert verdict(differences([-0.6, 0.0, -0.35]), goal).startswith("undecided, 95% CI")
    # a goal bounded on both sides (equivalence)
    band = Goal(lower=-0.5, upper=0.5)
    assert verdict(differences([0.1, 0.0, 0.05]), band).startswith("met")
    assert verdict(differences([1.0, 1.1, 1.2]), band).startswith("not met")
    assert str(goal) == ">= -0.3" and str(band) == "in [-0.5, +0.5]"
    assert outcome(differences([-0.6, 0.0, -0.35]), goal) == "undecided"
    assert (
        outcome(differences([1.0])) == "one seed" and outcome(differences([])) == "no paired seeds"
    )


def test_words_without_a_goal():
    assert verdict(differences([0.3, -0.2, 0.1])).startswith("no difference detected")
    assert verdict(differences([1.0, 1.2, 0.9])).startswith("above zero")
    assert verdict(differences([-1.0, -1.2, -0.9])).startswith("below zero")
    text = summary(differences([-1.0, -1.2, -0.9]))
    assert text.startswith("-1.03 (below zero, 95% CI [") and text.endswith("p 0.25, 3 seeds)")


def test_level_changes_the_interval():
    d = [0.2, -0.1, 0.4, 0.3]
    wide, narrow = differences(d, level=0.99).ci, differences(d, level=0.8).ci
    half = sps.t.ppf(0.995, 3) * np.std(d, ddof=1) / math.sqrt(4)
    assert wide[1] - wide[0] == pytest.approx(2 * half)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_to_dict_keeps_what_a_results_file_needs():
    c = paired({0: 2.0, 1: 1.0, 2: 1.5}, {0: 1.0, 1: 1.5, 2: 0.5})
    d = c.to_dict(goal=Goal(lower=0.0))
    assert d["n"] == 3 and d["differences"] == [1.0, -0.5, 1.0]
    assert d["mean"] == pytest.approx(0.5) and d["ci95"] == c.ci and d["p"] == c.p
    assert d["words"] == summary(c, Goal(lower=0.0))
    one = differences([0.7]).to_dict()
    assert one["ci95"] is None and one["p"] is None and one["words"] == verdict(differences([0.7]))


def test_a_paired_ratio_is_the_geometric_mean_of_the_pairs_with_a_t_interval():
    rng = np.random.default_rng(0)
    b = 0.5 + rng.random(9)
    a = b * 1.3 * (1 + 0.05 * rng.standard_normal(9))
    logs = np.log(a) - np.log(b)
    half = sps.t.ppf(0.975, 8) * logs.std(ddof=1) / 3
    r = paired_ratio(a.tolist(), b.tolist())
    assert r["n"] == 9
    assert r["ratio"] == pytest.approx(math.exp(logs.mean()), abs=1e-4)
    assert r["ci95"] == pytest.approx(
        [math.exp(logs.mean() - half), math.exp(logs.mean() + half)], abs=1e-4
    )
    assert paired_ratio([2.0, 4.0], [1.0, 2.0]) == {"n": 2, "ratio": 2.0, "ci95": [2.0, 2.0]}
    assert paired_ratio([2.0], [1.0]) == {"n": 1, "ratio": 2.0}  # no interval from one pair
    assert paired_ratio([], []) == {"n": 0}
