"""Stage `group`: the K selected experts of every MoE layer -> k dense blocks (grouping, merge weights, scale c_g)
-> grouping/plan.json, the plan `assemble` executes."""

from __future__ import annotations

import logging
from statistics import mean

import polars as pl

from stages._runner import run
from moe2dense.arch import get_adapter
from moe2dense.calibrate.store import read_meta, read_stats
from moe2dense.checkpoint import CheckpointReader
from moe2dense.io import atomic_dir, read_json, write_json
from moe2dense.params import load_params
from moe2dense.plan import build_plan, plan_scaling, write_plan
from moe2dense.teacher.load import teacher_config
from moe2dense.teacher.source import teacher_checkpoint

CALIBRATION = "calibration"
SCORES = "scores/scores.parquet"  # the merge-by scores, computed once by stage score
SELECTION = "selection/selection.json"
OUT = "grouping"
METRICS = "metrics/group.json"


def main() -> None:
    params = load_params()
    g = params.group
    adapter = get_adapter(teacher_config())
    selection = read_json(SELECTION)
    order = {int(layer): v["order"] for layer, v in selection["layers"].items()}
    K, k = selection["experts_per_layer"], g.k or adapter.top_k
    if K == k:
        logging.info("select.experts == k == %d: pure pruning, every kept expert is its own block; group.method "
                     "(%s) and group.align are ignored", k, g.method)
    with CheckpointReader(teacher_checkpoint()) as reader:
        plan = build_plan(adapter, read_stats(CALIBRATION), order, scores=pl.read_parquet(SCORES),
                          score_method=selection["method"], group_method=g.method, blocks=g.k, align=g.align,
                          scaling=plan_scaling(params), reader=reader, calibration=CALIBRATION,
                          shared_gate_mean=read_meta(CALIBRATION).get("shared_gate_mean", {}))
    with atomic_dir(OUT) as out:
        write_plan(out / "plan.json", plan)
    groups = [grp for lp in plan.layers.values() for grp in lp.groups]
    sizes, scales = [len(grp.experts) for grp in groups], [grp.scale for grp in groups]
    write_json(METRICS, {"blocks_per_layer": plan.blocks_per_layer, "experts_per_layer": K,
                         "pure_pruning": plan.pure_pruning, "group_method": plan.group_method,
                         "scaling": plan.scaling, "align": plan.align, "largest_group": max(sizes),
                         "mean_group_size": round(mean(sizes), 4), "scale_min": round(min(scales), 6),
                         "scale_max": round(max(scales), 6)})
    logging.info("%d MoE layers: %d experts -> %d blocks (%s), scaling %s", len(plan.layers), K,
                 plan.blocks_per_layer, plan.group_method or "pure pruning", plan.scaling)


if __name__ == "__main__":
    run("group", main)
