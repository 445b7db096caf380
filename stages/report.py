"""Stage `report`: merge eval/<model>.json into metrics/eval.json, write the DVC plot tables, the evaluation bar
chart and reports/summary.md (models, results, distillation, selection, params, figures)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stages._runner import run
from moe2dense.io import atomic_file, read_json, write_json
from moe2dense.params import EVAL_MODELS, load_params
from moe2dense.report import eval_bars_png, merge_eval, plot_rows, render_summary

EVAL = "eval/{model}.json"
METRICS_IN = {stage: f"metrics/{stage}.json" for stage in ("select", "group", "assemble", "distill")}
STAGE_FIGURES = ("plots/score_distributions.png", "plots/usage_by_domain.png", "plots/selection_heatmap.png")
METRICS = "metrics/eval.json"
ACCURACY_CSV = "plots/eval_accuracy.csv"
BPB_CSV = "plots/eval_bits_per_byte.csv"
FIGURE = "reports/eval.png"
SUMMARY = "reports/summary.md"


def main() -> None:
    per_model = {}
    for model in EVAL_MODELS:
        path = Path(EVAL.format(model=model))
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `dvc repro evaluate` (or `dvc repro evaluate@{model}`) "
                                    "first")
        per_model[model] = read_json(path)
    params = load_params().model_dump(mode="json")  # validated, defaults filled in: what actually ran
    metrics = {stage: read_json(p) for stage, p in METRICS_IN.items() if Path(p).is_file()}
    results = merge_eval(per_model)

    write_json(METRICS, results)
    for df, path in zip(plot_rows(results), (ACCURACY_CSV, BPB_CSV)):
        with atomic_file(path) as fh:
            df.write_csv(fh)
    with atomic_file(FIGURE, "wb") as fh:
        eval_bars_png(results, fh)
    # Image links relative to the summary, so they resolve wherever the repo is checked out or rendered.
    figures = [os.path.relpath(p, Path(SUMMARY).parent) for p in (FIGURE, *STAGE_FIGURES) if Path(p).is_file()]
    with atomic_file(SUMMARY) as fh:
        fh.write(render_summary(results, metrics=metrics, params=params, figures=figures))
    logging.info("%s, %s, %s, %s, %s", METRICS, ACCURACY_CSV, BPB_CSV, FIGURE, SUMMARY)


if __name__ == "__main__":
    run("report", main)
