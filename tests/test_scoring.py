"""Scoring registry and expert selection: hand-computed scores, planted structure, greedy MAP vs brute force."""
import itertools
import math

import pytest
import torch

from moe2dense.scoring import (
    DO_ACP_LAMBDA, METHODS, SCORERS, LayerStats, do_acp_kernel, greedy_map, score, score_all,
)
from moe2dense.selection import select_experts, selection_order

F64 = torch.float64


def vec(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def stats_from_tokens(probs, experts, weights, outputs) -> LayerStats:
    """Reference aggregation from per-token data: probs (N,E), experts (N,k), weights (N,k), outputs (E,N,H)."""
    N, E = probs.shape
    sel = torch.zeros(N, E, dtype=F64).scatter_(1, experts, 1.0)
    g = torch.zeros(N, E, dtype=F64).scatter_(1, experts, weights)
    norms = outputs.norm(dim=-1).T  # (N, E)
    return LayerStats(
        n_tokens=N, top_k=experts.shape[1], count=sel.sum(0), prob_sum=probs.sum(0),
        prob_sum_selected=(probs * sel).sum(0), weight_sum=g.sum(0), norm_sum_routed=(norms * sel).sum(0),
        gnorm_sum_routed=(g * norms).sum(0), norm_sum_all=norms.sum(0), sqnorm_sum_all=(norms**2).sum(0),
        gram=torch.einsum("ind,jnd->ij", outputs, outputs),
    )


# Hand example: N = 4 tokens, E = 3 experts, k = 1, no renormalisation (g = p of the selected expert).
#   token  p (e0, e1, e2)    selected  g     f_e0    f_e1    f_e2
#   t0     0.5  0.3  0.2     e0        0.5   (3,4)   (1,0)   (2,0)
#   t1     0.6  0.2  0.2     e0        0.6   (5,0)   (0,3)   (0,2)
#   t2     0.1  0.7  0.2     e1        0.7   (1,0)   (9,0)   (2,0)
#   t3     0.2  0.5  0.3     e1        0.5   (7,0)   (0,3)   (0,2)
# Norms: e0 5,5,1,7   e1 1,3,9,3   e2 2,2,2,2.  Expert e2 is never routed.
TOKENS = dict(
    probs=torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.7, 0.2], [0.2, 0.5, 0.3]], dtype=F64),
    experts=torch.tensor([[0], [0], [1], [1]]),
    weights=torch.tensor([[0.5], [0.6], [0.7], [0.5]], dtype=F64),
    outputs=torch.tensor([
        [[3, 4], [5, 0], [1, 0], [7, 0]],
        [[1, 0], [0, 3], [9, 0], [0, 3]],
        [[2, 0], [0, 2], [2, 0], [0, 2]],
    ], dtype=F64),
)
HAND = LayerStats(
    n_tokens=4, top_k=1,
    count=vec([2.0, 2, 0]),
    prob_sum=vec([1.4, 1.7, 0.9]),  # .5+.6+.1+.2 | .3+.2+.7+.5 | .2+.2+.2+.3
    prob_sum_selected=vec([1.1, 1.2, 0]),  # .5+.6 | .7+.5
    weight_sum=vec([1.1, 1.2, 0]),
    norm_sum_routed=vec([10.0, 12, 0]),  # 5+5 | 9+3
    gnorm_sum_routed=vec([5.5, 7.8, 0]),  # .5*5+.6*5 | .7*9+.5*3
    norm_sum_all=vec([18.0, 16, 8]),
    sqnorm_sum_all=vec([100.0, 100, 16]),  # 25+25+1+49 | 1+9+81+9 | 4*4
    # G01 = 3 + 0 + 9 + 0 = 12, G02 = 6 + 0 + 2 + 0 = 8, G12 = 2 + 6 + 18 + 6 = 32
    gram=vec([[100.0, 12, 8], [12, 100, 32], [8, 32, 16]]),
)
EXPECTED = {
    "sf": [0.5, 0.5, 0.0],  # 2/4, 2/4, 0/4
    "pp": [0.35, 0.425, 0.225],  # 1.4/4, 1.7/4, 0.9/4
    "cp": [0.55, 0.6, 0.0],  # 1.1/2, 1.2/2, never selected -> 0
    "ean": [2.5, 3.0, 0.0],  # 10/4, 12/4, 0/4
    "reap": [2.75, 3.9, 0.0],  # 5.5/2, 7.8/2, never selected -> 0
    "acp": [2.75, 3.0, 0.0],  # .55*sqrt(100/4), .6*sqrt(100/4), 0*sqrt(16/4)
    # q = acp/max = (11/12, 1, 0); C01 = 12/sqrt(100*100) = 0.12; lam = 1e-3.
    # L = [[121/144+lam, 0.11, 0], [0.11, 1+lam, 0], [0, 0, lam]]. Greedy picks e1 (L11 = 1.001 is largest):
    #   gain(e1) = ln(1.001)                                  = 0.000999500333
    #   gain(e0) = ln(121/144 + .001 - .11^2/1.001) = ln(0.82918987) = -0.187306120
    #   gain(e2) = ln(lam)  (q2 = 0: no coupling, only the ridge) = -6.907755279
    "do_acp": [-0.18730612028744992, 0.0009995003330834232, -6.907755278982137],
}


