"""Stage `baselines`: the paper's comparison at matched parameters -> metrics/baselines.json, reports/baselines.md
("Baselines at matched parameters": M2D first, before and after distillation, the cost ratio) and
plots/baselines_curves.png (the four distillation curves). `make baselines` runs it with everything upstream."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from stages._runner import run
from moe2dense.baselines.report import M2D, collect, curves_png, render
from moe2dense.baselines.runs import DENSE_TEACHER, RUNS, eval_name
from moe2dense.io import TIMINGS_DIR, atomic_file, read_json, write_json

METRICS = "metrics/baselines.json"
REPORT = "reports/baselines.md"
FIGURE = "plots/baselines_curves.png"
M2D_FILES = {"distill": "metrics/distill.json", "timings": "distill", "before": "eval/student.json",
             "after": "eval/distilled.json", "curve": "plots/distill_loss.csv"}
TEACHERS = {"moe": ("metrics/teacher.json", "eval/teacher.json"),
            "dense": ("metrics/baselines/dense_teacher.json", f"eval/baselines/{eval_name(DENSE_TEACHER)}.json")}


def _required(path: str, stage: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro {stage}` (or `make baselines`) first")
    return read_json(path)


def _timings(name: str) -> dict:
    """Wall clock and speeds of a distillation run (untracked; absent after a `dvc pull`: shown as —)."""
    path = TIMINGS_DIR / f"{name}.json"
    return read_json(path) if path.is_file() else {}


def _curve(path: str) -> list[tuple[int, float]]:
    with open(path) as fh:
        return [(int(r["tokens"]), float(r["loss"])) for r in csv.DictReader(fh)]


def main() -> None:
    files = {M2D: M2D_FILES} | {
        name: {"distill": r.metrics, "timings": r.timings, "before": f"eval/baselines/{eval_name(r.initial)}.json",
               "after": f"eval/baselines/{eval_name(r.distilled)}.json", "curve": r.loss_plot}
        for name, r in RUNS.items()}
    runs = {row: {"distill": _required(f["distill"], "distill_baseline"), "timings": _timings(f["timings"]),
                  "before": _required(f["before"], "evaluate_baseline"),
                  "after": _required(f["after"], "evaluate_baseline")} for row, f in files.items()}
    teachers = {name: {"metrics": _required(m, "dense_teacher"), "eval": _required(e, "evaluate_baseline")}
                for name, (m, e) in TEACHERS.items()}
    result = collect(runs, teachers)
    write_json(METRICS, result)
    with atomic_file(REPORT) as fh:
        fh.write(render(result))
    with atomic_file(FIGURE, "wb") as fh:
        curves_png({row: _curve(f["curve"]) for row, f in files.items()}, fh)
    logging.info("%s, %s, %s", METRICS, REPORT, FIGURE)
    for row in (r for r in result if r in files):
        logging.info("%-11s %s parameters, held-out KL %.4f -> %.4f", row, f"{result[row]['parameters']:,}",
                     result[row]["heldout_kl_before"], result[row]["heldout_kl_after"])


if __name__ == "__main__":
    run("baselines", main)
