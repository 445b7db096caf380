"""Stage `screen`: the design space (scoring x grouping x scaling x K from params `screen`) assembled from the shared
calibration and scored by held-out perplexity, each configuration cached by content in .screen_cache/ ->
screen/results.parquet, screen/results.md, metrics/screen.json, plots/screen_perplexity_vs_k.png (byte-identical for
the same inputs); the seconds of the configurations computed now go to the untracked timings/screen.json."""

from __future__ import annotations

import logging
from pathlib import Path

from stages._runner import run
from moe2dense.arch import get_adapter
from moe2dense.io import atomic_dir, atomic_file, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.screen import (check_experts, configurations, default_experts, inputs_digest, load_inputs,
                              plot_perplexity_vs_k, results_markdown, results_table, run_screen, timings)
from moe2dense.teacher.load import teacher_config

CACHE = ".screen_cache"  # one JSON per configuration, keyed by content; never DVC-tracked
OUT = "screen"
METRICS = "metrics/screen.json"
PLOT = "plots/screen_perplexity_vs_k.png"


def main() -> None:
    params = load_params()
    p = params.screen
    adapter = get_adapter(teacher_config())
    k, E = adapter.top_k, adapter.num_experts
    experts = p.experts or default_experts(k, E)
    check_experts(experts, k, E)  # before any heavy work
    grid = configurations(p.methods, p.groupings, p.scalings, experts, k)
    logging.info("%d configurations: %d scoring x %d grouping x %d scaling x K in %s (K == k = %d counted once per "
                 "scoring x scaling)", len(grid), len(p.methods), len(p.groupings), len(p.scalings), experts, k)
    inp = load_inputs(".", eval_tokens=p.eval_tokens, batch_rows=p.batch_size, methods=p.methods,
                      score_params=params.score)
    results, computed = run_screen(grid, inp, Path(CACHE), inputs_digest(".", inp))
    table = results_table(results)
    with atomic_dir(OUT) as out:
        table.write_parquet(out / "results.parquet")
        (out / "results.md").write_text(results_markdown(table, p.best))
    with atomic_file(PLOT, "wb") as fh:
        plot_perplexity_vs_k(table, fh)
    best = table.row(0, named=True)
    # outputs depend on the inputs only, not on what the cache already held: "computed now" is logged, not written
    write_json(METRICS, {"configurations": table.height, "best_config": best["config"],
                         "best_perplexity": best["perplexity"], "experts": experts})
    write_timings("screen", timings(results, computed))
    logging.info("best of %d: %s (perplexity %.3f); %d computed now -> %s/results.md", table.height,
                 best["config"], best["perplexity"], len(computed), OUT)


if __name__ == "__main__":
    run("screen", main)
