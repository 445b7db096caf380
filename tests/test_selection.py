"""Selection reads scores, it never recomputes them: every method, do_acp included, keeps the top K by a stable
descending sort of its scores. For do_acp that is the greedy MAP order itself, because the greedy gains never
increase along the order, in floating point too: each step only subtracts e*e >= 0 from the candidates' Schur
complements, and argmax takes the lowest index among equal ones, as the stable sort does."""
from __future__ import annotations

import pytest
import torch

from moe2dense.scoring import LayerStats, do_acp_kernel, greedy_map, score
from moe2dense.selection import (layer_scores, merge_score_method, score_frame, scored_methods, select_from_scores,
                                 select_layers, selection_order)

F64 = torch.float64


def _kernel(seed: int) -> torch.Tensor:
    """A do_acp-shaped kernel diag(q) C diag(q) + lam I on E experts, some of them exact or near copies (ties and
    near-ties in the greedy gains), some with zero quality."""
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(3, 40, (1,), generator=g))
    rank = int(torch.randint(1, E + 1, (1,), generator=g))
    X = torch.randn(E, rank, generator=g, dtype=F64)
    for _ in range(int(torch.randint(0, E // 2 + 1, (1,), generator=g))):  # copies and near copies
        i, j = torch.randint(0, E, (2,), generator=g).tolist()
        X[j] = X[i] + (0.0 if seed % 2 else 1e-9) * torch.randn(rank, generator=g, dtype=F64)
    C = X @ X.T
    d = C.diagonal().clamp_min(1e-300).sqrt()
    C = C / (d[:, None] * d[None, :])
    q = torch.rand(E, generator=g, dtype=F64)
    q[torch.rand(E, generator=g) < 0.15] = 0.0
    q[int(q.argmax())] = 1.0
    lam = float(10 ** torch.empty(1).uniform_(-6, -1, generator=g))
    return q[:, None] * C * q[None, :] + lam * torch.eye(E, dtype=F64)


@pytest.mark.parametrize("seed", range(300))
def test_greedy_order_is_the_stable_sort_of_its_gains(seed):
    L = _kernel(seed)
    order, gains = greedy_map(L, L.shape[0])
    assert (gains[1:] <= gains[:-1]).all(), "gains must never increase along the greedy order (no tolerance)"
    by_expert = torch.empty_like(gains).index_put_((order,), gains)  # the do_acp score of each expert
    assert torch.sort(by_expert, descending=True, stable=True).indices.tolist() == order.tolist()


def _stats(seed: int, E: int = 8, k: int = 2, N: int = 64, H: int = 5) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(N, E, generator=g, dtype=F64), -1)
    weights, experts = probs.topk(k)
    out = torch.randn(E, N, H, generator=g, dtype=F64)
    out[3] = out[1]  # a duplicate expert: do_acp must not keep both while a distinct one remains
    routed = torch.zeros(N, E, dtype=torch.bool).scatter_(1, experts, True)
    w = torch.zeros(N, E, dtype=F64).scatter_(1, experts, weights)
    norms = out.norm(dim=-1).T  # [N, E]
    flat = out.reshape(E, -1)
    return LayerStats(n_tokens=N, top_k=k, count=routed.sum(0).to(F64), prob_sum=probs.sum(0),
                      prob_sum_selected=(probs * routed).sum(0), weight_sum=w.sum(0),
                      norm_sum_routed=(norms * routed).sum(0), gnorm_sum_routed=(norms * w).sum(0),
                      norm_sum_all=norms.sum(0), sqnorm_sum_all=norms.square().sum(0), gram=flat @ flat.T)


@pytest.mark.parametrize("seed", range(5))
def test_do_acp_selects_greedy_order_from_the_score_frame(seed):
    stats = {0: _stats(seed), 3: _stats(seed + 100)}
    frame = score_frame(stats, ["do_acp"], {"do_acp": {"lam": 1e-3}})
    assert sorted(frame["method"].unique()) == ["acp", "do_acp"]  # the merge-by score is in the frame too
    for K in (2, 5, 8):
        chosen = select_from_scores(frame, "do_acp", K, 2)
        for layer, s in stats.items():
            assert chosen[layer] == greedy_map(do_acp_kernel(s, 1e-3), K)[0].tolist()
        assert select_layers("do_acp", stats, K, 2, options={"do_acp": {"lam": 1e-3}}) == chosen


def test_frame_scores_are_the_scorers_bit_for_bit():
    stats = {0: _stats(1), 1: _stats(2)}
    frame = score_frame(stats, ["sf", "reap", "do_acp"])
    for method in ("sf", "reap", "do_acp", "acp"):
        for layer, values in layer_scores(frame, method).items():
            assert torch.equal(values, score(method, stats[layer]))
            assert selection_order(method, values, 4, 2).tolist() == selection_order(method, stats[layer], 4,
                                                                                      2).tolist()


def test_scored_methods_add_each_merge_by_score_once():
    assert merge_score_method("do_acp") == "acp" and merge_score_method("sf") == "sf"
    assert scored_methods(["do_acp", "sf"]) == ["do_acp", "acp", "sf"]
    assert scored_methods(["acp", "do_acp"]) == ["acp", "do_acp"]


def test_missing_scores_are_named():
    frame = score_frame({0: _stats(0)}, ["sf"])
    with pytest.raises(ValueError, match="no 'reap' rows .*add reap to score.methods"):
        select_from_scores(frame, "reap", 2, 2)
