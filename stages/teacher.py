"""Stage `teacher`: train the demo Qwen3-MoE teacher (teacher.source: demo) or validate and record a real one.
Stage `dense_teacher` (`python -m stages.teacher dense`): the same for the d2d baseline's dense teacher
(baselines.dense_teacher.source), the demo one trained with the MoE teacher's recipe, data and seed."""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from stages._runner import run
from moe2dense.io import atomic_dir, atomic_file, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.teacher.build import build_demo_teacher, dense_shape, moe_shape, record_real_teacher

DATA = Path("data/prepared")


@dataclass(frozen=True)
class Kind:
    out: str
    metrics: str
    loss_plot: str
    timings: str
    dense: bool


KINDS = {
    "moe": Kind("models/teacher", "metrics/teacher.json", "plots/teacher_loss.csv", "teacher", dense=False),
    "dense": Kind("models/dense_teacher", "metrics/baselines/dense_teacher.json",
                  "plots/baselines/dense_teacher_loss.csv", "dense_teacher", dense=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.teacher")
    parser.add_argument("kind", nargs="?", default="moe", choices=KINDS,
                        help="moe: the teacher (default); dense: the d2d baseline's dense teacher")
    kind = KINDS[parser.parse_args().kind]
    params = load_params()
    t = params.teacher
    source = params.baselines.dense_teacher.source if kind.dense else t.source
    with atomic_dir(kind.out) as out:
        if source == "demo":
            metrics, loss_rows, timings = build_demo_teacher(t, DATA, out, dense=kind.dense)
        else:
            shape = dense_shape if kind.dense else moe_shape
            metrics, loss_rows, timings = record_real_teacher(source, out, shape), [], {}
    write_json(kind.metrics, metrics)
    if timings:  # speeds vary run to run: kept out of the DVC-tracked metrics
        write_timings(kind.timings, timings)
    with atomic_file(kind.loss_plot) as fh:  # empty (header only) for a real teacher: nothing was trained
        writer = csv.DictWriter(fh, fieldnames=["step", "tokens", "loss", "aux_loss", "lr"])
        writer.writeheader()
        writer.writerows(loss_rows)
    if metrics.get("trained"):
        logging.info("perplexity %.2f (unigram %.2f, ratio %.3f); %s parameters; %.0f train tokens/s",
                     metrics["perplexity"], metrics["unigram_perplexity"], metrics["perplexity_vs_unigram"],
                     f"{metrics['parameters']:,}", timings["train_tokens_per_s"])


if __name__ == "__main__":
    run("teacher", main)
