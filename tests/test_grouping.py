"""Grouping and merging, each pinned to values computed by hand (arithmetic in the comments)."""
from __future__ import annotations

import math
import typing
from dataclasses import replace

import numpy as np
import pytest
import torch

from moe2dense import params
from moe2dense.arch.experts import ExpertWeights, expert_forward
from moe2dense.grouping import (
    GROUP_METHODS,
    GROUPERS,
    GroupInputs,
    align_to,
    coselection_counts,
    group_experts,
    merge_experts,
    merge_weights,
    required_input,
)


def gram_with(sim: list[list[float]], experts: list[int], num_experts: int) -> torch.Tensor:
    """An (E, E) Gram whose selected block is `sim` (unit diagonal, so the output cosine C equals `sim` exactly)."""
    g = torch.eye(num_experts, dtype=torch.float64)
    idx = torch.tensor(experts)
    g[idx[:, None], idx[None, :]] = torch.tensor(sim, dtype=torch.float64)
    return g


def random_expert(gen: torch.Generator, inter: int = 16, hidden: int = 8, bias: bool = True) -> ExpertWeights:
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return ExpertWeights(r(inter, hidden), r(inter, hidden), r(hidden, inter),
                         *((r(inter), r(inter), r(hidden)) if bias else (None, None, None)))


def permuted(w: ExpertWeights, perm: torch.Tensor) -> ExpertWeights:
    return replace(w, gate=w.gate[perm], up=w.up[perm], down=w.down[:, perm],
                   gate_bias=w.gate_bias[perm], up_bias=w.up_bias[perm])


def test_registry_order_matches_params():
    assert GROUP_METHODS == tuple(GROUPERS) == typing.get_args(params.GroupMethod)
    assert {m: required_input(m) for m in GROUP_METHODS} == {
        "weight": "expert_weights", "output": "gram", "router": "router_weight", "dominant": "gram",
        "coactivation": "coselect"}


# Distances d = 1 - C in units of 1/32 (dyadic, so exact in float64) between positions 0..4:
#        0   1   2   3   4
#   0    -   8   1   8   3
#   1    8   -   8   2  14
#   2    1   8   -  24  29
#   3    8   2  24   -  14
#   4    3  14  29  14   -
# step 1: global minimum d(0,2) = 1                  -> A = {0,2}
# step 2: d(A,1) = (8+8)/2 = 8, d(A,3) = (8+24)/2 = 16, d(A,4) = (3+29)/2 = 16, d(1,3) = 2, d(1,4) = d(3,4) = 14
#         minimum d(1,3) = 2                         -> B = {1,3}          (k = 3 stops here: A, B, {4})
# step 3: d(A,B) = (8+8+8+24)/4 = 12, d(A,4) = 16, d(B,4) = (14+14)/2 = 14 -> merge A, B   (k = 2)
# Single linkage would merge A with 4 (min 3), complete linkage B with 4 (max 14 < 24 < 29): only the average
# picks A+B, so this pins the linkage.
D32 = [[0, 8, 1, 8, 3], [8, 0, 8, 2, 14], [1, 8, 0, 24, 29], [8, 2, 24, 0, 14], [3, 14, 29, 14, 0]]
SIM = [[1 - d / 32 for d in row] for row in D32]


@pytest.mark.parametrize("method", ["output", "coactivation"])
def test_average_linkage_by_hand(method):
    experts = [5, 3, 8, 1, 6]  # positions 0..4, best first
    g = gram_with(SIM, experts, 9)
    inputs = GroupInputs(experts, gram=g, coselect=g)
    assert group_experts(method, inputs, 3) == [[5, 8], [3, 1], [6]]
    assert group_experts(method, inputs, 2) == [[5, 3, 8, 1], [6]]
    assert group_experts(method, inputs, 1) == [[5, 3, 8, 1, 6]]


