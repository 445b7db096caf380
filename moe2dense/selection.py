"""Expert selection: which K experts of a layer survive into the dense model (README "What the pipeline does",
stage `select`)."""
from __future__ import annotations

import torch
from torch import Tensor

from moe2dense.scoring import DO_ACP_LAMBDA, SCORERS, LayerStats, do_acp_kernel, greedy_map, score


def check_budget(K: int, k: int, E: int) -> None:
    if not 1 <= k <= E:
        raise ValueError(f"router top-k = {k} must be in [1, {E}] (E = {E} experts)")
    if not k <= K <= E:
        raise ValueError(
            f"select.experts = {K} is out of range: need k <= K <= E, i.e. {k} <= select.experts <= {E} "
            f"(k = router top-k, E = experts per layer)"
        )


def selection_order(
    method: str, scores_or_stats: Tensor | LayerStats, K: int, k: int, *, lam: float = DO_ACP_LAMBDA
) -> Tensor:
    """The K selected expert ids in the order they are picked (best first).

    do_acp: the greedy MAP order on the layer's kernel (needs LayerStats). Other methods: descending score, ties
    broken by the lower expert id so runs are reproducible. Scores may be given directly or computed from stats.
    """
    if method not in SCORERS:
        raise ValueError(f"score.method = {method!r} is not a known scoring method; choose one of {tuple(SCORERS)}")
    stats = scores_or_stats if isinstance(scores_or_stats, LayerStats) else None
    E = stats.num_experts if stats is not None else scores_or_stats.shape[0]
    check_budget(K, k, E)
    if method == "do_acp":
        if stats is None:
            raise ValueError("do_acp selects by greedy MAP on the layer kernel: pass LayerStats, not scores")
        return greedy_map(do_acp_kernel(stats, lam), K)[0]
    scores = score(method, stats) if stats is not None else scores_or_stats
    if torch.isnan(scores).any():
        raise ValueError(f"{method} scores contain NaN: {scores.tolist()}")
    # A stable descending sort keeps equal scores in index order: lower id wins a tie.
    return torch.sort(scores, descending=True, stable=True).indices[:K]


def select_experts(
    method: str, scores_or_stats: Tensor | LayerStats, K: int, k: int, *, lam: float = DO_ACP_LAMBDA
) -> Tensor:
    """The K selected expert ids, sorted ascending (LongTensor[K]). See `selection_order` for the rule."""
    return selection_order(method, scores_or_stats, K, k, lam=lam).sort().values


def select_layers(
    method: str, stats_by_layer: dict[int, LayerStats], K: int, k: int, *, lam: float = DO_ACP_LAMBDA
) -> dict[int, list[int]]:
    """Selection order (best first) of every MoE layer: layer -> K expert ids."""
    return {layer: selection_order(method, s, K, k, lam=lam).tolist() for layer, s in sorted(stats_by_layer.items())}


def routed_mass_kept(stats: LayerStats, experts: list[int]) -> float:
    """Share of the calibration routing weight (sum of applied g_{t,e}) that the kept experts carried."""
    total = float(stats.weight_sum.sum())
    return float(stats.weight_sum[list(experts)].sum()) / total if total > 0 else 0.0
