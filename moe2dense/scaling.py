"""Magnitude scaling: the constant c_g that stands in for dense block g's routing weight (docs/architecture.md,
"Methods"; the names are the method table's, moe2dense/methods.py).

In the teacher, a token's FFN output is sum_{e in S_t} g_{t,e} f_e(x_t); the dense student computes
sum_g c_g E_g(x_t) for every token. Both rules keep the total weight per token at m, the mean total routed weight
per token over calibration: 1 when the router renormalises its top-k, times routed_scaling_factor where the family
has one; measured from calibration otherwise (e.g. qwen3_moe with norm_topk_prob false, deepseek_v2).

Where the routing weight multiplies the expert's input instead (llama4_text: sum_{e in S_t} f_e(g_{t,e} x_t)), the
student computes sum_g E_g(c_g x_t) (assemble.scale_input), and c_g keeps its meaning, the weight block g stands for:
exact when every selected score is the constant c_g (the uniform-router probe), otherwise the same rules'
estimate; with SwiGLU not homogeneous, f(c x) != c f(x), so the two placements are not interchangeable.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from moe2dense import methods as M
from moe2dense.scoring import LayerStats

Groups = Sequence[Sequence[int]]
ScaleFn = Callable[[Groups, LayerStats, float], list[float]]
SCALINGS: dict[str, ScaleFn] = {}


def register_scaling(name: str) -> Callable[[ScaleFn], ScaleFn]:
    M.get("scaling", name)

    def deco(fn: ScaleFn) -> ScaleFn:
        SCALINGS[name] = fn
        return fn
    return deco


def routed_mass(stats: LayerStats, renorm: bool, scale: float) -> float:
    """m: the mean total routing weight a token's routed experts receive."""
    if renorm:
        return scale  # exactly, not the float sum of renormalised weights
    return float(stats.weight_sum.sum()) / stats.n_tokens if stats.n_tokens else scale


@register_scaling("uniform")
def uniform(groups: Groups, stats: LayerStats, m: float) -> list[float]:
    """c_g = m / k: every block stands for an equal share of the routed weight."""
    return [m / len(groups)] * len(groups)


@register_scaling("score")
def by_routing_weight(groups: Groups, stats: LayerStats, m: float) -> list[float]:
    """c_g proportional to the group's mean applied weight when selected (sum of g over its members' selections /
    their selection count), normalised to sum to m. Groups never selected get 0; if none was, uniform."""
    means = []
    for members in groups:
        count = float(stats.count[list(members)].sum())
        means.append(float(stats.weight_sum[list(members)].sum()) / count if count else 0.0)
    total = sum(means)
    if total <= 0:
        return uniform(groups, stats, m)
    return [m * w / total for w in means]


M.check_registry("scaling", SCALINGS)


def group_scales(kind: str, groups: Groups, stats: LayerStats, m: float) -> list[float]:
    M.get("scaling", kind)
    if not groups:
        raise ValueError("no groups to scale")
    return SCALINGS[kind](groups, stats, m)
