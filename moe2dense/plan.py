"""The conversion plan: for every layer, which experts merge into which dense block, with what member weights and
what scale c_g. Written by stage `group` as JSON a person can read; `assemble` executes it.

    {"teacher": {...}, "blocks_per_layer": k, "pure_pruning": K == k, "group_method": ..., "scaling": ...,
     "layers": {"<L>": {"routed_mass": m,
                        "groups": [{"experts": [best, ...], "weights": [...], "scale": c_g}, ...],
                        "shared": [{"scale": c}]}}}

Merge weights come from the selection method's scores, except do_acp, whose per-expert values are log-det gains
(negative once the set stops gaining): its groups merge by acp, the quality term of its kernel.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from moe2dense.arch import Adapter
from moe2dense.calibrate.store import routing_batches
from moe2dense.checkpoint import CheckpointReader
from moe2dense.grouping import GroupInputs, coselection_counts, group_experts, merge_weights, required_input
from moe2dense.scaling import group_scales, routed_mass
from moe2dense.scoring import LayerStats, score
from moe2dense.teacher_weights import read_experts, read_router_weight

MERGE_SCORE = {"do_acp": "acp"}  # methods whose scores are not a quality to average by -> the one to use


def merge_score_method(method: str) -> str:
    return MERGE_SCORE.get(method, method)


def _group_inputs(need: str, experts: list[int], layer: int, stats: LayerStats, adapter: Adapter,
                  reader: CheckpointReader | None, calibration: Path | None) -> GroupInputs:
    """Only the one input the method reads is loaded (router rows, K experts' weights, or a routing scan)."""
    if need in ("expert_weights", "router_weight") and reader is None:
        raise ValueError(f"grouping by {need} needs the teacher checkpoint")
    if need == "gram":
        return GroupInputs(experts, gram=stats.gram)
    if need == "router_weight":
        return GroupInputs(experts, router_weight=read_router_weight(reader, adapter, layer))
    if need == "expert_weights":
        return GroupInputs(experts, expert_weights=read_experts(reader, adapter, layer, experts))
    if need == "coselect":
        if calibration is None:
            raise ValueError("grouping by coactivation needs the calibration routing Parquet")
        counts = coselection_counts(routing_batches(calibration, layer, adapter.top_k), adapter.num_experts)
        return GroupInputs(experts, coselect=counts)
    raise ValueError(f"unknown grouping input {need!r}")


def build_plan(
    adapter: Adapter,
    stats: Mapping[int, LayerStats],
    order: Mapping[int, list[int]],
    *,
    score_method: str,
    group_method: str,
    blocks: int | None,
    align: bool,
    scaling: str,
    reader: CheckpointReader | None = None,
    calibration: str | Path | None = None,
    shared_gate_mean: Mapping[str, float] | None = None,
) -> dict:
    """`order`: layer -> the K selected experts, best first (the `select` stage's "order")."""
    k = blocks or adapter.top_k
    K = len(next(iter(order.values())))
    if not 1 <= k <= K:
        raise ValueError(f"group.k = {k} must be in [1, select.experts = {K}]")
    pure = K == k
    calibration = Path(calibration) if calibration is not None else None
    need = None if pure else required_input(group_method)
    merge_by = merge_score_method(score_method)
    layers = {}
    for layer in adapter.moe_layers:
        s, experts = stats[layer], [int(e) for e in order[layer]]
        if len(experts) != K:
            raise ValueError(f"layer {layer} has {len(experts)} selected experts, layer {adapter.moe_layers[0]} {K}")
        inputs = GroupInputs(experts) if pure else _group_inputs(need, experts, layer, s, adapter, reader,
                                                                 calibration)
        groups = group_experts(group_method, inputs, k)
        quality = score(merge_by, s)
        m = routed_mass(s, adapter.renormalizes, adapter.routed_scaling_factor)
        scales = group_scales(scaling, groups, s, m)
        layers[str(layer)] = {
            "routed_mass": m,
            "groups": [{"experts": g, "weights": merge_weights([max(float(quality[e]), 0.0) for e in g]),
                        "scale": c} for g, c in zip(groups, scales)],
            "shared": _shared(adapter, layer, shared_gate_mean or {}),
        }
    return {
        "teacher": {"model_type": adapter.model_type, "num_experts": adapter.num_experts, "top_k": adapter.top_k,
                    "num_layers": adapter.num_layers, "moe_layers": adapter.moe_layers,
                    "dense_layers": adapter.dense_layers},
        "score_method": score_method,
        "merge_scores": merge_by,
        "experts_per_layer": K,
        "blocks_per_layer": k,
        "pure_pruning": pure,
        "group_method": None if pure else group_method,
        "align": bool(align) and not pure,
        "scaling": scaling,
        "layers": layers,
    }


def _shared(adapter: Adapter, layer: int, shared_gate_mean: Mapping[str, float]) -> list[dict]:
    """Shared experts become extra blocks: c = 1 if ungated, else the mean sigmoid gate over calibration."""
    if adapter.spec.shared_attr is None:
        return []
    if adapter.spec.shared_gate_attr is None:
        return [{"scale": 1.0}]
    if str(layer) not in shared_gate_mean:
        raise ValueError(f"layer {layer}: the shared expert's mean gate was not captured; rerun calibration "
                         "(`dvc repro calibrate`) with this version")
    return [{"scale": float(shared_gate_mean[str(layer)]), "gate": "mean sigmoid over calibration"}]
