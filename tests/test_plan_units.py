"""Plan making pinned by hand (moe2dense/plan.py): the one input each grouping reads, the shared blocks, a whole
plan built from hand-made LayerStats and scores, and the plan file's one-line errors (no calibration run)."""
from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe2dense.arch import get_adapter
from moe2dense.calibrate.store import routing_path
from moe2dense.checkpoint import CheckpointReader
from moe2dense.plan import PLAN_ERROR_HINT, ConversionPlan, SharedBlock, _group_inputs, _shared, build_plan, read_plan
from moe2dense.scoring import LayerStats
from moe2dense.teacher_weights import read_router_weight
from tiny_models import tiny_config, tiny_model

E = 8
f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def layer_stats() -> LayerStats:
    """N = 10 tokens, top-2, experts 4..7 never selected; the output Gram makes {0, 1} and {2, 3} alike (cos 0.9)."""
    gram = torch.eye(E, dtype=torch.float64)
    gram[0, 1] = gram[1, 0] = gram[2, 3] = gram[3, 2] = 0.9
    return LayerStats(n_tokens=10, top_k=2, count=f64([6, 4, 8, 2, 0, 0, 0, 0]), prob_sum=f64([1.0] * E),
                      prob_sum_selected=f64([1.0] * E), weight_sum=f64([3.0, 1.0, 4.0, 0.5, 0, 0, 0, 0]), gram=gram)


S = layer_stats()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    tiny_model("qwen2_moe").save_pretrained(root)
    with CheckpointReader(root) as reader:
        yield reader


# ------------------------------------------------------------------------------------------------ _group_inputs
def test_group_inputs_loads_only_what_the_method_reads(teacher, tmp_path):
    adapter = get_adapter(tiny_config("qwen2_moe"))
    g = _group_inputs("gram", [2, 0], 1, S, adapter, None, None)
    assert g.experts == [2, 0] and g.gram is S.gram
    assert (g.router_weight, g.coselect, g.expert_weights) == (None, None, None)
    r = _group_inputs("router_weight", [2, 0], 1, S, adapter, teacher, None)
    assert torch.equal(r.router_weight, read_router_weight(teacher, adapter, 1)) and r.router_weight.shape == (E, 32)
    assert r.experts == [2, 0]
    assert (r.gram, r.coselect, r.expert_weights) == (None, None, None)
    w = _group_inputs("expert_weights", [2, 0], 1, S, adapter, teacher, None)
    assert sorted(w.expert_weights) == [0, 2] and w.expert_weights[2].gate.shape == (16, 32) and w.experts == [2, 0]
    assert (w.gram, w.coselect, w.router_weight) == (None, None, None)
    # coselect: a routing capture of 3 tokens on layer 1 (ids [0, 1], [1, 2], [0, 1])
    path = routing_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"experts": pa.array([[0, 1], [1, 2], [0, 1]], type=pa.list_(pa.int16(), 2))}), path)
    c = _group_inputs("coselect", [1, 0], 1, S, adapter, None, tmp_path)
    assert c.coselect.shape == (E, E) and c.experts == [1, 0]
    assert c.coselect[:3, :3].tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 1]] and c.coselect.sum() == 12
    assert (c.gram, c.router_weight, c.expert_weights) == (None, None, None)


def test_group_inputs_errors_name_the_missing_input():
    adapter = get_adapter(tiny_config("qwen2_moe"))
    for need in ("expert_weights", "router_weight"):
        with pytest.raises(ValueError, match=f"^grouping by {need} needs the teacher checkpoint$"):
            _group_inputs(need, [0, 1], 0, S, adapter, None, None)
    with pytest.raises(ValueError, match="^grouping by coactivation needs the calibration routing Parquet$"):
        _group_inputs("coselect", [0, 1], 0, S, adapter, None, None)
    with pytest.raises(ValueError, match="^unknown grouping input 'weights'$"):
        _group_inputs("weights", [0, 1], 0, S, adapter, None, None)


