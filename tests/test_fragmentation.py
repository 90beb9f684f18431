"""Fragmentation against a workload mix: per-GPU fragments, cluster totals, the change a placement causes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flexpipe.placement.fragmentation import (WorkloadMix, delta_if_placed, fragmentation, fragmentation_ratio,
                                              placement_delta)
from flexpipe.placement.topology import GiB, fragment, paper_testbed

MIX = WorkloadMix((10 * GiB, 20 * GiB, 40 * GiB), (0.5, 0.3, 0.2))


def test_fragment_of_one_gpu():
    assert MIX.fragment(5 * GiB) == 5 * GiB  # smaller than every stage: all of it is useless
    assert MIX.fragment(15 * GiB) == pytest.approx(0.5 * 15 * GiB)  # useless to the 20 and 40 GiB stages
    assert MIX.fragment(20 * GiB) == pytest.approx(0.2 * 20 * GiB)  # a stage of exactly 20 GiB fits
    assert MIX.fragment(40 * GiB) == 0.0 and MIX.fragment(70 * GiB) == 0.0
    assert MIX.fragment(0) == 0.0 and MIX.fragment(-1) == 0.0


def test_weights_are_normalised_and_sizes_sorted():
    m = WorkloadMix((40, 10, 20), (2, 5, 3))
    assert m.sizes == (10, 20, 40) and m.weights == pytest.approx((0.5, 0.3, 0.2))
    with pytest.raises(ValueError):
        WorkloadMix((), ())
    with pytest.raises(ValueError):
        WorkloadMix((1, 2), (1.0,))
    merged = WorkloadMix.merge([(WorkloadMix((10,)), 3.0), (WorkloadMix((20, 30)), 1.0)])
    assert merged.sizes == (10, 20, 30) and merged.weights == pytest.approx((0.75, 0.125, 0.125))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-GiB, max_value=80 * GiB), min_size=1, max_size=30))
def test_vectorised_equals_scalar(free):
    vec = MIX.fragments(np.asarray(free))
    assert vec == pytest.approx([MIX.fragment(f) for f in free])
    assert 0.0 <= fragmentation_ratio(np.asarray(free), MIX) <= 1.0


def test_placement_delta_rewards_exact_fits_and_punishes_broken_holes():
    free = np.array([20 * GiB, 45 * GiB, 80 * GiB])
    exact = placement_delta(free, {0: 20 * GiB}, MIX)
    sliver = placement_delta(free, {1: 20 * GiB}, MIX)
    roomy = placement_delta(free, {2: 20 * GiB}, MIX)
    assert exact < 0  # the hole's fragment (useless to 40 GiB stages) disappears
    assert sliver == pytest.approx(0.2 * 25 * GiB)  # a hole for anything becomes useless to 40 GiB stages
    assert roomy == 0  # 60 GiB left: still fits every stage
    # several stages on one GPU count together; giving memory back (negative) is the inverse
    assert placement_delta(free, {2: 30 * GiB}, MIX) == pytest.approx(MIX.fragment(50 * GiB))
    after = free.copy()
    after[1] -= 20 * GiB
    assert placement_delta(after, {1: -20 * GiB}, MIX) == pytest.approx(-sliver)


def test_cluster_fragmentation_and_delta_if_placed():
    t = fragment(paper_testbed(), 0)
    total = fragmentation(t, MIX)
    assert total == pytest.approx(MIX.fragments(t.free).sum())
    assert 0 < fragmentation_ratio(t, MIX) < 1
    assert fragmentation_ratio(np.zeros(4), MIX) == 0.0
    d = delta_if_placed(t.free, 20 * GiB, MIX)
    fits = t.free >= 20 * GiB
    assert np.all(np.isinf(d[~fits])) and np.all(np.isfinite(d[fits]))
    i = int(np.flatnonzero(fits)[0])
    assert d[i] == pytest.approx(placement_delta(t, {i: 20 * GiB}, MIX))
