"""Scoring, selection, grouping, the distillation losses and routing: values computed by hand and the exact one-line
errors (a partial `match=` would let a changed message pass), on tensors of 2 to 8 experts."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from moe2dense import grouping as G
from moe2dense import scoring as S
from moe2dense import selection as SEL
from moe2dense.arch import ExpertWeights
from moe2dense.arch.routing import RouterParams, _limit_to_groups, route_logits
from moe2dense.arch.spec import RouterSpec
from moe2dense.distill import losses as L

f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
f32 = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def close(t: torch.Tensor, rows, abs=1e-7) -> None:
    assert t.shape == (len(rows), len(rows[0])) and t.flatten().tolist() == pytest.approx(
        [v for r in rows for v in r], abs=abs)


def stats(**kw) -> S.LayerStats:
    """N = 4 tokens, E = 2: cp = (0.5, 0.25), acp = cp * sqrt(16 / 4) = (1.0, 0.5)."""
    base = dict(n_tokens=4, top_k=1, count=f64(2, 2), prob_sum=f64(3, 1), prob_sum_selected=f64(1, 0.5),
                weight_sum=f64(1, 0.5), norm_sum_routed=f64(6, 2), gnorm_sum_routed=f64(3, 1),
                norm_sum_all=f64(8, 8), sqnorm_sum_all=f64(16, 16), gram=f64([4, 2], [2, 4]))
    return S.LayerStats(**(base | kw))


# ------------------------------------------------------------------------------------------------------- scoring
def test_layer_stats_checks_shapes_and_stores_float64():
    with pytest.raises(ValueError, match=r"^LayerStats.prob_sum has shape \(3,\), expected \(2,\)$"):
        stats(prob_sum=f64(1, 2, 3))
    with pytest.raises(ValueError, match=r"^LayerStats.gram has shape \(2,\), expected \(2, 2\)$"):
        stats(gram=f64(1, 2))
    s = stats(count=f32(2, 2), weight_sum=f32(1, 0.5), gram=torch.eye(2, dtype=torch.float32))
    assert {getattr(s, f).dtype for f in ("count", "prob_sum", "weight_sum", "gram", "sqnorm_sum_all")} == {
        torch.float64}
    assert s.n_tokens == 4 and s.num_experts == 2


def test_each_score_by_hand():
    s = stats()
    assert S.score("sf", s).tolist() == [0.5, 0.5]  # count / N
    assert S.score("pp", s).tolist() == [0.75, 0.25]  # prob_sum / N
    assert S.score("cp", s).tolist() == [0.5, 0.25]  # prob_sum_selected / count
    assert S.score("ean", s).tolist() == [1.5, 0.5]  # norm_sum_routed / N
    assert S.score("reap", s).tolist() == [1.5, 0.5]  # gnorm_sum_routed / count
    assert S.score("acp", s).tolist() == [1.0, 0.5]
    never = stats(count=f64(2, 0), prob_sum_selected=f64(1, 0), gnorm_sum_routed=f64(3, 0))
    assert S.score("cp", never).tolist() == [0.5, 0.0] and S.score("reap", never).tolist() == [1.5, 0.0]
    once = stats(count=f64(1, 3), prob_sum_selected=f64(0.75, 0.75))  # selected once: the mean is that one value
    assert S.score("cp", once).tolist() == [0.75, 0.25]


def test_score_names_the_pass_and_the_missing_fields():
    s = stats(norm_sum_routed=None, gnorm_sum_routed=None, sqnorm_sum_all=None, gram=None)
    assert S.SCORERS["do_acp"].missing(s) == ["sqnorm_sum_all", "gram"] and S.SCORERS["sf"].missing(s) == []
    with pytest.raises(ValueError, match="^score method 'do_acp' needs the 'all_outputs' calibration pass, but these "
                                         "LayerStats fields were not captured: sqnorm_sum_all, gram; rerun calibrate "
                                         "with this method enabled$"):
        S.score("do_acp", s)
    with pytest.raises(ValueError, match="^'x' is not a known score method; choose one of sf, pp"):
        S.score("x", s)
    # methods=None: every method whose fields were captured, in table order
    assert list(S.score_all(s)) == ["sf", "pp", "cp"]
    both = S.score_all(stats(), ["do_acp", "sf"], {"do_acp": {"lam": 0.5}})
    assert list(both) == ["do_acp", "sf"] and torch.equal(both["do_acp"], S.diversity_aware_acp(stats(), lam=0.5))


def test_scores_frame_layout():
    frame = S.scores_frame({3: stats(), 1: stats(count=f64(4, 0))}, ["sf", "cp"])
    assert frame.schema == pl.Schema({"layer": pl.Int32, "expert": pl.Int32, "method": pl.Utf8,
                                      "score": pl.Float64})
    assert frame.rows() == [(1, 0, "sf", 1.0), (1, 1, "sf", 0.0), (1, 0, "cp", 0.25), (1, 1, "cp", 0.0),
                            (3, 0, "sf", 0.5), (3, 1, "sf", 0.5), (3, 0, "cp", 0.5), (3, 1, "cp", 0.25)]


def test_cosine_from_gram_by_hand():
    c = S.cosine_from_gram(torch.tensor([[4, 2, 0], [2, 1, 0], [0, 0, 0]], dtype=torch.float32))
    assert c.dtype == torch.float64 and c.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    # a negative diagonal (float noise) counts as 0: similar to nothing
    assert S.cosine_from_gram(f64([-1, 1], [1, 4])).tolist() == [[0, 0], [0, 1]]
    assert S.cosine_from_gram(f64([4, -2], [-2, 9])).tolist() == [[1, -1 / 3], [-1 / 3, 1]]
    # norms below 1 (a Gram over few tokens, or scaled by 1/N): still G_ij / sqrt(G_ii G_jj)
    close(S.cosine_from_gram(f64([0.25, 0.1], [0.1, 0.25])), [[1, 0.4], [0.4, 1]], 1e-15)


def test_do_acp_kernel_by_hand():
    # q = acp / max = (1, 0.5); C = cos(gram) = [[1, .5], [.5, 1]]; L = q C q + lam I
    L_ = S.do_acp_kernel(stats(), lam=0.125)
    assert L_.tolist() == [[1.125, 0.25], [0.25, 0.375]]
    # q is max-normalised also when the best acp is below 1: acp = (0.5, 0.25) gives the same kernel
    assert S.do_acp_kernel(stats(prob_sum_selected=f64(0.5, 0.25)), lam=0.125).tolist() == L_.tolist()
    # a zero-output expert (gram diagonal 0) still has C_ii = 1
    assert S.do_acp_kernel(stats(gram=f64([4, 0], [0, 0])), lam=0.5).tolist() == [[1.5, 0], [0, 0.75]]
    # no quality at all: q stays 0 (no 0/0), only the ridge
    assert S.do_acp_kernel(stats(sqnorm_sum_all=f64(0, 0)), lam=0.5).tolist() == [[0.5, 0], [0, 0.5]]
    assert S.DO_ACP_LAMBDA == 1e-3 and S.do_acp_kernel(stats()).tolist() == [[1.001, 0.25], [0.25, 0.251]]
    for lam in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=rf"^do_acp lambda must be > 0 \(it keeps L positive definite\), "
                                             rf"got {lam}$"):
            S.do_acp_kernel(stats(), lam=lam)


def test_greedy_map_by_hand():
    # d2 = (4, 3, 2): pick 0 (log 4); c0 = (2, 1, 0), d2 = (0, 2, 2): pick 1, the lower id of a tie (log 2);
    # c1 = ((2, 3, 1) - 1 * (2, 1, 0)) / sqrt 2, d2_2 = 2 - 1/2: pick 2 (log 1.5). log det L = log 12
    L_ = f64([4, 2, 0], [2, 3, 1], [0, 1, 2])
    order, gains = S.greedy_map(L_, 3)
    assert order.tolist() == [0, 1, 2]
    assert gains.tolist() == pytest.approx([math.log(4), math.log(2), math.log(1.5)], abs=1e-15)
    order, gains = S.greedy_map(L_, 2)
    assert order.tolist() == [0, 1] and len(gains) == 2
    assert S.greedy_map(f64([1, 0], [0, 3]), 2)[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"^greedy_map: kernel is not positive definite \(Schur complement 0.0\)$"):
        S.greedy_map(f64([1, 1], [1, 1]), 2)
    # do_acp's score of each expert is its gain, put back at the expert's id
    s = stats(prob_sum_selected=f64(0.5, 1))  # q = (0.5, 1): expert 1 is picked first
    L2 = S.do_acp_kernel(s, lam=0.125)
    assert S.diversity_aware_acp(s, lam=0.125).tolist() == pytest.approx(
        [math.log(float(L2[0, 0] - L2[0, 1] ** 2 / L2[1, 1])), math.log(float(L2[1, 1]))], abs=1e-15)


# ----------------------------------------------------------------------------------------------------- selection
def frame(values: dict[int, list[float]], method="sf") -> pl.DataFrame:
    return pl.DataFrame({"layer": [l for l, v in values.items() for _ in v], "expert": [e for v in values.values()
                                                                                       for e in range(len(v))],
                         "method": method, "score": [x for v in values.values() for x in v]})


def test_merge_scores_and_scored_methods():
    assert SEL.merge_score_method("do_acp") == "acp" and SEL.merge_score_method("sf") == "sf"
    assert SEL.scored_methods(["do_acp", "acp", "sf", "do_acp"]) == ["do_acp", "acp", "sf"]
    params = SimpleNamespace(methods=["do_acp"], kwargs=lambda m: {"lam": 0.5} if m == "do_acp" else {})
    assert SEL.score_options(params) == {"do_acp": {"lam": 0.5}, "acp": {}}
    assert SEL.score_options(params, ["cp"]) == {"cp": {}}
    f = SEL.score_frame({0: stats()}, ["do_acp"], {"do_acp": {"lam": 0.5}})
    assert f["method"].unique(maintain_order=True).to_list() == ["do_acp", "acp"]
    assert f.filter(pl.col("method") == "do_acp")["score"].to_list() == S.diversity_aware_acp(stats(), 0.5).tolist()


def test_layer_scores_and_its_errors():
    got = SEL.layer_scores(pl.concat([frame({2: [0.5, 0.25], 0: [1.0, 2.0]}), frame({0: [9.0, 9.0]}, "cp")]), "sf")
    assert list(got) == [0, 2] and got[0].tolist() == [1.0, 2.0] and got[2].dtype == torch.float64
    shuffled = pl.DataFrame({"layer": [0, 0, 0], "expert": [2, 0, 1], "method": "sf", "score": [0.3, 0.1, 0.2]})
    assert SEL.layer_scores(shuffled, "sf")[0].tolist() == [0.1, 0.2, 0.3]  # rows in any order: by expert id
    with pytest.raises(ValueError, match=r"^the scores have no 'acp' rows \(scored: \['cp', 'sf'\]\); add acp to "
                                         r"score.methods$"):
        SEL.layer_scores(pl.concat([frame({0: [1.0]}), frame({0: [1.0]}, "cp")]), "acp")
    gap = pl.DataFrame({"layer": [0, 0], "expert": [0, 2], "method": "sf", "score": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"^sf scores of layer 0 do not cover experts 0..1 once each$"):
        SEL.layer_scores(gap, "sf")


def test_check_budget_boundaries_and_messages():
    SEL.check_budget(8, 8, 8), SEL.check_budget(2, 2, 8), SEL.check_budget(1, 1, 1)
    with pytest.raises(ValueError, match=r"^router top-k = 0 must be in \[1, 8\] \(E = 8 experts\)$"):
        SEL.check_budget(4, 0, 8)
    with pytest.raises(ValueError, match=r"^router top-k = 9 must be in \[1, 8\] \(E = 8 experts\)$"):
        SEL.check_budget(9, 9, 8)
    msg = (r"^select.experts = {} is out of range: need k <= K <= E, i.e. 2 <= select.experts <= 8 \(k = router top-k, "
           r"E = experts per layer\)$")
    for K in (1, 9):
        with pytest.raises(ValueError, match=msg.format(K)):
            SEL.check_budget(K, 2, 8)


def test_selection_order_by_hand():
    scores = f64(0.5, 2.0, 0.5, 1.0)
    assert SEL.selection_order("sf", scores, 3, 2).tolist() == [1, 3, 0]  # a tie: the lower id first
    assert SEL.select_experts("sf", scores, 3, 2).tolist() == [0, 1, 3]
    # from stats, options per method: do_acp with a given lambda
    s = stats(prob_sum_selected=f64(0.5, 1))
    assert SEL.selection_order("do_acp", s, 2, 1, options={"do_acp": {"lam": 0.125}}).tolist() == [1, 0]
    assert SEL.selection_order("pp", s, 1, 1).tolist() == [0]
    with pytest.raises(ValueError, match=r"^score.method = 'x' is not a known scoring method; choose one of \('sf', "
                                         r"'pp', 'cp', 'ean', 'reap', 'acp', 'do_acp'\)$"):
        SEL.selection_order("x", scores, 2, 2)
    with pytest.raises(ValueError, match=r"^cp scores contain NaN: \[1.0, nan\]$"):
        SEL.selection_order("cp", f64(1.0, math.nan), 1, 1)
    with pytest.raises(ValueError, match="^router top-k = 3 must be in"):
        SEL.selection_order("sf", scores[:2], 2, 3)


def test_selection_order_passes_each_methods_options():
    # q = (1, 0.9, 0.5), experts 0 and 1 nearly parallel (cos 0.99), 2 orthogonal. After expert 0 the Schur
    # complements are 0.81 + lam - 0.8019^2 / (1 + lam) for expert 1 and 0.25 + lam for expert 2: a small ridge
    # picks the diverse expert 2, a large one (lam = 10) the better expert 1
    gram = f64([1, 0.99, 0], [0.99, 1, 0], [0, 0, 1])
    s = S.LayerStats(n_tokens=1, top_k=1, count=f64(1, 1, 1), prob_sum=f64(1, 1, 1),
                     prob_sum_selected=f64(1, 0.9, 0.5), weight_sum=f64(1, 1, 1), sqnorm_sum_all=f64(1, 1, 1),
                     gram=gram)
    assert SEL.selection_order("do_acp", s, 3, 1).tolist() == [0, 2, 1]
    assert SEL.selection_order("do_acp", s, 3, 1, options={"do_acp": {"lam": 10.0}}).tolist() == [0, 1, 2]
    assert SEL.selection_order("do_acp", s, 3, 1, options={"sf": {}, "do_acp": {"lam": 10.0}}).tolist() == [0, 1, 2]
    assert SEL.select_experts("do_acp", s, 2, 1).tolist() == [0, 2]
    assert SEL.select_experts("do_acp", s, 2, 1, options={"do_acp": {"lam": 10.0}}).tolist() == [0, 1]
    assert SEL.select_layers("do_acp", {0: s}, 3, 1) == {0: [0, 2, 1]}
    assert SEL.select_layers("do_acp", {0: s}, 3, 1, options={"do_acp": {"lam": 10.0}}) == {0: [0, 1, 2]}


def test_selection_order_is_a_stable_sort_of_many_ties():
    # 100 experts scoring 0, 1, 2, 0, 1, 2, ...: the 2s by id, then the 1s, then the 0s (an unstable sort of this
    # many ties reorders them)
    scores = torch.tensor([float(i % 3) for i in range(100)], dtype=torch.float64)
    want = [i for i in range(100) if i % 3 == 2] + [i for i in range(100) if i % 3 == 1] + list(range(0, 100, 3))
    assert SEL.selection_order("sf", scores, 100, 1).tolist() == want


def test_select_from_scores_and_layers():
    f = frame({1: [0.1, 0.3, 0.2], 0: [0.3, 0.2, 0.1]})
    assert SEL.select_from_scores(f, "sf", 2, 1) == {0: [0, 1], 1: [1, 2]}
    assert list(SEL.select_from_scores(f, "sf", 2, 1)) == [0, 1]
    got = SEL.select_layers("pp", {5: stats(), 4: stats(prob_sum=f64(1, 3))}, 1, 1)
    assert got == {4: [1], 5: [0]} and list(got) == [4, 5]
    assert SEL.select_layers("do_acp", {0: stats(prob_sum_selected=f64(0.5, 1))}, 2, 1,
                             options={"do_acp": {"lam": 0.125}}) == {0: [1, 0]}


def test_routed_mass_kept():
    s = stats(weight_sum=f64(3.0, 1.0))
    assert SEL.routed_mass_kept(s, [0]) == 0.75 and SEL.routed_mass_kept(s, [1, 0]) == 1.0
    assert SEL.routed_mass_kept(stats(weight_sum=f64(0, 0)), [0]) == 0.0
    assert SEL.routed_mass_kept(stats(weight_sum=f64(0.3, 0.1)), [0]) == pytest.approx(0.75, abs=1e-15)  # total < 1


# ------------------------------------------------------------------------------------------------------ grouping
def test_first_min_and_centres():
    assert G._first_min(np.array([0.3, 0.1 + 1e-13, 0.1])) == 1  # within TIE_TOL: the better rank
    assert G._first_min(np.array([0.3, 0.1 + 1e-11, 0.1])) == 2
    assert G._first_min(np.array([0.2])) == 0 and G.TIE_TOL == 1e-12
    # where TIE_TOL is below the float spacing, min + TIE_TOL == min: the minimum itself still counts
    assert G._first_min(np.array([3e4, 2e4, 2e4])) == 1
    sim = np.array([[1, 0, 0.2, 0.5], [0, 1, 0.8, 0.5], [0.2, 0.8, 1, 0], [0.5, 0.5, 0, 1]])
    assert G.centres(sim, 2) == [[0, 3], [1, 2]]  # 3 is as close to 0 as to 1: the better centre
    assert G.centres(sim, 3) == [[0, 3], [1], [2]]


def test_average_linkage_by_hand():
    sim = np.array([[1, 0.1, 0.2, 0.9], [0.1, 1, 0.8, 0.0], [0.2, 0.8, 1, 0.1], [0.9, 0.0, 0.1, 1]])
    assert G.average_linkage(sim, 2) == [[0, 3], [1, 2]]
    assert G.average_linkage(sim, 3) == [[0, 3], [1], [2]]
    assert G.average_linkage(sim, 1) == [[0, 1, 2, 3]]
    assert G.average_linkage(sim, 4) == G.average_linkage(sim, 5) == [[0], [1], [2], [3]]


def ew(gate, up, down, *biases, **kw):
    return ExpertWeights(f32(*gate), f32(*up), f32(*down), *(None if b is None else f32(*b) for b in biases), **kw)


def test_weight_and_router_similarity_by_hand():
    a = ew([[1.0]], [[0.0]], [[0.0]])
    b = ew([[1.0]], [[1.0]], [[0.0]])
    sim = G.weight_similarity(G.GroupInputs([3, 5], expert_weights={3: a, 5: b}))
    close(sim, [[1, 2 ** -0.5], [2 ** -0.5, 1]], 1e-15)
    # biases count: (1, 0, 0, 1) vs (1, 1, 0, 0) -> 1 / 2
    ab, bb = ew([[1.0]], [[0.0]], [[0.0]], [1.0], None, None), ew([[1.0]], [[1.0]], [[0.0]], [0.0], None, None)
    with pytest.raises(ValueError, match="^experts differ in up_bias: one has it and the other is None$"):
        G.weight_similarity(G.GroupInputs([3, 5], expert_weights={3: ab, 5: ew([[1.0]], [[1.0]], [[0.0]], [0.0],
                                                                                    [0.0], None)}))
    assert G.weight_similarity(G.GroupInputs([3, 5], expert_weights={3: ab, 5: bb}))[0, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"^grouping method 'weight': expert_weights lacks experts \[5, 7\]$"):
        G.weight_similarity(G.GroupInputs([3, 5, 7], expert_weights={3: a}))
    rw = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    close(G.router_similarity(G.GroupInputs([2, 1], router_weight=rw)), [[1, 0.8], [0.8, 1]], 1e-7)
    co = f64([2, 1, 0], [1, 2, 2], [0, 2, 8])
    close(G.coactivation_similarity(G.GroupInputs([2, 1], coselect=co)), [[1, 0.5], [0.5, 1]], 1e-15)


def test_group_experts_errors_are_exact():
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^grouping: selected experts must be distinct, got \[0, 1, 1\]$"):
        G.group_experts("output", G.GroupInputs([0, 1, 1], gram=gram), 2)
    for k in (0, 4):
        with pytest.raises(ValueError, match=rf"^grouping: need 1 <= k <= K = 3 selected experts, got k = {k}$"):
            G.group_experts("output", G.GroupInputs([0, 1, 2], gram=gram), k)
    with pytest.raises(ValueError, match=r"^grouping method 'coactivation' needs 'coselect', which was not provided; "
                                         r"it comes from the routing capture \(see `coselection_counts`\)$"):
        G.group_experts("coactivation", G.GroupInputs([0, 1, 2]), 2)
    nan = torch.eye(8, dtype=torch.float64)
    nan[5, 7] = nan[7, 5] = math.nan
    with pytest.raises(ValueError, match=r"^grouping method 'output': NaN similarity between experts \[\(5, 7\), "
                                         r"\(7, 5\)\] \(check gram\)$"):
        G.group_experts("output", G.GroupInputs([0, 5, 7], gram=nan), 2)
    assert G.group_experts("output", G.GroupInputs([4, 2, 0]), 3) == [[4], [2], [0]]
    # expert 6 NaN against every other: 6 NaN pairs, the first 5 named
    bad = torch.eye(8, dtype=torch.float64)
    bad[6, :] = bad[:, 6] = math.nan
    bad[6, 6] = 1.0
    with pytest.raises(ValueError, match=r"^grouping method 'output': NaN similarity between experts \[\(1, 6\), "
                                         r"\(2, 6\), \(3, 6\), \(6, 1\), \(6, 2\)\] \(check gram\)$"):
        G.group_experts("output", G.GroupInputs([1, 2, 3, 6], gram=bad), 2)


def test_group_experts_refuses_a_similarity_of_the_wrong_shape(monkeypatch):
    bad = G.Grouper("output", "gram", "average_linkage", lambda inputs: torch.eye(2))
    monkeypatch.setitem(G.GROUPERS, "output", bad)
    with pytest.raises(ValueError, match=r"^grouping method 'output': similarity has shape \(2, 2\), expected "
                                         r"\(3, 3\)$"):
        G.group_experts("output", G.GroupInputs([0, 1, 2], gram=torch.eye(3)), 2)


def test_group_experts_maps_ranks_back_to_ids_best_first():
    # ids best first (7, 2, 5, 0); 7 ~ 0 and 2 ~ 5
    gram = torch.eye(8, dtype=torch.float64)
    gram[7, 0] = gram[0, 7] = gram[2, 5] = gram[5, 2] = 0.9
    assert G.group_experts("output", G.GroupInputs([7, 2, 5, 0], gram=gram), 2) == [[7, 0], [2, 5]]
    assert G.group_experts("dominant", G.GroupInputs([7, 2, 5, 0], gram=gram), 2) == [[7, 0], [2, 5]]


def test_merge_weights_exact():
    assert G.merge_weights([1, 3]) == [0.25, 0.75] and G.merge_weights([0.0, 0.0, 0.0]) == [1 / 3] * 3
    with pytest.raises(ValueError, match="^merge_weights: a group has at least one member$"):
        G.merge_weights([])
    with pytest.raises(ValueError, match=r"^merge_weights: scores must be non-negative, got \[1.0, -0.5\]$"):
        G.merge_weights([1.0, -0.5])
    with pytest.raises(ValueError, match=r"^merge_weights: scores must be non-negative, got \[nan\]$"):
        G.merge_weights([math.nan])


def test_layout_checks_and_merge_errors_are_exact():
    a = ew([[1.0, 2.0]], [[0.0, 1.0]], [[1.0], [0.0]])
    wide = ew([[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"^experts differ in gate shape: \(1, 2\) vs \(2, 2\)$"):
        G.merge_experts([a, wide], [1, 1])
    with pytest.raises(ValueError, match="^experts differ in down_bias: one has it and the other is None$"):
        G.align_to(a, ew([[1.0, 2.0]], [[0.0, 1.0]], [[1.0], [0.0]], None, None, [0.0, 0.0]))
    with pytest.raises(ValueError, match="^merge_experts: a group has at least one member$"):
        G.merge_experts([], [])
    with pytest.raises(ValueError, match="^merge_experts: 2 members but 1 weights$"):
        G.merge_experts([a, a], [1.0])
    m = G.merge_experts([a, ew([[3.0, 2.0]], [[4.0, 1.0]], [[5.0], [4.0]])], [1, 3])
    assert m.gate.tolist() == [[2.5, 2.0]] and m.up.tolist() == [[3.0, 1.0]] and m.down.tolist() == [[4.0], [3.0]]
    assert m.gate_bias is None and m.down_bias is None


def test_align_to_by_hand():
    # reference neurons r0 = (1, 0 | 0, 0 | 1, 0), r1 = (0, 1 | 0, 0 | 0, 1); other holds them swapped, slightly off
    ref = ew([[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [1.0, 2.0], [3.0, 4.0],
             [5.0, 6.0])
    other = ew([[0.0, 2.0], [3.0, 0.1]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [2.0, 0.0]], [7.0, 8.0], [9.0, 10.0],
               [11.0, 12.0])
    got = G.align_to(ref, other)
    close(got.gate, [[3.0, 0.1], [0.0, 2.0]]), close(got.down, [[3.0, 0.0], [0.0, 2.0]])
    assert got.gate_bias.tolist() == [8.0, 7.0] and got.up_bias.tolist() == [10.0, 9.0]
    assert got.down_bias.tolist() == [11.0, 12.0]  # per hidden unit: not permuted
    # merged with alignment: neuron 0 of the mean is (r0 + other's neuron 1) / 2
    m = G.merge_experts([ref, other], [1, 1], align=True)
    close(m.gate, [[2.0, 0.05], [0.0, 1.5]]), close(m.gate_bias[None], [[4.5, 4.5]])
    close(G.merge_experts([ref, other], [1, 1]).gate, [[0.5, 1.0], [1.5, 0.55]])


def test_neuron_features_are_unit_rows_and_zero_rows_stay_zero():
    w = ew([[3.0], [0.0]], [[0.0], [0.0]], [[4.0, 0.0]], [0.0, 0.0], [0.0, 0.0])
    feat = G._neuron_features(w)
    assert feat.dtype == torch.float64 and feat.tolist() == [[0.6, 0, 0.8, 0, 0], [0, 0, 0, 0, 0]]
    assert G._neuron_features(ew([[3.0]], [[0.0]], [[4.0]])).tolist() == [[0.6, 0, 0.8]]
    # each row by its own norm: (3, 0, 4) / 5 and (0, 0, 2) / 2
    assert G._neuron_features(ew([[3.0], [0.0]], [[0.0], [0.0]], [[4.0, 2.0]])).tolist() == [[0.6, 0, 0.8], [0, 0, 1]]


def test_weighted_average_accumulates_in_float32_and_keeps_the_dtype():
    # bfloat16 (1 + 2^-7) and 1 with weights 1/2 each: exactly 1 + 2^-8, rounded once to even (1.0); every bfloat16
    # partial sum would be rounded too
    a, b = torch.tensor([1 + 2 ** -7], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.bfloat16)
    got = G._weighted_average([a, b, b, b], [0.25, 0.25, 0.25, 0.25])
    assert got.dtype == torch.bfloat16 and got.tolist() == [1.0]
    three = [torch.tensor([1 + 2 ** -7], dtype=torch.bfloat16)] * 3 + [torch.tensor([1.0], dtype=torch.bfloat16)]
    assert G._weighted_average(three, [0.25] * 4).tolist() == [1 + 2 ** -7]  # 1 + 0.75 * 2^-7 rounds up
    assert G._weighted_average([None, None], [0.5, 0.5]) is None
    # 1 + 8 * (2^-7 / 8) = 1 + 2^-7 summed in float32; in bfloat16 each 2^-10 would be rounded away
    small = [torch.tensor([1.0], dtype=torch.bfloat16)] + [torch.tensor([2 ** -7], dtype=torch.bfloat16)] * 8
    assert G._weighted_average(small, [1.0] + [0.125] * 8).tolist() == [1 + 2 ** -7]
    # the first member sets the dtype; one member is itself times its weight
    mixed = G._weighted_average([torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([3.0])], [0.5, 0.5])
    assert mixed.dtype == torch.bfloat16 and mixed.tolist() == [2.0]
    assert G._weighted_average([torch.tensor([3.0])], [1.0]).tolist() == [3.0]
    d = torch.tensor([1.0], dtype=torch.float64)
    assert G._weighted_average([d, 3 * d], [0.25, 0.75]).dtype == torch.float64


def test_coselection_counts_by_hand():
    ro = np.array([[0, 1], [1, 2]], dtype=np.int16)
    ro.setflags(write=False)  # Arrow-backed arrays are read-only
    counts = G.coselection_counts([ro, torch.tensor([[0, 1]]), np.array([[2, 2]]), np.zeros((0, 2), np.int64)], 4)
    assert counts.dtype == torch.float64
    assert counts.tolist() == [[2, 2, 0, 0], [2, 3, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]]  # [2, 2] counts 2 once
    with pytest.raises(ValueError, match=r"^coselection_counts: expected selected ids of shape \[n, k\], got \(3,\)$"):
        G.coselection_counts([np.array([0, 1, 2])], 4)
    with pytest.raises(ValueError, match=r"^coselection_counts: expert ids must lie in \[0, 4\), got 0..4$"):
        G.coselection_counts([np.array([[0, 4]])], 4)
    with pytest.raises(ValueError, match=r"^coselection_counts: expert ids must lie in \[0, 4\), got -1..3$"):
        G.coselection_counts([torch.tensor([[-1, 3]])], 4)
    assert G.coselection_counts([np.array([[0, 3]])], 4)[3, 0] == 1
    # int32 ids (torch) are widened to the int64 scatter_ needs
    assert G.coselection_counts([torch.tensor([[0, 3]], dtype=torch.int32)], 4)[0, 3] == 1


# -------------------------------------------------------------------------------------------------------- losses
P, Q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()


def test_losses_by_hand():
    kl_pq = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    kl_qp = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert L.forward_kl(P, Q).item() == pytest.approx(kl_pq, abs=1e-7)
    assert L.reverse_kl(P, Q).item() == pytest.approx(kl_qp, abs=1e-7)
    assert L.total_variation(P, Q).item() == pytest.approx(0.25, abs=1e-7)
    # jsd, beta 0.25: m = 0.25 p + 0.75 q = (0.3125, 0.6875)
    m = (0.3125, 0.6875)
    want = 0.25 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.75 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert L.jsd(P, Q, beta=0.25).item() == pytest.approx(want, abs=1e-7)
    # skew forward, alpha 0.25: KL(p || 0.25 p + 0.75 q) = the same m
    assert L.skew_forward_kl(P, Q, alpha=0.25).item() == pytest.approx(
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]), abs=1e-7)
    # skew reverse, alpha 0.25: KL(q || 0.25 q + 0.75 p) = (0.4375, 0.5625)
    assert L.skew_reverse_kl(P, Q, alpha=0.25).item() == pytest.approx(
        0.25 * math.log(0.25 / 0.4375) + 0.75 * math.log(0.75 / 0.5625), abs=1e-7)
    # 0 log 0 = 0: a teacher zero adds nothing
    assert L.forward_kl(torch.tensor([[1.0, 0.0]]).log(), Q).item() == pytest.approx(math.log(4), abs=1e-7)


def test_akl_weights_head_and_tail_by_hand():
    # p sorted (0.5, 0.3, 0.2); mu 0.45: the head is the first bin only (the mass before it, 0, is short of mu)
    p, q = torch.tensor([[0.3, 0.5, 0.2]]), torch.tensor([[0.2, 0.4, 0.4]])
    g_head, g_tail = 0.1, 0.1 + 0.2
    w = g_head / (g_head + g_tail)
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert L.akl(p.log(), q.log(), mu=0.45).item() == pytest.approx(w * kl_pq + (1 - w) * kl_qp, abs=1e-6)
    # mu 0.7: head = bins (0.5, 0.3), gap 0.2 of 0.4
    assert L.akl(p.log(), q.log(), mu=0.7).item() == pytest.approx(0.5 * kl_pq + 0.5 * kl_qp, abs=1e-6)
    # identical distributions: no gap, weights 1/2 each, loss 0
    assert L.akl(p.log(), p.log(), mu=0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_bins_by_hand():
    logits = torch.zeros(1, 3)  # q = 1/3 each
    tgt = L.SparseTarget(torch.tensor([[2]]), torch.tensor([[math.log(0.5)]]))
    log_p, log_q = L.bins(logits, tgt, 1.0)
    close(log_p.exp(), [[0.5, 0.5]]), close(log_q.exp(), [[1 / 3, 2 / 3]])
    assert log_p.dtype == log_q.dtype == torch.float32
    # the support holds all the mass: the rest bin gets the floor, 1e-6
    log_p, _ = L.bins(logits, L.SparseTarget(torch.tensor([[0]]), torch.tensor([[0.0]])), 1.0)
    assert L.REST_FLOOR == 1e-6 and log_p.exp()[0].tolist() == pytest.approx([1.0, 1e-6], rel=1e-5)
    # N = V: no rest bin, the support's order
    full = L.SparseTarget(torch.tensor([[2, 0, 1]]), torch.tensor([[0.5, 0.25, 0.25]]).log())
    log_p, log_q = L.bins(torch.tensor([[0.0, 0.0, math.log(2)]]), full, 1.0)
    assert log_p.shape == (1, 3)
    close(log_q.exp(), [[0.5, 0.25, 0.25]])
    # dense teacher logits at temperature 2: both softmax(logits / 2)
    log_p, log_q = L.bins(torch.tensor([[0.0, 2 * math.log(3)]]), torch.tensor([[0.0, 0.0]]), 2.0)
    close(log_q.exp(), [[0.25, 0.75]]), close(log_p.exp(), [[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"^SparseTarget: indices \(1, 2\) and logprobs \(1, 1\) must both be "
                                         r"\[T, N\]$"):
        L.SparseTarget(torch.tensor([[0, 1]]), torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match=r"^SparseTarget: indices \(2,\) and logprobs \(2,\) must both be \[T, N\]$"):
        L.SparseTarget(torch.tensor([0, 1]), torch.tensor([0.0, 0.0]))


def test_kd_loss_and_objective_by_hand():
    s, t = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]])  # q = (1/4, 3/4), p = (1/2, 1/2)
    kl_pq = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert L.kd_loss(s, t).item() == pytest.approx(kl_pq, abs=1e-7)
    assert L.kd_loss(s * 2, t, temperature=2.0).item() == pytest.approx(4 * kl_pq, abs=1e-6)  # times T^2
    assert L.kd_loss(s, t, loss="jsd", options={"beta": 0.25}).item() == pytest.approx(
        L.jsd(t.log_softmax(-1), s.log_softmax(-1), 0.25).item(), abs=1e-7)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^temperature must be > 0, got {temperature}$"):
            L.kd_loss(s, t, temperature=temperature)
    labels = torch.tensor([1, -100])
    obj = L._objective("forward_kl", 1.0, None, labels, 0.25, -100)
    logits, target = torch.cat([s, s]), torch.cat([t, t])
    ce = math.log(4 / 3)  # -log q(label 1)
    assert obj(logits, target, labels).tolist() == pytest.approx([0.75 * kl_pq + 0.25 * ce, 0.0], abs=1e-6)
    assert L._objective("forward_kl", 1.0, None, None, 0.0, -100)(logits, target, None).tolist() == pytest.approx(
        [kl_pq, kl_pq], abs=1e-7)
    assert L._objective("forward_kl", 1.0, None, labels, 1.0, -100)(logits, target, labels).tolist() == \
        pytest.approx([ce, 0.0], abs=1e-6)
    for w in (-0.5, 1.5):
        with pytest.raises(ValueError, match=rf"^ce_weight must be in \[0, 1\], got {w}$"):
            L._objective("forward_kl", 1.0, None, labels, w, -100)
    with pytest.raises(ValueError, match="^ce_weight > 0 mixes in cross-entropy on the labels, but labels is None$"):
        L._objective("forward_kl", 1.0, None, None, 0.5, -100)
    assert L._n_tokens(torch.zeros(5, 2), None, -100).item() == 5
    assert L._n_tokens(torch.zeros(3, 2), torch.tensor([4, -100, 7]), -100).item() == 2
    assert L._n_tokens(torch.zeros(3, 2), torch.tensor([4, -1, 7]), -1).item() == 2


def _kd_problem(dtype, T=5, V=7, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    teacher = torch.randn(T, V, generator=g)
    labels = torch.tensor([1, -100, 3, 4, 0])[:T]
    return hidden, weight, bias, teacher, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_gradients_equal_the_full_ones_in_the_inputs_dtypes(dtype):
    hidden, weight, bias, teacher, labels = _kd_problem(dtype)
    grads = []
    for fn, kw in ((L.full_kd_loss, {}), (L.chunked_kd_loss, {"chunk_tokens": 2})):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss = fn(h, w, lambda s, e: teacher[s:e], labels=labels, ce_weight=0.5, head_bias=b, temperature=2.0,
                  **kw)
        (3 * loss).backward()
        grads.append((loss.detach(), h.grad, w.grad, b.grad))
    (lf, *gf), (lc, *gc) = grads
    assert lc.dtype == torch.float32 and lc.item() == pytest.approx(lf.item(), rel=1e-5)
    for a, b in zip(gf, gc):
        assert b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    # only one of the inputs needs a gradient: the others get none
    h = hidden.clone().requires_grad_()
    L.chunked_kd_loss(h, weight, lambda s, e: teacher[s:e], chunk_tokens=3).backward()
    assert h.grad is not None and h.grad.dtype == dtype
    w = weight.clone().requires_grad_()
    L.chunked_kd_loss(hidden, w, lambda s, e: teacher[s:e], chunk_tokens=3, head_bias=bias).backward()
    assert w.grad is not None and w.grad.shape == weight.shape


def test_chunked_loss_is_the_mean_over_kept_tokens():
    hidden, weight, _, teacher, labels = _kd_problem(torch.float32)
    per_token = L.kd_loss(hidden @ weight.T, teacher)
    got = L.chunked_kd_loss(hidden, weight, lambda s, e: teacher[s:e], labels=labels, chunk_tokens=4)
    assert got.item() == pytest.approx(float(per_token[labels != -100].sum() / 4), rel=1e-6)
    got = L.chunked_kd_loss(hidden, weight, lambda s, e: teacher[s:e], chunk_tokens=10)
    assert got.item() == pytest.approx(float(per_token.mean()), rel=1e-6)
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"^chunk_tokens must be >= 1, got {n}$"):
            L.chunked_kd_loss(hidden, weight, lambda s, e: teacher[s:e], chunk_tokens=n)


# ------------------------------------------------------------------------------------------------------- routing
def test_limit_to_groups_by_hand():
    choice = torch.tensor([[0.1, 0.9, 0.5, 0.6, 0.2, 0.3]])  # 3 groups of 2
    inf = float("-inf")
    # max per group: (0.9, 0.6, 0.3): keep the best 2 groups
    assert _limit_to_groups(choice, "max", 3, 2).tolist() == [[*choice[0, :4].tolist(), inf, inf]]
    # top-2 sums: (1.0, 1.1, 0.5): keep the best 1
    assert _limit_to_groups(choice, "top2_sum", 3, 1).tolist() == [[inf, inf, *choice[0, 2:4].tolist(), inf, inf]]
    with pytest.raises(ValueError, match="^router has no group scoring but n_group=3 was given$"):
        _limit_to_groups(choice, None, 3, 1)


def test_route_logits_by_hand():
    logits = torch.tensor([[0.0, math.log(3), math.log(2), 0.0]])  # softmax (1, 3, 2, 1) / 7
    r = route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=False, scale=2.0))
    assert r.index.tolist() == [[1, 2]]
    close(r.weights, [[6 / 7, 4 / 7]]), close(r.probs, [[1 / 7, 3 / 7, 2 / 7, 1 / 7]])
    r = route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=True))
    close(r.weights, [[0.6, 0.4]])
    # sigmoid scores; the bias picks experts, the weights stay the unbiased scores
    sig = RouterSpec(score="sigmoid", group_score="max")
    r = route_logits(torch.zeros(1, 4), sig, RouterParams(top_k=1, renorm=False), bias=torch.tensor([0, 0, 0, 1.0]))
    assert r.index.tolist() == [[3]] and r.weights.tolist() == [[0.5]]
    # groups of 2, the best 1 group by max: expert 1 (0.9 in group 0) beats expert 2 alone
    r = route_logits(torch.tensor([[0.0, 3.0, 2.5, 2.4]]), sig, RouterParams(top_k=2, renorm=True, n_group=2,
                                                                              topk_group=1))
    assert r.index.tolist() == [[1, 0]]
    s3 = 1 / (1 + math.exp(-3))
    close(r.weights, [[s3 / (s3 + 0.5), 0.5 / (s3 + 0.5)]])
    # renormalising all-zero weights (a -inf row): the epsilon keeps them 0, not NaN
    r = route_logits(torch.full((1, 2), -math.inf), sig, RouterParams(top_k=1, renorm=True))
    assert r.weights.tolist() == [[0.0]]


def test_bins_of_two_tokens_with_two_support_tokens():
    # V = 4, q = 1/4 each; teacher rows (0.5, 0.25 | rest 0.25) and (0.1, 0.3 | rest 0.6)
    tgt = L.SparseTarget(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.5, 0.25], [0.1, 0.3]]).log())
    log_p, log_q = L.bins(torch.zeros(2, 4), tgt, 1.0)
    close(log_p.exp(), [[0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    close(log_q.exp(), [[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]])
    # the student's rest is the mass outside each row's own support
    log_p, log_q = L.bins(torch.tensor([[0.0, 0.0, math.log(2), math.log(4)], [0.0] * 4]), tgt, 1.0)
    close(log_q.exp(), [[1 / 8, 1 / 8, 6 / 8], [0.25, 0.25, 0.5]])


def test_chunked_total_accumulates_in_float64(monkeypatch):
    # per-token losses 1 and eight times 2^-26, one token a chunk: in float64 the sum is 1 + 2^-23 (a float32 value),
    # summed in float32 every 2^-26 would be rounded away
    values = torch.tensor([1.0] + [2.0 ** -26] * 8)

    def fixed(log_p, log_q):
        return values[fixed.calls.pop(0)][None]

    fixed.calls = list(range(9))
    monkeypatch.setitem(L.LOSSES, "tv", L.Loss("tv", fixed, L.M.Options))
    got = L.chunked_kd_loss(torch.zeros(9, 2), torch.zeros(3, 2), lambda s, e: torch.zeros(e - s, 3), loss="tv",
                            chunk_tokens=1)
    assert got.dtype == torch.float32 and got.item() == torch.tensor((1 + 2 ** -23) / 9, dtype=torch.float32).item()
    assert got.item() != torch.tensor(1 / 9, dtype=torch.float32).item()


def test_loss_entry_points_defaults():
    import inspect

    for fn in (L.full_kd_loss, L.chunked_kd_loss):
        p = inspect.signature(fn).parameters
        assert (p["loss"].default, p["temperature"].default, p["options"].default, p["labels"].default,
                p["ce_weight"].default, p["chunk_tokens"].default, p["ignore_index"].default,
                p["head_bias"].default) == ("forward_kl", 1.0, None, None, 0.0, 1024, -100, None)
    p = inspect.signature(L.kd_loss).parameters
    assert (p["loss"].default, p["temperature"].default, p["options"].default) == ("forward_kl", 1.0, None)


def test_objective_passes_options_and_ignore_index():
    s, t = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    got = L._objective("jsd", 1.0, {"beta": 0.25}, None, 0.0, -100)(s, t, None)
    assert got.tolist() == pytest.approx(L.jsd(t.log_softmax(-1), s.log_softmax(-1), 0.25).tolist(), abs=1e-7)
    # a custom ignore_index also reaches the cross-entropy (a label -1 would be out of range there)
    labels = torch.tensor([1, -1])
    got = L._objective("forward_kl", 1.0, None, labels, 0.5, -1)(s, t, labels)
    assert got[1].item() == 0.0 and got[0].item() == pytest.approx(
        0.5 * L.forward_kl(t[:1].log_softmax(-1), s[:1].log_softmax(-1)).item() + 0.5 * math.log(4 / 3), abs=1e-6)
    # the cross-entropy is per token, not their mean: -log q = log(4/3) for token 0 (label 1), log 2 for token 1
    both = torch.tensor([1, 0])
    got = L._objective("forward_kl", 1.0, None, both, 1.0, -100)(s, t, both)
    assert got.tolist() == pytest.approx([math.log(4 / 3), math.log(2)], abs=1e-6)


def test_chunked_defaults_behave_as_documented():
    # defaults: forward_kl at temperature 1, chunks of 1024 tokens, label -100 ignored, no CE
    g = torch.Generator().manual_seed(0)
    hidden, weight, teacher = torch.randn(1030, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(1030, 3)
    calls = []

    def chunk(s, e):
        calls.append((s, e))
        return teacher[s:e]

    got = L.chunked_kd_loss(hidden, weight, chunk)
    assert calls == [(0, 1024), (1024, 1030)]
    assert got.item() == pytest.approx(L.kd_loss(hidden @ weight.T, teacher).mean().item(), rel=1e-5)
    labels = torch.full((1030,), 2)
    labels[:1000] = -100
    got = L.chunked_kd_loss(hidden, weight, chunk, labels=labels)
    assert got.item() == pytest.approx(L.kd_loss(hidden[1000:] @ weight.T, teacher[1000:]).mean().item(), rel=1e-5)
    calls.clear()
    assert L.full_kd_loss(hidden, weight, chunk, labels=labels).item() == pytest.approx(got.item(), rel=1e-5)
    assert calls == [(0, 1030)]  # the naive reference asks for every token at once
    # options reach the loss in both
    want = L.kd_loss(hidden @ weight.T, teacher, loss="jsd", options={"beta": 0.25}).mean().item()
    for fn in (L.full_kd_loss, L.chunked_kd_loss):
        assert fn(hidden, weight, chunk, loss="jsd", options={"beta": 0.25}).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------ routing: the newer families
def test_route_logits_renorm_min_clamps_the_denominator():
    logits = torch.tensor([[0.0, math.log(3), math.log(2), 0.0]])  # softmax (1, 3, 2, 1) / 7; top-2 sum 5/7
    # ernie4_5_moe: weights / clamp(sum, min): a minimum above 5/7 binds, (3/7, 2/7) / 0.9
    r = route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=True, renorm_min=0.9))
    close(r.weights, [[10 / 21, 20 / 63]])
    # a minimum below the sum changes nothing: (3, 2) / 5
    close(route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=True, renorm_min=0.5)).weights,
          [[0.6, 0.4]])
    # no renormalisation: the minimum is not used, the weights are the top-k probabilities
    close(route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=False, renorm_min=0.9)).weights,
          [[3 / 7, 2 / 7]])


def test_route_logits_top_k_on_the_logits():
    # llama4_text ranks the raw logits (+ bias), the weights are the sigmoid scores: logits (0, 2) + bias (1.5, 0)
    # = (1.5, 2) picks expert 1; scores + bias = (0.5 + 1.5, 0.88) would pick expert 0
    spec = RouterSpec(score="sigmoid", topk_on="logits")
    r = route_logits(torch.tensor([[0.0, 2.0]]), spec, RouterParams(top_k=1, renorm=False),
                     bias=torch.tensor([1.5, 0.0]))
    assert r.index.tolist() == [[1]]
    close(r.weights, [[1 / (1 + math.exp(-2))]]), close(r.probs, [[0.5, 1 / (1 + math.exp(-2))]])
    r = route_logits(torch.tensor([[0.0, 2.0]]), RouterSpec(score="sigmoid"), RouterParams(top_k=1, renorm=False),
                     bias=torch.tensor([1.5, 0.0]))
    assert r.index.tolist() == [[0]] and r.weights.tolist() == [[0.5]]


def test_route_logits_per_expert_scale_after_renormalisation():
    logits = torch.tensor([[0.0, math.log(3), math.log(2), 0.0]])  # top-2 (1, 2), renormalised (0.6, 0.4)
    # gemma4_text: each selected weight times its expert's scale, after renormalising, then times params.scale
    scale = torch.tensor([10.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    r = route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=True, scale=2.0), expert_scale=scale)
    assert r.index.tolist() == [[1, 2]] and r.weights.dtype == torch.float32
    close(r.weights, [[2.4, 4.0]], abs=1e-6)
    close(route_logits(logits, RouterSpec(), RouterParams(top_k=2, renorm=False), expert_scale=scale).weights,
          [[6 / 7, 10 / 7]], abs=1e-6)


# ---------------------------------------------------------------------------------- grouping: up-only experts
def up_only(up, down, up_bias=None):
    return ExpertWeights(None, f32(*up), f32(*down), None, None if up_bias is None else f32(*up_bias), None,
                         act="relu2")


def test_up_only_experts_align_and_merge_without_a_gate():
    # nemotron_h: neurons are (up row | down column); r0 = (1, 0 | 1, 0), r1 = (0, 1 | 0, 1)
    assert G._neuron_features(up_only([[3.0]], [[4.0]])).tolist() == [[0.6, 0.8]]
    assert G._neuron_features(up_only([[3.0]], [[0.0]], [4.0])).tolist() == [[0.6, 0.0, 0.8]]
    ref = up_only([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [1.0, 2.0])
    # other's neuron 0 = (0, 2 | 0, 2) matches r1, neuron 1 = (3, 0 | 3, 0) matches r0
    other = up_only([[0.0, 2.0], [3.0, 0.0]], [[0.0, 3.0], [2.0, 0.0]], [7.0, 8.0])
    got = G.align_to(ref, other)
    assert got.gate is None and got.gate_bias is None and got.act == "relu2"
    close(got.up, [[3.0, 0.0], [0.0, 2.0]]), close(got.down, [[3.0, 0.0], [0.0, 2.0]])
    assert got.up_bias.tolist() == [8.0, 7.0]
    m = G.merge_experts([ref, other], [1, 1], align=True)
    assert m.gate is None
    close(m.up, [[2.0, 0.0], [0.0, 1.5]]), close(m.up_bias[None], [[4.5, 4.5]])


# ----------------------------------------------------------------------------- losses: the family's head map
def test_head_transform_is_applied_to_the_student_logits_in_both_losses():
    # logits (1, 0, 0) and (0, 1, 0), doubled by the transform; teacher uniform over V = 3:
    # KL(u || softmax(2, 0, 0)) = -log 3 - 2/3 + log(e^2 + 2) for each token
    hidden, weight = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    double = lambda x: 2 * x  # noqa: E731
    want = -math.log(3) - 2 / 3 + math.log(math.exp(2) + 2)
    plain = -math.log(3) - 1 / 3 + math.log(math.e + 2)
    for fn in (L.full_kd_loss, L.chunked_kd_loss):
        assert fn(hidden, weight, lambda s, e: torch.zeros(e - s, 3), head_transform=double).item() == pytest.approx(
            want, rel=1e-6)
        assert fn(hidden, weight, lambda s, e: torch.zeros(e - s, 3)).item() == pytest.approx(plain, rel=1e-6)
    assert L._student_logits(hidden, weight, None, double).tolist() == [[2, 0, 0], [0, 2, 0]]
    assert L._student_logits(hidden, weight, torch.ones(3), double).tolist() == [[4, 2, 2], [2, 4, 2]]
    # the gradients go through the transform too, chunk by chunk
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    L.full_kd_loss(h1, weight, lambda s, e: torch.zeros(e - s, 3), head_transform=double).backward()
    L.chunked_kd_loss(h2, weight, lambda s, e: torch.zeros(e - s, 3), head_transform=double,
                      chunk_tokens=1).backward()
    close(h2.grad, h1.grad.tolist())
    # d/dh of the mean over 2 tokens: 2 * (q - u) @ W / 2, q = softmax(2, 0, 0) for token 0
    q = math.exp(2) / (math.exp(2) + 2)
    close(h1.grad, [[q - 1 / 3, (1 - q) / 2 - 1 / 3], [(1 - q) / 2 - 1 / 3, q - 1 / 3]], abs=1e-6)