# ------------------------------------------------------------------------------------------------------ _shared
def test_shared_blocks_by_family():
    assert _shared(get_adapter(tiny_config("qwen3_moe")), 0, {"0": 0.5}) == []  # no shared expert
    assert _shared(get_adapter(tiny_config("deepseek_v3")), 1, {}) == [SharedBlock(scale=1.0)]  # ungated: c = 1
    gated = _shared(get_adapter(tiny_config("qwen2_moe")), 1, {"0": 0.5, "1": 0.25})
    assert gated == [SharedBlock(scale=0.25, gate="mean sigmoid over calibration")]
    with pytest.raises(ValueError, match=r"^layer 1: the shared expert's mean gate was not captured; rerun calibration "
                                         r"\(`dvc repro calibrate`\) with this version$"):
        _shared(get_adapter(tiny_config("qwen2_moe")), 1, {"0": 0.5})


# --------------------------------------------------------------------------------------------------- build_plan
def scores_frame(values: dict[int, list[float]], method: str = "sf") -> pl.DataFrame:
    return pl.DataFrame({"layer": pl.Series([l for l in values for _ in range(E)], dtype=pl.Int32),
                         "expert": pl.Series([e for _ in values for e in range(E)], dtype=pl.Int32),
                         "method": [method] * (E * len(values)),
                         "score": [v for vals in values.values() for v in vals]})


# layer 0's scores: group {2, 3} merges 0.8 : 0.2, group {0, 1} 0.6 : 0.4; layer 1 gives expert 3 a negative
# score, clamped to 0, so its group is expert 2 alone in weight
SCORES = scores_frame({0: [0.6, 0.4, 0.8, 0.2, 0, 0, 0, 0], 1: [0.3, 0.3, 0.5, -0.5, 0, 0, 0, 0]})
ORDER = {0: [2, 0, 1, 3], 1: [2, 0, 1, 3]}


def test_build_plan_by_hand():
    adapter = get_adapter(tiny_config("qwen2_moe"))  # does not renormalise: m is measured, 8.5 / 10
    plan = build_plan(adapter, {0: S, 1: S}, ORDER, scores=SCORES, score_method="sf", group_method="output",
                      blocks=2, align=True, scaling="score", shared_gate_mean={"0": 0.5, "1": 0.25})
    # groups by output cosine: {2, 3} (best member 2 at rank 0) and {0, 1}; c_g = mean applied weight when selected,
    # (4 + 0.5) / (8 + 2) = 0.45 and (3 + 1) / (6 + 4) = 0.4, normalised to m = 0.85 (they already sum to it)
    gated = [{"scale": 0.5, "gate": "mean sigmoid over calibration"}]
    assert plan.to_json() == {
        "teacher": {"model_type": "qwen2_moe", "num_experts": 8, "top_k": 2, "num_layers": 2, "moe_layers": [0, 1],
                    "dense_layers": []},
        "score_method": "sf", "merge_scores": "sf", "experts_per_layer": 4, "blocks_per_layer": 2,
        "pure_pruning": False, "group_method": "output", "align": True, "scaling": "score",
        "layers": {"0": {"routed_mass": pytest.approx(0.85, abs=1e-15), "shared": gated, "groups": [
                       {"experts": [2, 3], "weights": pytest.approx([0.8, 0.2], abs=1e-15),
                        "scale": pytest.approx(0.45, abs=1e-15)},
                       {"experts": [0, 1], "weights": pytest.approx([0.6, 0.4], abs=1e-15),
                        "scale": pytest.approx(0.4, abs=1e-15)}]},
                   "1": {"routed_mass": pytest.approx(0.85, abs=1e-15), "shared": [gated[0] | {"scale": 0.25}],
                         "groups": [{"experts": [2, 3], "weights": [1.0, 0.0], "scale": pytest.approx(0.45, abs=1e-15)},
                                    {"experts": [0, 1], "weights": [0.5, 0.5],
                                     "scale": pytest.approx(0.4, abs=1e-15)}]}},
    }


