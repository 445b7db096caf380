"""The typed conversion plan (moe2dense/plan.py): written by stage group, read and validated by assemble.

A plan made on a tiny calibrated teacher round-trips through its JSON file (write -> read -> equal, same bytes on
rewrite), is written in the layout the pipeline always wrote (sorted keys, layer keys as strings, `gate` only on a
gated shared expert), and a file with a bad field fails with one line naming the file and the field.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe2dense.arch import get_adapter
from moe2dense.assemble import assemble
from moe2dense.calibrate.capture import capture
from moe2dense.calibrate.store import read_meta
from moe2dense.checkpoint import CheckpointReader
from moe2dense.plan import ConversionPlan, build_plan, plan_scaling, read_plan, write_plan
from moe2dense.params import Params
from moe2dense.selection import score_frame, select_from_scores
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """qwen2_moe (a sigmoid-gated shared expert): calibrated on random tokens, K = 6 experts in k = 2 groups."""
    root = tmp_path_factory.mktemp("plan")
    model = tiny_model("qwen2_moe")
    model.save_pretrained(root / "teacher")
    adapter = get_adapter(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    calib = root / "calibration"
    stats = capture(model, [(ids[:2], ["a", "a"]), (ids[2:], ["b", "b"])], calib,
                    needs={"routing", "routed_outputs", "all_outputs"}, progress=False, writer_threads=0)
    scores = score_frame(stats, ["do_acp"])
    order = select_from_scores(scores, "do_acp", 6, adapter.top_k)
    with CheckpointReader(root / "teacher") as reader:
        plan = build_plan(adapter, stats, order, scores=scores, score_method="do_acp", group_method="output",
                          blocks=None, align=False, scaling="score", reader=reader, calibration=calib,
                          shared_gate_mean=read_meta(calib)["shared_gate_mean"])
    return root, plan


def test_plan_round_trips_through_its_file(made, tmp_path):
    root, plan = made
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    back = read_plan(path)
    assert back == plan and isinstance(back, ConversionPlan)
    assert all(isinstance(layer, int) for layer in back.layers)
    again = tmp_path / "again.json"
    write_plan(again, back)
    assert again.read_bytes() == path.read_bytes()


def test_plan_file_layout(made, tmp_path):
    """The JSON the pipeline has always written: sorted keys at every level, indent 2, layer keys as strings, the
    merge-by score named, `gate` on gated shared experts only, no `calibration` unless convert adds one."""
    _, plan = made
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert sorted(data["layers"]) == ["0", "1"] and "calibration" not in data
    assert data["merge_scores"] == "acp" and data["group_method"] == "output" and not data["pure_pruning"]
    for lp in data["layers"].values():
        assert len(lp["groups"]) == 2 and sum(len(g["experts"]) for g in lp["groups"]) == 6
        assert lp["shared"] == [{"scale": lp["shared"][0]["scale"], "gate": "mean sigmoid over calibration"}]
        assert sum(g["scale"] for g in lp["groups"]) == pytest.approx(lp["routed_mass"])
        for g in lp["groups"]:
            assert sum(g["weights"]) == pytest.approx(1.0)


def _broken(made, tmp_path, edit) -> str:
    _, plan = made
    data = plan.to_json()
    edit(data)
    path = tmp_path / "grouping" / "plan.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        read_plan(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a valid conversion plan: ")
    return msg


@pytest.mark.parametrize("edit, names", [
    (lambda d: d["layers"]["0"]["groups"][0].update(scale="big"), "layers.0.groups.0.scale"),
    (lambda d: d.update(scaling_method="uniform"), "scaling_method: Extra inputs are not permitted"),
    (lambda d: d.pop("teacher"), "teacher: Field required"),
    (lambda d: d["layers"]["1"]["groups"][0]["weights"].append(0.5), "weights"),
    (lambda d: d["layers"].pop("1"), "are not the teacher's MoE layers"),
    (lambda d: d["layers"]["0"]["groups"].pop(), "the plan says K = 6 in k = 2"),
    (lambda d: d.update(pure_pruning=True), "pure_pruning is True with K = 6, k = 2"),
])
def test_bad_plan_fails_with_one_line_naming_file_and_field(made, tmp_path, edit, names):
    assert names in _broken(made, tmp_path, edit)


def test_assemble_stage_refuses_a_bad_plan_in_one_line(made, tmp_path):
    """`python -m stages.assemble` (from the workspace, as DVC runs it): exit 2 and one line naming the file and
    the field, before the teacher is opened."""
    data = made[1].to_json()
    data["layers"]["1"]["groups"][1]["scale"] = "big"
    (tmp_path / "grouping").mkdir()
    (tmp_path / "grouping" / "plan.json").write_text(json.dumps(data))
    (tmp_path / "params.yaml").write_text((REPO / "tests" / "smoke_params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.assemble"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("[assemble] error: grouping/plan.json: not a valid conversion plan: "
                           "layers.1.groups.1.scale: Input should be a valid number")
    assert not (tmp_path / "models").exists()


def test_unreadable_plan_is_one_line(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"teacher": ')
    with pytest.raises(ValueError, match=r"plan\.json: not a valid conversion plan: .*Invalid JSON") as err:
        read_plan(path)
    assert "\n" not in str(err.value)


def test_assemble_takes_the_typed_plan(made, tmp_path):
    root, plan = made
    with pytest.raises(TypeError, match="assemble takes a ConversionPlan"):
        assemble(root / "teacher", plan.to_json(), tmp_path, progress=False)


def test_scaling_is_decided_where_the_plan_is_made():
    assert plan_scaling(Params.model_validate({"group": {"scaling": "score"}})) == "score"
    assert plan_scaling(Params()) == "uniform"
