"""The design-space screen's three budgets on the demo teacher (run `dvc repro score` or `make demo` first).

    python bench/screen_bench.py                          # fresh cache in a temp dir
    python bench/screen_bench.py --cache-dir .screen_cache   # leaves the results for `dvc repro screen`

1. Full screen: the grid of params `screen` (default: 7 scoring x 5 grouping x 2 scaling x K = k, 2k, ... E, K == k
   once per scoring x scaling) from an empty cache, timed from the first configuration to the last (calibration and
   loading the shared inputs excluded, shown apart). Budget: <= 20 minutes.
2. Adding one K value (`--add-k`, default the first multiple of k not in the grid, e.g. 12 on the demo): the same
   call with the grown grid over the warm cache must compute only the new K's configurations. Budget: its wall time
   <= (1 / number of K values + 0.1) x the full screen's (number of K values of the full screen).
3. Overhead: per configuration, the time outside assemble + evaluate (selection, planning, result bookkeeping) over
   the configuration's time. Budget: <= 20% (reported for the whole screen and for the worst configuration).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe2dense.arch import get_adapter  # noqa: E402
from moe2dense.params import load_params  # noqa: E402
from moe2dense.screen import (check_experts, configurations, default_experts, inputs_digest,  # noqa: E402
                              load_inputs, run_screen)
from moe2dense.teacher.load import teacher_config  # noqa: E402

FULL_BUDGET_S = 20 * 60
OVERHEAD_BUDGET = 0.20


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


def timed_screen(grid, inp, cache: Path, digest: str):
    start = time.perf_counter()
    results, computed = run_screen(grid, inp, cache, digest)
    return results, computed, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="per-configuration cache (default: a fresh temp dir); must be empty")
    parser.add_argument("--add-k", type=int, help="the K value added in step 2 (default: first multiple of k unused)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    params = load_params(ROOT / "params.yaml")
    p = params.screen
    adapter = get_adapter(teacher_config(ROOT / "models/teacher"))
    k, E = adapter.top_k, adapter.num_experts
    experts = p.experts or default_experts(k, E)
    add_k = args.add_k or next(K for K in range(k, E + 1, k) if K not in experts)
    check_experts(experts + [add_k], k, E)
    grid = configurations(p.methods, p.groupings, p.scalings, experts, k)
    grown = configurations(p.methods, p.groupings, p.scalings, sorted(experts + [add_k]), k)

    t0 = time.perf_counter()
    inp = load_inputs(ROOT, eval_tokens=p.eval_tokens, batch_rows=p.batch_size, methods=p.methods,
                      score_params=params.score)
    digest = inputs_digest(ROOT, inp)
    t_inputs = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="screen-bench-") as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        if cache.is_dir() and any(cache.iterdir()):
            parser.error(f"--cache-dir {cache} is not empty: the full screen must start cold")
        results, computed, t_full = timed_screen(grid, inp, cache, digest)
        assert len(computed) == len(grid), "the full screen must compute every configuration"
        _, added, t_add = timed_screen(grown, inp, cache, digest)
        assert sorted(added) == sorted(c.name for c in grown if c.experts == add_k), "only the new K may run"

    asm = sum(r["seconds"]["assemble"] for r in results)
    ev = sum(r["seconds"]["evaluate"] for r in results)
    sel = sum(r["seconds"]["select_plan"] for r in results)
    overhead = (t_full - asm - ev) / t_full
    worst = max(results, key=lambda r: 1 - (r["seconds"]["assemble"] + r["seconds"]["evaluate"])
                / r["seconds"]["total"])
    worst_share = 1 - (worst["seconds"]["assemble"] + worst["seconds"]["evaluate"]) / worst["seconds"]["total"]
    add_budget = 1 / len(experts) + 0.1

    print(f"demo teacher: k={k}, E={E}; grid {len(grid)} configurations ({len(p.methods)} scoring x "
          f"{len(p.groupings)} grouping x {len(p.scalings)} scaling x K in {experts}, K == k once); "
          f"{inp.rows.size} held-out tokens per configuration")
    print(f"shared inputs loaded in {t_inputs:.1f} s (excluded)")
    print(f"1. full screen: {t_full:.1f} s = {t_full / 60:.2f} min for {len(grid)} configurations "
          f"({t_full / len(grid):.2f} s each); budget {FULL_BUDGET_S / 60:.0f} min: {verdict(t_full <= FULL_BUDGET_S)}")
    print(f"2. adding K={add_k}: {len(added)} new configurations in {t_add:.1f} s, {t_add / t_full:.3f}x the full "
          f"screen; budget 1/{len(experts)} + 0.1 = {add_budget:.3f}x: {verdict(t_add / t_full <= add_budget)} "
          f"(the new K's share of the grown grid's configurations: {len(added) / len(grown):.3f})")
    print(f"3. overhead outside assemble + evaluate: {overhead:.1%} of the full screen (select + plan {sel:.1f} s, "
          f"assemble {asm:.1f} s, evaluate incl. load {ev:.1f} s, rest {t_full - asm - ev - sel:.1f} s); worst "
          f"configuration {worst['config']} {worst_share:.1%} of its {worst['seconds']['total']:.2f} s; budget "
          f"{OVERHEAD_BUDGET:.0%}: {verdict(overhead <= OVERHEAD_BUDGET and worst_share <= OVERHEAD_BUDGET)}")
    by_group: dict[str, list[float]] = {}
    for r in results:
        by_group.setdefault(r["grouping"], []).append(r["seconds"]["select_plan"])
    print("   select + plan per grouping (mean s): " + ", ".join(
        f"{g} {sum(v) / len(v):.3f}" for g, v in sorted(by_group.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
