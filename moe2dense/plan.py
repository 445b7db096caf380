"""The conversion plan: for every layer, which experts merge into which dense block, with what member weights and
what scale c_g. Made by stage `group` (and `convert`, and each screen configuration) and written as JSON a person
can read; `assemble` executes it and decides nothing.

    {"teacher": {...}, "blocks_per_layer": k, "pure_pruning": K == k, "group_method": ..., "scaling": ...,
     "layers": {"<L>": {"routed_mass": m,
                        "groups": [{"experts": [best, ...], "weights": [...], "scale": c_g}, ...],
                        "shared": [{"scale": c}]}}}

Merge weights come from the selection method's scores, read from the score frame (scores/scores.parquet), except
do_acp, whose per-expert values are log-det gains (negative once the set stops gaining): its groups merge by acp,
the quality term of its kernel (`selection.merge_score_method`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe2dense.arch import Adapter
from moe2dense.calibrate.store import routing_batches
from moe2dense.checkpoint import CheckpointReader
from moe2dense.grouping import GroupInputs, coselection_counts, group_experts, merge_weights, required_input
from moe2dense.io import write_json
from moe2dense.scaling import group_scales, routed_mass
from moe2dense.scoring import LayerStats
from moe2dense.selection import layer_scores, merge_score_method
from moe2dense.teacher_weights import read_experts, read_router_weight


def _absent(value: Any) -> bool:
    return value is None


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherShape(_Frozen):
    """The teacher the plan was made for; assemble refuses another."""

    model_type: str
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]


class Group(_Frozen):
    """One dense block: its member experts (best first), their merge weights and the block's constant c_g."""

    experts: tuple[int, ...] = Field(min_length=1)
    weights: tuple[float, ...]
    scale: float

    @model_validator(mode="after")
    def _one_weight_per_member(self) -> "Group":
        if len(self.weights) != len(self.experts):
            raise ValueError(f"{len(self.experts)} experts but {len(self.weights)} weights")
        return self


class SharedBlock(_Frozen):
    """A shared expert kept as an extra block with constant `scale` (its mean gate, when it has one)."""

    scale: float
    gate: Annotated[str | None, Field(exclude_if=_absent)] = None  # how the scale was measured, if gated


class LayerPlan(_Frozen):
    routed_mass: float  # m: the mean total routing weight per token the blocks' scales sum to
    groups: tuple[Group, ...] = Field(min_length=1)
    shared: tuple[SharedBlock, ...] = ()


class CalibrationInfo(_Frozen):
    """Where `convert`'s calibration came from (the pipeline's is a DVC output of its own)."""

    tokens: int
    seq_len: int
    data: str


class ConversionPlan(_Frozen):
    teacher: TeacherShape
    score_method: str
    merge_scores: str  # the score the groups' merge weights come from
    experts_per_layer: int = Field(ge=1)  # K
    blocks_per_layer: int = Field(ge=1)  # k
    pure_pruning: bool  # K == k: every kept expert is its own block
    group_method: str | None  # None when pure pruning
    align: bool
    scaling: str
    layers: dict[int, LayerPlan]
    calibration: Annotated[CalibrationInfo | None, Field(exclude_if=_absent)] = None

    @model_validator(mode="after")
    def _consistent(self) -> "ConversionPlan":
        if sorted(self.layers) != sorted(self.teacher.moe_layers):
            raise ValueError(f"layers {sorted(self.layers)} are not the teacher's MoE layers "
                             f"{list(self.teacher.moe_layers)}")
        if self.pure_pruning != (self.experts_per_layer == self.blocks_per_layer):
            raise ValueError(f"pure_pruning is {self.pure_pruning} with K = {self.experts_per_layer}, "
                             f"k = {self.blocks_per_layer}")
        for layer, lp in self.layers.items():
            members = [e for g in lp.groups for e in g.experts]
            if len(lp.groups) != self.blocks_per_layer or len(members) != self.experts_per_layer:
                raise ValueError(f"layer {layer} has {len(members)} experts in {len(lp.groups)} groups; the plan "
                                 f"says K = {self.experts_per_layer} in k = {self.blocks_per_layer}")
            if len(set(members)) != len(members) or not all(0 <= e < self.teacher.num_experts for e in members):
                raise ValueError(f"layer {layer}: experts {members} must be distinct ids in "
                                 f"[0, {self.teacher.num_experts})")
        return self

    def to_json(self) -> dict:
        """The plan as JSON data: layer keys as strings (JSON has no int keys)."""
        return self.model_dump(mode="json")