def test_build_plan_renormalising_router_pure_pruning_and_default_k():
    adapter = get_adapter(tiny_config("qwen3_moe"))  # renormalises: m = 1 exactly; top-2, no shared expert
    plan = build_plan(adapter, {0: S, 1: S}, {0: [2, 0], 1: [1, 0]}, scores=SCORES, score_method="sf",
                      group_method="output", blocks=None, align=True, scaling="score")
    assert (plan.blocks_per_layer, plan.experts_per_layer, plan.pure_pruning) == (2, 2, True)
    assert (plan.group_method, plan.align, plan.merge_scores) == (None, False, "sf")  # nothing grouped or aligned
    lp = plan.layers[0]
    assert lp.routed_mass == 1.0 and lp.shared == ()
    # singletons weighted 1; c_g: 0.5 (expert 2) and 0.5 (expert 0) normalised to 1
    assert [(g.experts, g.weights, g.scale) for g in lp.groups] == [((2,), (1.0,), 0.5), ((0,), (1.0,), 0.5)]
    # layer 1: expert 1 mean 0.25, expert 0 mean 0.5: c = 1/3, 2/3
    assert [g.experts for g in plan.layers[1].groups] == [(1,), (0,)]
    assert [g.scale for g in plan.layers[1].groups] == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    uniform = build_plan(adapter, {0: S, 1: S}, ORDER, scores=SCORES, score_method="sf", group_method="output",
                         blocks=1, align=False, scaling="uniform")
    assert [(g.experts, g.scale) for g in uniform.layers[0].groups] == [((2, 0, 1, 3), 1.0)]  # best first
    assert uniform.layers[0].groups[0].weights == pytest.approx((0.4, 0.3, 0.2, 0.1), abs=1e-15)


def test_build_plan_merges_do_acp_groups_by_acp():
    adapter = get_adapter(tiny_config("qwen3_moe"))
    frame = pl.concat([scores_frame({0: [-1.0] * E, 1: [-1.0] * E}, "do_acp"),
                       scores_frame({0: [0.1, 0.3, 0, 0, 0, 0, 0, 0], 1: [0.2, 0.2, 0, 0, 0, 0, 0, 0]}, "acp")])
    plan = build_plan(adapter, {0: S, 1: S}, {0: [0, 1], 1: [0, 1]}, scores=frame, score_method="do_acp",
                      group_method="output", blocks=1, align=False, scaling="uniform")
    assert (plan.score_method, plan.merge_scores) == ("do_acp", "acp")
    assert plan.layers[0].groups[0].weights == pytest.approx((0.25, 0.75), abs=1e-15)


def test_build_plan_errors():
    adapter = get_adapter(tiny_config("qwen3_moe"))
    kw = dict(scores=SCORES, score_method="sf", group_method="output", align=False, scaling="uniform")
    with pytest.raises(ValueError, match=r"^group.k = 5 must be in \[1, select.experts = 4\]$"):
        build_plan(adapter, {0: S, 1: S}, ORDER, blocks=5, **kw)
    with pytest.raises(ValueError, match="^layer 1 has 3 selected experts, layer 0 4$"):
        build_plan(adapter, {0: S, 1: S}, {0: [0, 1, 2, 3], 1: [0, 1, 2]}, blocks=2, **kw)
    with pytest.raises(ValueError, match="^grouping by router_weight needs the teacher checkpoint$"):
        build_plan(adapter, {0: S, 1: S}, ORDER, blocks=2, **(kw | {"group_method": "router"}))
    # K == k never reads an input: no reader needed for a weight grouping
    assert build_plan(adapter, {0: S, 1: S}, ORDER, blocks=4, **(kw | {"group_method": "weight"})).pure_pruning


# ------------------------------------------------------------------------------------------------ read_plan
def _plan_data():
    adapter = get_adapter(tiny_config("qwen3_moe"))
    return build_plan(adapter, {0: S, 1: S}, ORDER, scores=SCORES, score_method="sf", group_method="output",
                      blocks=2, align=False, scaling="uniform").to_json()