def test_average_linkage_ties_go_to_best_ranks():
    # All distances 1: step 1 merges positions (0,1); then d({0,1},2) = d({0,1},3) = d(2,3) = 1 and the smallest
    # (rank, rank) pair is ({0,1}, 2). Ranks are list positions, not ids.
    experts = [3, 0, 2, 1]
    inputs = GroupInputs(experts, gram=torch.eye(4, dtype=torch.float64))
    assert group_experts("output", inputs, 3) == [[3, 0], [2], [1]]
    assert group_experts("output", inputs, 2) == [[3, 0, 2], [1]]
    # A tie made by averaging: d(0,1) = 1/4 first; then d({0,1},2) = (1/2 + 1)/2 = 3/4 = d(2,3): (0,2) beats (2,3).
    d = [[0, .25, .5, 1], [.25, 0, 1, 1], [.5, 1, 0, .75], [1, 1, .75, 0]]
    g = gram_with([[1 - x for x in row] for row in d], [0, 1, 2, 3], 4)
    assert group_experts("output", GroupInputs([0, 1, 2, 3], gram=g), 2) == [[0, 1, 2], [3]]


def test_dominant_centres_by_hand():
    # k = 2: centres are positions 0 and 1 (ids 4, 1) although C(0,1) = 0.95. Position 2: C = .5 vs .25 -> centre 0;
    # position 3: .125 vs .75 -> centre 1; position 4: .375 vs .375 -> tie, the better centre 0. C(2,3) = .9 is
    # ignored: only similarity to the centres counts.
    sim = [[1, .95, .5, .125, .375],
           [.95, 1, .25, .75, .375],
           [.5, .25, 1, .9, 0],
           [.125, .75, .9, 1, 0],
           [.375, .375, 0, 0, 1]]
    experts = [4, 1, 3, 0, 2]
    inputs = GroupInputs(experts, gram=gram_with(sim, experts, 5))
    assert group_experts("dominant", inputs, 2) == [[4, 3, 2], [1, 0]]
    assert group_experts("dominant", inputs, 4) == [[4, 2], [1], [3], [0]]  # position 4 -> tie -> centre 0


def test_coselection_counts_and_coactivation():
    batches = [np.array([[0, 1], [1, 0], [2, 3]]), torch.tensor([[0, 2], [0, 1], [3, 2]], dtype=torch.int32)]
    A = coselection_counts(batches, num_experts=5)
    # rows {0,1} {0,1} {2,3} {0,2} {0,1} {2,3}; expert 4 never selected
    expected = [[4, 3, 1, 0, 0],
                [3, 3, 0, 0, 0],
                [1, 0, 3, 2, 0],
                [0, 0, 2, 2, 0],
                [0, 0, 0, 0, 0]]
    assert A.dtype == torch.float64 and A.tolist() == expected
    # C(0,1) = 3/sqrt(4*3) = .866, C(0,2) = 1/sqrt(12) = .289, C(2,3) = 2/sqrt(3*2) = .816, rest 0 (expert 4: 0, not
    # NaN). Positions [0,2,1,3,4]: merge {0,1} (d .134), then {2,3} (d .184 < d({0,1},2) = (.711+1)/2 = .856).
    inputs = GroupInputs([0, 2, 1, 3, 4], coselect=A)
    assert group_experts("coactivation", inputs, 3) == [[0, 1], [2, 3], [4]]
    assert GROUPERS["coactivation"].similarity_fn(inputs)[0, 2].item() == pytest.approx(3 / math.sqrt(12))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        coselection_counts([np.array([[0, 5]])], 5)


def test_output_duplicates_share_a_group():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(50, 4, 6, generator=gen, dtype=torch.float64)  # [T, E, H] expert outputs
    f[:, 3] = f[:, 1]
    gram = torch.einsum("teh,tfh->ef", f, f)
    assert torch.equal(gram[1], gram[3])
    inputs = GroupInputs([0, 1, 2, 3], gram=gram)
    assert group_experts("output", inputs, 3) == [[0], [1, 3], [2]]
    assert any({1, 3} <= set(g) for g in group_experts("output", inputs, 2))


