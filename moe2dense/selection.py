"""Expert selection: which K experts of a layer survive into the dense model (docs/architecture.md, "Data flow",
stage `select`).

Scores are computed once (`score_frame`, stage `score` -> scores/scores.parquet) and read everywhere else: select
keeps the top K per layer of `score.method`, the plan merges each group by its merge-by score. Every method selects
the same way, by a stable descending sort: do_acp's scores are its greedy-MAP log-det gains, which never increase
along the greedy order (each step only subtracts e*e >= 0 from the candidates' Schur complements), so sorting them
gives the greedy order back.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from moe2dense import methods as M
from moe2dense.scoring import SCORERS, LayerStats, score, scores_frame


def merge_score_method(method: str) -> str:
    """The score a group merges its members by when `method` selected them (its `merge_by` in the method table:
    do_acp's own scores are log-det gains, not a quality to average by, so its groups merge by acp)."""
    return M.get("score", method).merge_score


def scored_methods(methods: Iterable[str]) -> list[str]:
    """`methods` plus the merge-by score of each, in order, without repeats: what stage score computes."""
    out: list[str] = []
    for m in methods:
        for name in (m, merge_score_method(m)):
            if name not in out:
                out.append(name)
    return out


def score_frame(stats_by_layer: Mapping[int, LayerStats], methods: Iterable[str],
                options: Mapping[str, Mapping] | None = None):
    """The scores of `methods` and their merge-by scores: polars DataFrame (layer, expert, method, score), the
    table stage score writes and convert and the screen compute the same way."""
    return scores_frame(dict(stats_by_layer), scored_methods(methods), {m: dict(o) for m, o in (options or {}).items()})


def score_options(score_params, methods: Iterable[str] | None = None) -> dict[str, dict]:
    """method -> scorer keyword options (score.options), for every method `score_frame` computes from `methods`
    (default: score.methods)."""
    return {m: score_params.kwargs(m) for m in scored_methods(score_params.methods if methods is None else methods)}


def layer_scores(frame, method: str) -> dict[int, Tensor]:
    """layer -> float64 Tensor[E] of `method`'s scores, read from a score frame."""
    import polars as pl

    rows = frame.filter(pl.col("method") == method).sort("layer", "expert")
    if rows.is_empty():
        raise ValueError(f"the scores have no {method!r} rows (scored: {sorted(frame['method'].unique())}); "
                         f"add {method} to score.methods")
    out = {}
    for (layer,), part in rows.group_by("layer", maintain_order=True):
        if part["expert"].to_list() != list(range(part.height)):
            raise ValueError(f"{method} scores of layer {layer} do not cover experts 0..{part.height - 1} once each")
        out[int(layer)] = torch.tensor(part["score"].to_list(), dtype=torch.float64)
    return out


def check_budget(K: int, k: int, E: int) -> None:
    if not 1 <= k <= E:
        raise ValueError(f"router top-k = {k} must be in [1, {E}] (E = {E} experts)")
    if not k <= K <= E:
        raise ValueError(
            f"select.experts = {K} is out of range: need k <= K <= E, i.e. {k} <= select.experts <= {E} "
            f"(k = router top-k, E = experts per layer)"
        )


def selection_order(method: str, scores_or_stats: Tensor | LayerStats, K: int, k: int, *,
                    options: Mapping[str, Mapping] | None = None) -> Tensor:
    """The K selected expert ids in the order they are picked (best first): descending score, ties broken by the
    lower expert id so runs are reproducible. Scores may be given directly or computed from stats (`options`:
    method -> scorer options, e.g. {"do_acp": {"lam": 1e-3}})."""
    if method not in SCORERS:
        raise ValueError(f"score.method = {method!r} is not a known scoring method; choose one of {tuple(SCORERS)}")
    if isinstance(scores_or_stats, LayerStats):
        scores = score(method, scores_or_stats, **dict((options or {}).get(method, {})))
    else:
        scores = scores_or_stats
    check_budget(K, k, scores.shape[0])
    if torch.isnan(scores).any():
        raise ValueError(f"{method} scores contain NaN: {scores.tolist()}")
    # A stable descending sort keeps equal scores in index order: lower id wins a tie.
    return torch.sort(scores, descending=True, stable=True).indices[:K]


def select_experts(method: str, scores_or_stats: Tensor | LayerStats, K: int, k: int, *,
                   options: Mapping[str, Mapping] | None = None) -> Tensor:
    """The K selected expert ids, sorted ascending (LongTensor[K]). See `selection_order` for the rule."""
    return selection_order(method, scores_or_stats, K, k, options=options).sort().values


def select_from_scores(frame, method: str, K: int, k: int) -> dict[int, list[int]]:
    """Selection order (best first) of every MoE layer from a score frame: layer -> K expert ids."""
    by_layer = layer_scores(frame, method)
    return {layer: selection_order(method, by_layer[layer], K, k).tolist() for layer in sorted(by_layer)}


def select_layers(method: str, stats_by_layer: Mapping[int, LayerStats], K: int, k: int, *,
                  options: Mapping[str, Mapping] | None = None) -> dict[int, list[int]]:
    """Selection order (best first) of every MoE layer, scoring `stats_by_layer` first (see `select_from_scores`)."""
    return select_from_scores(score_frame(stats_by_layer, [method], options), method, K, k)


def routed_mass_kept(stats: LayerStats, experts: list[int]) -> float:
    """Share of the calibration routing weight (sum of applied g_{t,e}) that the kept experts carried."""
    total = float(stats.weight_sum.sum())
    return float(stats.weight_sum[list(experts)].sum()) / total if total > 0 else 0.0
