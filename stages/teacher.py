"""Stage `teacher`: train the demo Qwen3-MoE teacher (teacher.source: demo) or validate and record a real one."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from stages._runner import run
from moe2dense.io import atomic_dir, atomic_file, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.teacher.build import build_demo_teacher, record_real_teacher

DATA = Path("data/prepared")
OUT = "models/teacher"
METRICS = "metrics/teacher.json"
LOSS_PLOT = "plots/teacher_loss.csv"


def main() -> None:
    params = load_params()
    t = params.teacher
    with atomic_dir(OUT) as out:
        if t.source == "demo":
            metrics, loss_rows, timings = build_demo_teacher(t, DATA, out)
        else:
            metrics, loss_rows, timings = record_real_teacher(t.source, out), [], {}
    write_json(METRICS, metrics)
    if timings:  # speeds vary run to run: kept out of the DVC-tracked metrics
        write_timings("teacher", timings)
    with atomic_file(LOSS_PLOT) as fh:  # empty (header only) for a real teacher: nothing was trained
        writer = csv.DictWriter(fh, fieldnames=["step", "tokens", "loss", "aux_loss", "lr"])
        writer.writeheader()
        writer.writerows(loss_rows)
    if metrics.get("trained"):
        logging.info("perplexity %.2f (unigram %.2f, ratio %.3f); max expert token share per layer %s; %.0f train "
                     "tokens/s", metrics["perplexity"], metrics["unigram_perplexity"],
                     metrics["perplexity_vs_unigram"], metrics["max_token_share"], timings["train_tokens_per_s"])


if __name__ == "__main__":
    run("teacher", main)