def plan_scaling(params) -> str:
    """The scaling the plan is made with: decided where the plan is made, from stage group's own section."""
    return params.group.scaling


PLAN_ERROR_HINT = "rerun the group stage (`dvc repro group`) with this version"


def write_plan(path: str | Path, plan: ConversionPlan) -> None:
    """Atomic, deterministic JSON (moe2dense.io.write_json: sorted keys, indent 2)."""
    write_json(path, plan.to_json())


def read_plan(path: str | Path) -> ConversionPlan:
    """The validated plan at `path`; a one-line ValueError naming the file and every bad field otherwise."""
    path = Path(path)
    try:
        return ConversionPlan.model_validate_json(path.read_bytes())
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            where = ".".join(str(p) for p in e["loc"]) or "<root>"
            given = e.get("input")
            shown = "" if e["type"] in ("missing", "json_invalid") or isinstance(given, (dict, list)) \
                else f" (got {given!r})"
            problems.append(f"{where}: {e['msg']}{shown}")
        raise ValueError(f"{path}: not a valid conversion plan: {'; '.join(problems)}; {PLAN_ERROR_HINT}") from None


# ------------------------------------------------------------------------------------------------- making a plan
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
    scores,
    score_method: str,
    group_method: str,
    blocks: int | None,
    align: bool,
    scaling: str,
    reader: CheckpointReader | None = None,
    calibration: str | Path | None = None,
    shared_gate_mean: Mapping[str, float] | None = None,
) -> ConversionPlan:
    """`order`: layer -> the K selected experts, best first (the `select` stage's "order"). `scores`: the score
    frame (`selection.score_frame`, scores/scores.parquet) holding the merge-by score of `score_method`. `stats`:
    the calibration LayerStats (routed mass, scales, Gram matrix)."""
    k = blocks or adapter.top_k
    K = len(next(iter(order.values())))
    if not 1 <= k <= K:
        raise ValueError(f"group.k = {k} must be in [1, select.experts = {K}]")
    pure = K == k
    calibration = Path(calibration) if calibration is not None else None
    need = None if pure else required_input(group_method)
    merge_by = merge_score_method(score_method)
    quality_by_layer = layer_scores(scores, merge_by)
    layers = {}
    for layer in adapter.moe_layers:
        s, experts = stats[layer], [int(e) for e in order[layer]]
        if len(experts) != K:
            raise ValueError(f"layer {layer} has {len(experts)} selected experts, layer {adapter.moe_layers[0]} {K}")
        inputs = GroupInputs(experts) if pure else _group_inputs(need, experts, layer, s, adapter, reader,
                                                                 calibration)
        groups = group_experts(group_method, inputs, k)
        quality = quality_by_layer[layer]
        m = routed_mass(s, adapter.renormalizes, adapter.routed_scaling_factor)
        scales = group_scales(scaling, groups, s, m)
        layers[layer] = LayerPlan(
            routed_mass=m,
            groups=[Group(experts=g, weights=merge_weights([max(float(quality[e]), 0.0) for e in g]), scale=c)
                    for g, c in zip(groups, scales)],
            shared=_shared(adapter, layer, shared_gate_mean or {}),
        )
    return ConversionPlan(
        teacher=TeacherShape(model_type=adapter.model_type, num_experts=adapter.num_experts, top_k=adapter.top_k,
                             num_layers=adapter.num_layers, moe_layers=adapter.moe_layers,
                             dense_layers=adapter.dense_layers),
        score_method=score_method, merge_scores=merge_by, experts_per_layer=K, blocks_per_layer=k, pure_pruning=pure,
        group_method=None if pure else group_method, align=bool(align) and not pure, scaling=scaling, layers=layers,
    )


def _shared(adapter: Adapter, layer: int, shared_gate_mean: Mapping[str, float]) -> list[SharedBlock]:
    """Shared experts become extra blocks: c = 1 if ungated, else the mean sigmoid gate over calibration."""
    if adapter.spec.shared_attr is None:
        return []
    if adapter.spec.shared_gate_attr is None:
        return [SharedBlock(scale=1.0)]
    if str(layer) not in shared_gate_mean:
        raise ValueError(f"layer {layer}: the shared expert's mean gate was not captured; rerun calibration "
                         "(`dvc repro calibrate`) with this version")
    return [SharedBlock(scale=float(shared_gate_mean[str(layer)]), gate="mean sigmoid over calibration")]