def test_hand_sums_match_per_token_data():
    ref = stats_from_tokens(**TOKENS)
    for name in ("count", "prob_sum", "prob_sum_selected", "weight_sum", "norm_sum_routed", "gnorm_sum_routed",
                 "norm_sum_all", "sqnorm_sum_all", "gram"):
        torch.testing.assert_close(getattr(ref, name), getattr(HAND, name), msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_hand_example(method):
    assert score(method, HAND).tolist() == pytest.approx(EXPECTED[method], rel=1e-9, abs=1e-12)


def test_registry_is_complete_and_ordered():
    assert METHODS == ("sf", "pp", "cp", "ean", "reap", "acp", "do_acp") == tuple(SCORERS)
    assert set(score_all(HAND)) == set(METHODS)


def test_never_routed_expert_scores_zero():
    scores = score_all(HAND, ["sf", "cp", "reap", "ean"])
    assert all(s[2] == 0 and not torch.isnan(s).any() for s in scores.values())


def test_missing_inputs_skipped_or_explained():
    routing_only = LayerStats(HAND.n_tokens, HAND.top_k, HAND.count, HAND.prob_sum, HAND.prob_sum_selected,
                              HAND.weight_sum)
    assert list(score_all(routing_only)) == ["sf", "pp", "cp"]
    with pytest.raises(ValueError, match=r"'all_outputs' calibration pass.*sqnorm_sum_all"):
        score_all(routing_only, ["sf", "acp"])


def planted_duplicates() -> LayerStats:
    """E = 4: experts 0 and 1 have identical outputs and routing (the two best acp scores); 2 and 3 are distinct
    directions with lower acp."""
    r = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=F64))
    F = torch.stack([3 * r[0], 3 * r[0], 2 * r[1], 1 * r[2]])  # expert outputs over all tokens, flattened
    gram = F @ F.T
    n = 16
    return LayerStats(n_tokens=n, top_k=1, count=torch.tensor([4.0, 4, 4, 4]), prob_sum=torch.full((4,), 4.0),
                      prob_sum_selected=torch.tensor([2.0, 2.0, 1.6, 1.2]), weight_sum=torch.full((4,), 2.0),
                      sqnorm_sum_all=gram.diagonal().clone(), gram=gram)


def test_do_acp_never_takes_both_duplicates_while_a_distinct_expert_remains():
    s = planted_duplicates()
    acp = score("acp", s)
    assert set(acp.topk(2).indices.tolist()) == {0, 1}  # quality alone keeps both copies
    assert select_experts("do_acp", s, K=2, k=1).tolist() == [0, 2]
    assert select_experts("do_acp", s, K=3, k=1).tolist() == [0, 2, 3]
    assert score("do_acp", s).argmin() == 1  # the copy adds only the ridge: ~ln(2 lam)


def random_psd(E=7, rank=4, seed=0) -> torch.Tensor:
    A = torch.randn(E, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return A @ A.T + DO_ACP_LAMBDA * torch.eye(E, dtype=F64)


def naive_greedy(L, K):
    order, gains, prev = [], [], 0.0
    for _ in range(K):
        cand = [j for j in range(L.shape[0]) if j not in order]
        logdets = torch.stack([torch.logdet(L[order + [j]][:, order + [j]]) for j in cand])
        best = int(logdets.argmax())
        order.append(cand[best])
        gains.append(float(logdets[best]) - prev)
        prev = float(logdets[best])
    return order, gains


@pytest.mark.parametrize("seed", range(5))
def test_fast_greedy_map_matches_naive_greedy_and_brute_force_first_step(seed):
    L, K = random_psd(seed=seed), 3
    order, gains = greedy_map(L, K)
    naive_order, naive_gains = naive_greedy(L, K)
    assert order.tolist() == naive_order
    assert gains.tolist() == pytest.approx(naive_gains, rel=1e-9, abs=1e-9)
    subsets = [S for n in (1, K) for S in itertools.combinations(range(7), n)]
    logdet = {S: float(torch.logdet(L[list(S)][:, list(S)])) for S in subsets}
    assert (int(order[0]),) == max((S for S in logdet if len(S) == 1), key=logdet.get)  # step 1 is exact
    assert float(gains.sum()) == pytest.approx(logdet[tuple(sorted(order.tolist()))])
    assert float(gains.sum()) <= max(v for S, v in logdet.items() if len(S) == K) + 1e-9


def test_do_acp_scores_follow_greedy_order():
    g = torch.Generator().manual_seed(1)
    N, E, k, H = 64, 8, 2, 5
    probs = torch.softmax(torch.randn(N, E, generator=g, dtype=F64), -1)
    weights, experts = probs.topk(k)
    s = stats_from_tokens(probs, experts, weights, torch.randn(E, N, H, generator=g, dtype=F64))
    order, gains = greedy_map(do_acp_kernel(s), E)
    assert (gains[1:] <= gains[:-1] + 1e-12).all()  # submodular: non-increasing marginal gains
    sc = score("do_acp", s)
    assert sc[order].tolist() == gains.tolist()
    for K in (k, 4, E):
        assert selection_order("do_acp", s, K, k).tolist() == order[:K].tolist()
        assert set(select_experts("do_acp", s, K, k).tolist()) == set(sc.topk(K).indices.tolist())


@pytest.mark.parametrize("K", [1, 6])  # K < k and K > E
def test_select_experts_validates_K(K):
    with pytest.raises(ValueError, match=rf"select\.experts = {K} is out of range.*2 <= select\.experts <= 5"):
        select_experts("sf", torch.ones(5), K=K, k=2)


def test_select_experts_ties_go_to_lower_id():
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 0.0])
    assert selection_order("sf", scores, K=2, k=1).tolist() == [1, 2]
    assert select_experts("sf", scores, K=4, k=1).tolist() == [0, 1, 2, 4]
    assert select_experts("cp", HAND, K=2, k=1).tolist() == [0, 1]


def test_select_experts_errors():
    with pytest.raises(ValueError, match="not a known scoring method"):
        select_experts("top", torch.ones(3), K=2, k=1)
    with pytest.raises(ValueError, match="NaN"):
        select_experts("sf", torch.tensor([1.0, math.nan, 0.0]), K=2, k=1)
