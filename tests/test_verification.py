"""export/verification.py: the one result type of both verifiers, and its pass rules."""

from __future__ import annotations

import math

import pytest

from export.verification import Verification


@pytest.mark.parametrize("max_rel, ok", [(1e-6, True), (2e-5, True), (2.1e-5, False),
                                         (math.inf, False), (math.nan, False)])
def test_relative_rule_bounds_max_rel(max_rel, ok):
    check = Verification(max_abs=max_rel * 3.0, max_rel=max_rel, tolerance=2e-5,
                         batch_sizes=(1, 5), scale=3.0)
    assert check.ok is ok
    assert ("verification ok" if ok else "verification FAILED") in str(check)


@pytest.mark.parametrize("max_abs, scale, ok", [
    (0.9e-3, 0.5, True),     # unit-scale floor: the bound is 1e-3, not 0.5e-3
    (1.1e-3, 0.5, False),
    (3.9e-3, 4.0, True),     # above unit scale the bound grows with it
    (4.1e-3, 4.0, False),
    (math.inf, 4.0, False),  # a non-finite engine output
])
def test_absolute_rule_bounds_max_abs_by_the_larger_of_one_and_the_scale(max_abs, scale, ok):
    check = Verification(max_abs=max_abs, max_rel=max_abs / scale, tolerance=1e-3,
                         batch_sizes=(1, 8), scale=scale, absolute=True)
    assert check.ok is ok and "absolute tolerance" in str(check)
