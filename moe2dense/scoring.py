"""Expert scoring registry: one score per expert per MoE layer, from calibration aggregates.

Definitions: docs/architecture.md, "Methods". Every scorer reads a `LayerStats` of per-layer *sums*, so calibration
can stream tokens and never keep per-token outputs. Which calibration pass a method needs, its options and what its
groups merge by are its entry in the method table (moe2dense/methods.py); this module adds the functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from moe2dense import methods as M
from moe2dense.methods import CAPTURES

#: Default ridge of the DO-ACP kernel (its options in the method table). q is max-normalised (see `do_acp_kernel`),
#: so it is relative to the best expert's squared quality and does not depend on the model's activation scale.
DO_ACP_LAMBDA = M.DoAcpOptions().lam


@dataclass(frozen=True)
class LayerStats:
    """Calibration aggregates of one MoE layer: sums over tokens (not means), float64, shape (E,) unless noted."""

    n_tokens: int  # N
    top_k: int
    count: Tensor  # |X_e|
    prob_sum: Tensor  # sum_t p_{t,e}
    prob_sum_selected: Tensor  # sum_{t in X_e} p_{t,e}
    weight_sum: Tensor  # sum_{t in X_e} g_{t,e}
    norm_sum_routed: Tensor | None = None  # sum_{t in X_e} ||f_e(x_t)||
    gnorm_sum_routed: Tensor | None = None  # sum_{t in X_e} g_{t,e} ||f_e(x_t)||
    norm_sum_all: Tensor | None = None  # sum_t ||f_e(x_t)||                    (all-experts pass)
    sqnorm_sum_all: Tensor | None = None  # sum_t ||f_e(x_t)||^2                (all-experts pass)
    gram: Tensor | None = None  # (E, E) sum_t f_i(x_t) . f_j(x_t)               (all-experts pass)

    def __post_init__(self) -> None:
        E = self.count.shape[0]
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, Tensor):
                continue
            want = (E, E) if f.name == "gram" else (E,)
            if tuple(v.shape) != want:
                raise ValueError(f"LayerStats.{f.name} has shape {tuple(v.shape)}, expected {want}")
            if v.dtype != torch.float64:  # sums of millions of tokens need float64; normalise once here
                object.__setattr__(self, f.name, v.to(torch.float64))

    @property
    def num_experts(self) -> int:
        return self.count.shape[0]


@dataclass(frozen=True)
class Scorer:
    name: str
    needs: str  # one of CAPTURES
    inputs: tuple[str, ...]  # optional LayerStats fields the scorer reads
    fn: Callable[..., Tensor]

    def missing(self, stats: LayerStats) -> list[str]:
        return [f for f in self.inputs if getattr(stats, f) is None]


SCORERS: dict[str, Scorer] = {}

_CAPTURED_BY = {  # optional LayerStats fields each pass fills
    "routing": (),
    "routed_outputs": ("norm_sum_routed", "gnorm_sum_routed"),
    "all_outputs": ("norm_sum_all", "sqnorm_sum_all", "gram"),
}


def register_score(name: str, inputs: tuple[str, ...] | None = None):
    """Register `fn(stats, **options) -> Tensor[E]` as the table's scoring method `name`. `inputs`: the LayerStats
    fields it reads; default: every field its calibration pass fills."""
    needs = M.get("score", name).capture

    def deco(fn):
        if name in SCORERS:
            raise ValueError(f"score method {name!r} is already registered")
        SCORERS[name] = Scorer(name, needs, _CAPTURED_BY[needs] if inputs is None else inputs, fn)
        return fn

    return deco


def _per_selected(total: Tensor, count: Tensor) -> Tensor:
    """Mean over selected tokens; 0 for an expert that was never selected (instead of 0/0)."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@register_score("sf")
def selection_frequency(s: LayerStats) -> Tensor:
    return s.count / s.n_tokens


@register_score("pp")
def preselection_probability(s: LayerStats) -> Tensor:
    return s.prob_sum / s.n_tokens


@register_score("cp")
def conditional_probability(s: LayerStats) -> Tensor:
    return _per_selected(s.prob_sum_selected, s.count)


@register_score("ean", inputs=("norm_sum_routed",))
def expert_activation_norm(s: LayerStats) -> Tensor:
    return s.norm_sum_routed / s.n_tokens


@register_score("reap", inputs=("gnorm_sum_routed",))
def router_weighted_activation(s: LayerStats) -> Tensor:
    return _per_selected(s.gnorm_sum_routed, s.count)


@register_score("acp", inputs=("sqnorm_sum_all",))
def activation_weighted_cp(s: LayerStats) -> Tensor:
    return conditional_probability(s) * (s.sqnorm_sum_all / s.n_tokens).sqrt()


def cosine_from_gram(gram: Tensor) -> Tensor:
    """G_ij / sqrt(G_ii G_jj) in float64 (scale-free, so G or G/N alike); 0 where a diagonal is 0: an expert with no
    output or no selections is similar to nothing, instead of 0/0. The one cosine of scoring and grouping."""
    gram = gram.to(torch.float64)
    norm = gram.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    return torch.where(denom > 0, gram / denom.where(denom > 0, 1.0), 0.0)


