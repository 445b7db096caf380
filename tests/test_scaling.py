"""Magnitude scaling (moe2dense/scaling.py) pinned to hand-computed values: the routed mass m and both rules for c_g.

The layer: N = 10 tokens, top-2 routing over E = 4 experts.
    selections |X_e|          count      = [6, 4, 8, 2]        (sum 20 = N k)
    applied weight sum_X_e g  weight_sum = [3.0, 1.0, 4.0, 0.5] (sum 8.5: a router that does not renormalise)
"""
from __future__ import annotations

import pytest
import torch

from moe2dense.scaling import group_scales, routed_mass
from moe2dense.scoring import LayerStats


def stats(count, weight_sum, n_tokens=10) -> LayerStats:
    E = len(count)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return LayerStats(n_tokens=n_tokens, top_k=2, count=f64(count), prob_sum=f64([1.0] * E),
                      prob_sum_selected=f64([1.0] * E), weight_sum=f64(weight_sum))


S = stats([6, 4, 8, 2], [3.0, 1.0, 4.0, 0.5])
GROUPS = [[0, 1], [2], [3]]


def test_routed_mass():
    # a renormalising router: exactly routed_scaling_factor (1 without one), not the float sum of the weights
    assert routed_mass(S, renorm=True, scale=1.0) == 1.0
    assert routed_mass(S, renorm=True, scale=2.5) == 2.5
    # otherwise measured: the mean total applied weight per token, 8.5 / 10 (the factor is inside g already)
    assert routed_mass(S, renorm=False, scale=1.0) == pytest.approx(0.85, abs=1e-15)
    assert routed_mass(S, renorm=False, scale=2.5) == pytest.approx(0.85, abs=1e-15)
    # no calibration tokens: nothing measured, the family's factor stands
    assert routed_mass(stats([0, 0, 0, 0], [0.0] * 4, n_tokens=0), renorm=False, scale=2.5) == 2.5


def test_uniform_gives_every_block_m_over_k():
    assert group_scales("uniform", GROUPS, S, 0.85) == pytest.approx([0.85 / 3] * 3, abs=1e-15)
    assert group_scales("uniform", [[0], [1], [2], [3]], S, 1.0) == [0.25] * 4


def test_score_is_the_groups_mean_applied_weight_normalised_to_m():
    # group means when selected: {0,1}: (3 + 1) / (6 + 4) = 0.4; {2}: 4 / 8 = 0.5; {3}: 0.5 / 2 = 0.25; sum 1.15
    # c_g = m * mean_g / 1.15 with m = 0.85: 0.34 / 1.15, 0.425 / 1.15, 0.2125 / 1.15
    c = group_scales("score", GROUPS, S, 0.85)
    assert c == pytest.approx([0.34 / 1.15, 0.425 / 1.15, 0.2125 / 1.15], abs=1e-15)
    assert sum(c) == pytest.approx(0.85, abs=1e-15)  # normalised: the raw means (sum 1.15) would not be
    assert c == pytest.approx([0.29565217391304, 0.36956521739130, 0.18478260869565], abs=1e-13)


def test_score_gives_a_never_selected_group_zero_and_falls_back_to_uniform():
    s = stats([6, 0, 8, 0], [3.0, 0.0, 4.0, 0.0])
    # {0}: 3 / 6 = 0.5, {1}: never selected -> 0, {2}: 4 / 8 = 0.5: c = m * [0.5, 0, 0.5] / 1.0
    assert group_scales("score", [[0], [1], [2]], s, 1.0) == [0.5, 0.0, 0.5]
    # no group was ever selected: no preference, the uniform rule
    assert group_scales("score", [[1], [3]], s, 0.8) == pytest.approx([0.4, 0.4], abs=1e-15)


def test_errors_name_the_rule():
    with pytest.raises(ValueError, match="'big' is not a known scaling method; choose one of uniform, score"):
        group_scales("big", GROUPS, S, 1.0)
    with pytest.raises(ValueError, match="^no groups to scale$"):
        group_scales("uniform", [], S, 1.0)


def test_register_scaling_takes_only_the_tables_names(monkeypatch):
    from moe2dense import scaling

    with pytest.raises(ValueError, match="^'nope' is not a known scaling method; choose one of uniform, score$"):
        scaling.register_scaling("nope")
    monkeypatch.setattr(scaling, "SCALINGS", {})  # a fresh registry: the real one stays as imported

    def rule(groups, s, m):
        return [m] * len(groups)

    assert scaling.register_scaling("uniform")(rule) is rule and scaling.SCALINGS == {"uniform": rule}
