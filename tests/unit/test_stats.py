"""engine.stats: the escape rate's exact upper bound against independent references, and the model/gauges
breakdown both reports show."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.stats import binomial_cdf, escape_upper_bound, rejections_by_source


def _brute_force_upper(misses: int, n: int, alpha: float = 0.05) -> float:
    """Independent reference: the smallest p on a 1e-6 grid where P(X ≤ misses) ≤ alpha, summed with exact
    integer binomial coefficients (math.comb) rather than lgamma."""
    p = np.linspace(0.0, 1.0, 1_000_001)
    cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(misses + 1))
    return float(p[np.argmax(cdf <= alpha)])


# ``known``: the bound to 4 places, as the beta-quantile form gives it (upper = Beta⁻¹(0.95; misses + 1,
# n − misses), integrated numerically when these values were written down); 3/20 is the textbook 0.3437.
@pytest.mark.parametrize(
    ("misses", "n", "known"),
    [(0, 45, 0.0644), (0, 10, 0.2589), (1, 50, 0.0914), (5, 50, 0.1988), (3, 20, 0.3437)],
)
def test_escape_upper_bound_is_the_exact_clopper_pearson_bound(misses: int, n: int, known: float) -> None:
    ub = escape_upper_bound(misses, n)
    assert ub == pytest.approx(known, abs=1e-4)
    assert ub == pytest.approx(_brute_force_upper(misses, n), abs=2e-6)
    if misses == 0:
        assert ub == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-12)  # the closed form for no misses
    assert binomial_cdf(misses, n, ub) == pytest.approx(0.05, abs=1e-9)


def test_escape_upper_bound_edges() -> None:
    assert escape_upper_bound(0, 0) == 1.0  # no NG: nothing is known
    assert escape_upper_bound(7, 7) == 1.0
    assert escape_upper_bound(0, 45, confidence=0.99) > escape_upper_bound(0, 45)
    for bad in ((-1, 5), (6, 5), (0, -1)):
        with pytest.raises(ValueError, match="misses"):
            escape_upper_bound(*bad)
    with pytest.raises(ValueError, match="confidence"):
        escape_upper_bound(0, 5, confidence=1.0)


def test_rejections_by_source_counts_model_gauges_either_and_gauges_only() -> None:
    ng = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    groups = ["short", "short", "scratch", "scratch", "OK", "OK", "OK"]
    model = np.array([0, 1, 1, 0, 1, 0, 0], bool)
    gauges = np.array([1, 1, 0, 0, 0, 1, 0], bool)
    out = rejections_by_source(ng, groups, model, gauges)
    assert out["ng"] == {"n": 4, "model": 2, "gauges": 2, "either": 3, "gauges_only": 1}
    assert out["ok"] == {"n": 3, "model": 1, "gauges": 1, "either": 2, "gauges_only": 1}
    assert out["per_type"] == {
        "scratch": {"n": 2, "model": 1, "gauges": 0, "either": 1, "gauges_only": 0},
        "short": {"n": 2, "model": 1, "gauges": 2, "either": 2, "gauges_only": 1},
    }
    with pytest.raises(ValueError, match="differ in length"):
        rejections_by_source(ng, groups[:-1], model, gauges)
