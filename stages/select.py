"""Stage `select`: keep the top K experts per MoE layer by `score.method`, read from scores/scores.parquet ->
selection/selection.json; also selects with every computed method for the comparison heatmap."""

from __future__ import annotations

import logging

import polars as pl

from stages._runner import run
from moe2dense.calibrate.store import read_meta, read_stats
from moe2dense.io import atomic_dir, atomic_file, write_json
from moe2dense.params import load_params
from moe2dense.plots import plot_selection_heatmap
from moe2dense.selection import check_budget, layer_scores, routed_mass_kept, select_from_scores

CALIBRATION = "calibration"
SCORES = "scores/scores.parquet"
OUT = "selection"
METRICS = "metrics/select.json"


def main() -> None:
    params = load_params()
    K, method = params.select.experts, params.score.method
    meta = read_meta(CALIBRATION)
    k, E = meta["top_k"], meta["num_experts"]
    check_budget(K, k, E)
    stats = read_stats(CALIBRATION)  # routed mass only
    frame = pl.read_parquet(SCORES)
    every = {m: select_from_scores(frame, m, K, k) for m in params.score.methods}
    chosen = every[method]
    scores = layer_scores(frame, method)
    layers = {}
    for layer, order in chosen.items():
        layers[str(layer)] = {"experts": sorted(order), "order": order,
                              "scores": [round(float(scores[layer][e]), 8) for e in order],
                              "routed_mass_kept": round(routed_mass_kept(stats[layer], order), 6)}
    with atomic_dir(OUT) as out:
        write_json(out / "selection.json", {"method": method, "experts_per_layer": K, "top_k": k, "num_experts": E,
                                            "pure_pruning": K == k, "layers": layers})
    coverage = {m: [routed_mass_kept(stats[layer], sel[layer]) for layer in sorted(sel)] for m, sel in every.items()}
    write_json(METRICS, {"method": method, "experts_per_layer": K, "top_k": k, "num_experts": E,
                         "routed_mass_kept_mean": round(sum(coverage[method]) / len(coverage[method]), 6),
                         "routed_mass_kept_by_method": {m: round(sum(v) / len(v), 6) for m, v in coverage.items()}})
    with atomic_file("plots/selection_coverage.csv") as fh:
        fh.write("layer," + ",".join(every) + "\n")
        for i, layer in enumerate(sorted(chosen)):
            fh.write(f"{layer}," + ",".join(f"{coverage[m][i]:.6f}" for m in every) + "\n")
    plot_selection_heatmap(every, E, "plots/selection_heatmap.png")
    logging.info("kept %d of %d experts per layer by %s; routed mass kept %.3f", K, E, method,
                 sum(coverage[method]) / len(coverage[method]))


if __name__ == "__main__":
    run("select", main)