def do_acp_kernel(s: LayerStats, lam: float = DO_ACP_LAMBDA) -> Tensor:
    """L = diag(q) C diag(q) + lam I with q = acp / max(acp). The max-normalisation is our choice (the paper
    uses q = acp): it equals q = acp with ridge lam * max(acp)^2, so `lam` is relative to the best expert and means the
    same across models and layers whatever their activation scale."""
    if not lam > 0:
        raise ValueError(f"do_acp lambda must be > 0 (it keeps L positive definite), got {lam}")
    q = activation_weighted_cp(s)
    q = q / q.max() if q.max() > 0 else q
    # C_ii = 1 also for a zero-output expert: its q is 0 anyway, so it only ever contributes the ridge.
    L = q[:, None] * cosine_from_gram(s.gram).fill_diagonal_(1.0) * q[None, :]
    return L + lam * torch.eye(s.num_experts, dtype=L.dtype)


def greedy_map(L: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Greedy MAP for a DPP with PSD kernel L (Chen, Zhang & Zhou, NeurIPS 2018, Alg. 1).

    Returns (order, gains): the K items in the order picked and the marginal log-det gain of each, so
    gains.cumsum() is log det L_S of every greedy prefix. Instead of one log det per candidate and step (O(E K^4)
    naive), keep the incremental Cholesky rows `c` of the picked set: d2_j = L_jj - ||c_j||^2 is the Schur
    complement, i.e. exp(gain) of adding j, and each step updates all candidates at once in O(E * step).
    Ties go to the lower index (torch.argmax returns the first maximum). L must be positive definite.
    """
    E = L.shape[0]
    c = L.new_zeros(K, E)
    d2 = L.diagonal().clone()
    order = torch.empty(K, dtype=torch.long)
    gains = L.new_empty(K)
    picked = torch.zeros(E, dtype=torch.bool)
    for i in range(K):
        j = int(torch.argmax(d2.masked_fill(picked, -math.inf)))
        if not d2[j] > 0:
            raise ValueError(f"greedy_map: kernel is not positive definite (Schur complement {float(d2[j])})")
        order[i], gains[i] = j, d2[j].log()
        e = (L[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        d2 = d2 - e * e
        picked[j] = True
    return order, gains


@register_score("do_acp", inputs=("sqnorm_sum_all", "gram"))
def diversity_aware_acp(s: LayerStats, lam: float = DO_ACP_LAMBDA) -> Tensor:
    """Score = marginal log-det gain at the step greedy MAP (run over all E) adds the expert. log det is
    submodular, so gains are non-increasing along the greedy order and top-K by score is the greedy K-set up to
    ties; selection sorts these gains, which gives the greedy order (tests/test_selection.py)."""
    order, gains = greedy_map(do_acp_kernel(s, lam), s.num_experts)
    return torch.empty_like(gains).index_put_((order,), gains)


METHODS = M.names("score")
M.check_registry("score", SCORERS)


def _scorer(method: str) -> Scorer:
    M.get("score", method)  # unknown name: the table's error, naming the allowed ones
    return SCORERS[method]


def score(method: str, stats: LayerStats, **options) -> Tensor:
    """Score every expert of one layer with `method` -> float64 Tensor[E]. `options` go to the scorer
    (e.g. `lam=` for do_acp)."""
    sc = _scorer(method)
    if missing := sc.missing(stats):
        raise ValueError(
            f"score method {method!r} needs the {sc.needs!r} calibration pass, but these LayerStats fields were "
            f"not captured: {', '.join(missing)}; rerun calibrate with this method enabled"
        )
    return sc.fn(stats, **options)


def score_all(
    stats: LayerStats, methods: tuple[str, ...] | list[str] | None = None, options: dict[str, dict] | None = None
) -> dict[str, Tensor]:
    """Scores for `methods` (method -> Tensor[E]). With methods=None, every registered method whose inputs were
    captured; methods named explicitly must be computable, else ValueError. `options`: method -> kwargs."""
    options = options or {}
    if methods is None:
        methods = [m for m, sc in SCORERS.items() if not sc.missing(stats)]
    return {m: score(m, stats, **options.get(m, {})) for m in methods}


def scores_frame(stats_by_layer: dict[int, LayerStats], methods, options: dict[str, dict] | None = None):
    """Long table of every layer's scores: polars DataFrame (layer, expert, method, score)."""
    import polars as pl

    parts = []
    for layer, stats in sorted(stats_by_layer.items()):
        for method, values in score_all(stats, list(methods), options).items():
            parts.append(pl.DataFrame({
                "layer": pl.Series([layer] * stats.num_experts, dtype=pl.Int32),
                "expert": pl.Series(range(stats.num_experts), dtype=pl.Int32),
                "method": pl.Series([method] * stats.num_experts, dtype=pl.Utf8),
                "score": pl.Series(values.tolist(), dtype=pl.Float64),
            }))
    return pl.concat(parts)