def test_weight_and_router_group_parallel_experts():
    gen = torch.Generator().manual_seed(1)
    ws = {e: random_expert(gen) for e in range(4)}
    w0 = ws[0]
    ws[2] = ExpertWeights(*(3 * getattr(w0, n) for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")))
    assert group_experts("weight", GroupInputs([0, 1, 2, 3], expert_weights=ws), 3) == [[0, 2], [1], [3]]

    router = torch.randn(6, 8, generator=gen)
    router[4] = 0.5 * router[1]
    assert group_experts("router", GroupInputs([1, 0, 4, 5], router_weight=router), 3) == [[1, 4], [0], [5]]


def test_pure_pruning_needs_no_inputs():
    assert group_experts("output", GroupInputs([3, 1, 2]), 3) == [[3], [1], [2]]


def test_errors():
    inputs = GroupInputs([0, 1, 2], gram=torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="coactivation"):
        group_experts("kmeans", inputs, 2)
    with pytest.raises(ValueError, match="k <= K"):
        group_experts("output", inputs, 4)
    with pytest.raises(ValueError, match="k <= K"):
        group_experts("output", inputs, 0)
    with pytest.raises(ValueError, match="distinct"):
        group_experts("output", GroupInputs([0, 1, 1], gram=inputs.gram), 2)
    with pytest.raises(ValueError, match=r"'dominant' needs 'gram'.*add acp or do_acp to score\.methods"):
        group_experts("dominant", GroupInputs([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="'router' needs 'router_weight'"):
        group_experts("router", inputs, 2)
    nan = inputs.gram.clone()
    nan[0, 1] = nan[1, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        group_experts("output", GroupInputs([0, 1, 2], gram=nan), 2)


def test_merge_weights():
    assert merge_weights([3, 1]) == [0.75, 0.25]
    assert merge_weights([1, 2, 5]) == [0.125, 0.25, 0.625]
    assert merge_weights([0, 0]) == [0.5, 0.5]
    assert merge_weights([0]) == [1.0]
    with pytest.raises(ValueError, match="non-negative"):
        merge_weights([1, -1])


def test_merge_experts_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.bfloat16)  # noqa: E731
    a = ExpertWeights(t([4.0], [8.0]), t([2.0], [0.0]), t([1.0, -4.0]), t(4.0, 0.0), t(8.0, 8.0), t(2.0),
                      act="gpt_oss_clamped", swiglu_alpha=1.5)
    b = ExpertWeights(t([0.0], [4.0]), t([6.0], [4.0]), t([5.0, 4.0]), t(0.0, 4.0), t(0.0, 4.0), t(6.0))
    # weights 3:1 -> .75 a + .25 b: gate (3, 7), up (1.5+1.5, 0+1) = (3, 1), down (.75+1.25, -3+1) = (2, -2),
    # gate_bias (3, 1), up_bias (6, 7), down_bias (1.5+1.5) = 3
    m = merge_experts([a, b], [3, 1])
    assert m.gate.tolist() == [[3.0], [7.0]] and m.up.tolist() == [[3.0], [1.0]] and m.down.tolist() == [[2.0, -2.0]]
    assert m.gate_bias.tolist() == [3.0, 1.0] and m.up_bias.tolist() == [6.0, 7.0] and m.down_bias.tolist() == [3.0]
    assert m.gate.dtype == torch.bfloat16 and (m.act, m.swiglu_alpha) == ("gpt_oss_clamped", 1.5)
    assert merge_experts([a], [0.1]) is a
    with pytest.raises(ValueError, match="down_bias"):
        merge_experts([a, replace(b, down_bias=None)], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        merge_experts([a, replace(b, down=t([5.0, 4.0, 1.0]))], [1, 1])


def test_align_to_undoes_a_permutation():
    gen = torch.Generator().manual_seed(2)
    w = random_expert(gen)
    perm = torch.randperm(16, generator=gen)
    aligned = align_to(w, permuted(w, perm))
    for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        assert torch.equal(getattr(aligned, n), getattr(w, n)), n

    other, ref = permuted(w, perm), random_expert(gen)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    moved = align_to(ref, other)
    assert not torch.equal(moved.gate, other.gate)
    torch.testing.assert_close(expert_forward(moved, x), expert_forward(other, x))
    with pytest.raises(ValueError, match="shape"):
        align_to(random_expert(gen, inter=8), other)


def test_merge_with_permuted_self():
    gen = torch.Generator().manual_seed(3)
    w = random_expert(gen)
    copy = permuted(w, torch.randperm(16, generator=gen))
    merged = merge_experts([w, copy], [0.5, 0.5], align=True)
    for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        torch.testing.assert_close(getattr(merged, n), getattr(w, n))
    assert not torch.allclose(merge_experts([w, copy], [0.5, 0.5]).gate, w.gate)


def test_average_linkage_matches_scipy():
    """Random similarities (no ties): the same partitions as scipy's average linkage cut at k clusters."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    from moe2dense.grouping import average_linkage

    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    tree = linkage(squareform(1 - sim, checks=False), method="average")
    for k in (1, 3, 5, 11):
        labels = fcluster(tree, k, criterion="maxclust")
        expected = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))
        assert average_linkage(sim, k) == expected