@pytest.mark.parametrize("edit, problems", [
    (lambda d: d["teacher"].update(top_k=0), "teacher.top_k: Input should be greater than or equal to 1 (got 0)"),
    (lambda d: d["teacher"].update(model_type=None), "teacher.model_type: Input should be a valid string (got None)"),
    (lambda d: d.pop("scaling"), "scaling: Field required"),
    (lambda d: d.update(layers=[1]), "layers: Input should be an object"),
    (lambda d: d["layers"]["0"].update(groups={"a": 1}), "layers.0.groups: Input should be a valid array"),
    (lambda d: d.update(teacher=5), "teacher: Input should be an object (got 5)"),
    (lambda d: d["layers"]["0"]["groups"][0].update(weights=[1.0]), "layers.0.groups.0: Value error, 2 experts but "
                                                                     "1 weights"),
    (lambda d: d.update(align="x", scaling=1),
     "align: Input should be a valid boolean, unable to interpret input (got 'x'); scaling: Input should be a valid "
     "string (got 1)"),
    (lambda d: d["layers"]["1"]["groups"][1].update(experts=[0, 8]),
     "<root>: Value error, layer 1: experts [2, 3, 0, 8] must be distinct ids in [0, 8)"),
    (lambda d: d["layers"]["1"]["groups"][1].update(experts=[2, 0]),
     "<root>: Value error, layer 1: experts [2, 3, 2, 0] must be distinct ids in [0, 8)"),
    (lambda d: d["layers"]["0"]["groups"][1].update(experts=[-1, 0]),
     "<root>: Value error, layer 0: experts [2, 3, -1, 0] must be distinct ids in [0, 8)"),
    (lambda d: d["layers"].pop("1"), "<root>: Value error, layers [0] are not the teacher's MoE layers [0, 1]"),
    (lambda d: d.update(pure_pruning=True), "<root>: Value error, pure_pruning is True with K = 4, k = 2"),
    (lambda d: d["layers"]["0"]["groups"].pop(),
     "<root>: Value error, layer 0 has 2 experts in 1 groups; the plan says K = 4 in k = 2"),
    (lambda d: d["layers"]["0"]["groups"][0].update(experts=[2, 3, 6], weights=[0.5, 0.25, 0.25]),
     "<root>: Value error, layer 0 has 5 experts in 2 groups; the plan says K = 4 in k = 2"),
])
def test_read_plan_errors_are_one_exact_line(tmp_path, edit, problems):
    data = _plan_data()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        read_plan(path)
    assert str(err.value) == f"{path}: not a valid conversion plan: {problems}; {PLAN_ERROR_HINT}"


def test_read_plan_of_broken_json_and_a_valid_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"teacher": ')
    with pytest.raises(ValueError) as err:
        read_plan(str(path))
    assert str(err.value) == (f"{path}: not a valid conversion plan: <root>: Invalid JSON: EOF while parsing a value "
                              f"at line 1 column 12; {PLAN_ERROR_HINT}")
    assert PLAN_ERROR_HINT == "rerun the group stage (`dvc repro group`) with this version"
    path.write_text(json.dumps(_plan_data()))
    assert read_plan(str(path)) == ConversionPlan.model_validate(_plan_data())


def test_build_plan_by_coactivation_reads_the_routing_capture(tmp_path):
    # layer 0 and 1: tokens pick {2, 3} or {0, 1} together, so coactivation pairs them
    for layer in (0, 1):
        path = routing_path(tmp_path, layer)
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"experts": pa.array([[2, 3], [0, 1], [3, 2], [1, 0]], type=pa.list_(pa.int16(), 2))}),
                       path)
    adapter = get_adapter(tiny_config("qwen3_moe"))
    plan = build_plan(adapter, {0: S, 1: S}, ORDER, scores=SCORES, score_method="sf", group_method="coactivation",
                      blocks=2, align=False, scaling="uniform", calibration=str(tmp_path))
    assert [g.experts for g in plan.layers[1].groups] == [(2, 3), (0, 1)] and plan.group_method == "coactivation"
    assert [g.scale for g in plan.layers[0].groups] == [0.5, 0.5]


def test_build_plan_reads_router_rows_from_the_given_checkpoint(teacher):
    from moe2dense.grouping import GroupInputs, group_experts

    adapter = get_adapter(tiny_config("qwen2_moe"))
    plan = build_plan(adapter, {0: S, 1: S}, ORDER, scores=SCORES, score_method="sf", group_method="router",
                      blocks=2, align=False, scaling="uniform", reader=teacher, shared_gate_mean={"0": 0.5, "1": 0.5})
    for layer in (0, 1):
        want = group_experts("router", GroupInputs(ORDER[layer], router_weight=read_router_weight(teacher, adapter,
                                                                                                  layer)), 2)
        assert [list(g.experts) for g in plan.layers[layer].groups] == want and len(want) == 2
