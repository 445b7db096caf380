"""Stage `score`: every enabled scoring method, and the score each one's groups merge by, for every MoE layer ->
scores/scores.parquet (computed once here; select and group read it), plus the score distribution and per-domain
expert usage plots."""

from __future__ import annotations

import logging

import polars as pl

from stages._runner import run
from moe2dense.calibrate.store import read_stats, usage_by_domain
from moe2dense.io import atomic_dir
from moe2dense.params import load_params
from moe2dense.plots import plot_score_distributions, plot_usage_by_domain
from moe2dense.selection import score_frame, score_options

CALIBRATION = "calibration"
OUT = "scores"  # scores.parquet: layer, expert, method, score


def main() -> None:
    params = load_params()
    s = params.score
    stats = read_stats(CALIBRATION)
    frame = score_frame(stats, s.methods, score_options(s))
    with atomic_dir(OUT) as out:
        frame.write_parquet(out / "scores.parquet", compression="zstd")
    plot_score_distributions(frame.filter(pl.col("method").is_in(s.methods)), "plots/score_distributions.png")
    plot_usage_by_domain(usage_by_domain(CALIBRATION), "plots/usage_by_domain.png")
    logging.info("scored %d layers x %d experts with %s", len(stats), next(iter(stats.values())).num_experts,
                 ", ".join(s.methods))


if __name__ == "__main__":
    run("score", main)
