"""Prefect flow for a sweep of DVC experiments: check the configurations and the workspace, queue them in DVC's
experiment queue (`dvc exp run --queue`, through DVC's API), run the queue with at most `jobs` experiments at a time
(each in its own temporary copy of the repo), and publish `dvc exp show` as a comparison table (params + metrics): a
Prefect table artifact and reports/experiments.md.

    python -m flows.sweep --from-screen 3 --jobs 2                     # the screen's 3 best configurations
    python -m flows.sweep --set select.experts=8,16 --set group.method=output,coactivation   # a 2 x 2 grid
    python -m flows.sweep --configs sweep.yaml                          # a YAML list of {dotted.key: value}

Experiments already on the baseline (same name) are not queued again, so an interrupted sweep is resumed by running
the same command.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.cli import progress_bar, run
from flows.pipeline import REPO, check_before_run
from moe2dense import sweep as sw
from moe2dense.params import read_yaml

REPORT = "reports/experiments.md"
#: A tqdm bar short of 100 % (`distill:  42%|████▏     | 84k/199k ...`): the sweep's own bar tracks the experiments.
PROGRESS_REDRAW = re.compile(r"^[^|]*?\s\d{1,2}%\|")
BASELINE_NOTE = ("this workspace held the results of your own pipeline run (dvc.lock, metrics/, plots/); they are now "
                 "committed on the new branch {branch}, the sweep's baseline (`git switch -` returns to your branch)")


def configurations(repo: Path, grid: dict[str, list] | None, configs: list[dict] | None,
                   from_screen: int | None) -> list[dict]:
    out = list(configs or [])
    if grid:
        out += sw.grid(grid)
    if from_screen:
        out += sw.from_screen(repo / "screen/results.parquet", from_screen)
    return out


@task(name="check-sweep", cache_policy=NO_CACHE)
def check(repo: str, exps: list[sw.Experiment]) -> None:
    sw.validate(repo, exps)  # bad configurations first: they need no clean workspace to be reported
    if branch := sw.record_baseline(repo):
        get_run_logger().info(BASELINE_NOTE.format(branch=branch))


@task(name="queue-experiments", cache_policy=NO_CACHE)
def queue(repo: str, exps: list[sw.Experiment], target: str) -> list[str]:
    to_run = sw.queue(repo, exps, target)
    get_run_logger().info("%d of %d experiments to run: %s", len(to_run), len(exps), ", ".join(to_run) or "none")
    return to_run


@task(name="run-queue", cache_policy=NO_CACHE)
def run_queue(repo: str, jobs: int, names: list[str], progress_id) -> None:
    """The queue, with one progress bar in the terminal (experiments done / total) and the progress artifact
    moving from 20 to 90 % as experiments finish; DVC's output goes to the run log."""
    logger = get_run_logger()

    with progress_bar(len(names), "sweep", "experiment") as bar:
        def done(n: int) -> None:
            bar.update(n - bar.n)
            logger.info("%d of %d experiments done", n, len(names))
            update_progress_artifact(progress_id, 20.0 + 70.0 * n / len(names))

        def relay(line: str) -> None:  # a progress bar's redraws (two thirds of the lines) stay out of the log
            if not PROGRESS_REDRAW.match(line):
                logger.info("%s", line)

        sw.run_queue(repo, jobs, on_line=relay, names=names, on_done=done)


@task(name="collect-experiments", cache_policy=NO_CACHE)
def collect(repo: str, exps: list[sw.Experiment]) -> list[dict]:
    keys = list(dict.fromkeys(k for e in exps for k in e.overrides))
    return sw.table(sw.sweep_rows(repo, [e.name for e in exps]), keys)


@flow(name="moe2dense-sweep", log_prints=True)
def sweep(repo: str = str(REPO), grid: dict[str, list] | None = None, configs: list[dict] | None = None,
          from_screen: int | None = None, jobs: int = 1, target: str = sw.TARGET) -> list[dict]:
    """Run the configurations as DVC experiments; returns the comparison table (baseline first)."""
    root = Path(repo).resolve()
    exps = sw.experiments(configurations(root, grid, configs, from_screen))
    progress = create_progress_artifact(0.0, key="moe2dense-sweep-progress",
                                        description=f"Sweep of {len(exps)} experiments: checked, queued, ran, collected")
    with sw.sweep_lock(root):
        check(str(root), exps)
        update_progress_artifact(progress, 10.0)
        to_run = queue(str(root), exps, target)
        update_progress_artifact(progress, 20.0)
        if to_run:
            run_queue(str(root), jobs, to_run, progress)
        update_progress_artifact(progress, 90.0)
        records = collect(str(root), exps)
    md = sw.markdown(records, f"Sweep: {len(exps)} experiments ({len(to_run)} run now) on {records[0]['name']}",
                     note="First row: the baseline commit. Params shown: those swept and any that differ; metrics: "
                          "the headline ones (`dvc exp show` has them all).")
    out = root / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    create_table_artifact(key="moe2dense-sweep", table=records,
                          description=f"dvc exp show: {len(exps)} experiments of the sweep and their baseline")
    create_markdown_artifact(key="moe2dense-sweep-report", markdown=md, description="The sweep's comparison table")
    update_progress_artifact(progress, 100.0)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sweep of moe2dense configurations as DVC experiments")
    parser.add_argument("--repo", default=str(REPO), help="repository root holding dvc.yaml (default: this repo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="a grid axis (repeat for more axes; the grid is their product)")
    parser.add_argument("--configs", type=Path, help="YAML file: a list of {dotted.param: value} mappings")
    parser.add_argument("--from-screen", type=int, metavar="N", help="the N best configurations of the screen")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="experiments run at a time (default 1)")
    parser.add_argument("--target", default=sw.TARGET, help=f"stage each experiment runs up to (default {sw.TARGET})")
    args = parser.parse_args(argv)

    def go() -> None:
        grid = sw.parse_axes(args.set) if args.set else None
        configs = read_configs(args.configs) if args.configs else None
        # checked here too, so a bad grid or a dirty workspace fails in a second, before Prefect starts
        repo = check_before_run(args.repo, args.target)
        sw.validate(repo, sw.experiments(configurations(repo, grid, configs, args.from_screen)))
        if branch := sw.record_baseline(repo):
            print(f"[sweep] {BASELINE_NOTE.format(branch=branch)}", flush=True)
        records = sweep(repo=str(repo), grid=grid, configs=configs, from_screen=args.from_screen, jobs=args.jobs,
                        target=args.target)
        print(sw.markdown(records, "Sweep results"))

    return run(go, user_errors=(sw.SweepError, OSError))


def read_configs(path: Path) -> list[dict]:
    """The --configs file: a YAML list of {dotted.param: value} mappings; anything else is a one-line error."""
    try:
        configs = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise sw.SweepError(f"{path}: not valid YAML{where}: {problem}") from None
    if not (isinstance(configs, list) and all(isinstance(c, dict) for c in configs)):
        raise sw.SweepError(f"{path}: expected a YAML list of mappings {{dotted.param: value}}")
    return configs


if __name__ == "__main__":
    sys.exit(main())
