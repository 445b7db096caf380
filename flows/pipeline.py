"""Prefect flow that runs the DVC pipeline stage by stage.

DVC owns caching (content hashes of deps, params and outs); Prefect owns orchestration: one task per stage in DAG
order, retries, logs, and a markdown artifact with what ran and the metrics. Prefect's own result cache is off
(NO_CACHE): it would hash a Path by its string, not its contents.

    python -m flows.pipeline                 # up to `report`; temporary Prefect server unless PREFECT_API_URL is set
    python -m flows.pipeline --stage teacher # up to and including one stage
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

REPO = Path(__file__).resolve().parents[1]
MAIN_TARGET = "report"  # the conversion job; the design-space screen is its own target (flows/screen.py)
_RAN = re.compile(r"Running stage '([^']+)'")


def stage_order(repo: Path, target: str | None = None) -> list[str]:
    """Stages in dependency order (upstream first), optionally only those `target` needs."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        order = [s.name for s in reversed(list(nx.topological_sort(graph)))]
        if target is None:
            return order
        by_name = {s.name: s for s in graph.nodes}
        if target not in by_name:
            raise ValueError(f"unknown stage {target!r}; stages in dvc.yaml: {', '.join(order)}")
        needed = {target} | {s.name for s in nx.descendants(graph, by_name[target])}
        return [s for s in order if s in needed]


def run_logged(cmd: list[str], cwd: str, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`, relay its output lines (not progress-bar redraws) to the run log; a failure raises with the
    last lines of its output."""
    logger = get_run_logger()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "\r" not in line:
            logger.info("%s", line)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo: str, force: bool = False) -> dict:
    """`dvc repro --single-item <stage>`: upstream stages already ran as earlier tasks of this flow."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    start = time.perf_counter()
    proc = run_logged(cmd, repo, f"stage {stage!r}")
    seconds = round(time.perf_counter() - start, 2)
    status = "ran" if stage in _RAN.findall(proc.stdout) else "skipped"
    logger.info("stage %s %s in %.1fs", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds}


def headline_metrics(repo: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((repo / "metrics").glob("*.json")):
        data = json.loads(path.read_text())
        out[path.stem] = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
    return out


def render_markdown(results: list[dict], metrics: dict[str, dict]) -> str:
    lines = ["# moe2dense pipeline run", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    for name, values in metrics.items():
        lines += ["", f"## metrics/{name}.json", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(values.items())]
    return "\n".join(lines) + "\n"


@flow(name="moe2dense-pipeline", log_prints=True)
def pipeline(repo: str = str(REPO), stage: str | None = MAIN_TARGET, force: bool = False) -> list[dict]:
    """Run the DVC stages up to `stage` (None: every stage, the screen included) in DAG order as Prefect tasks;
    publish a progress artifact (updated after each stage) and a markdown summary artifact."""
    root = Path(repo).resolve()
    stages = stage_order(root, stage)
    progress = create_progress_artifact(0.0, key="moe2dense-pipeline-progress",
                                        description=f"Share of the {len(stages)} DVC stages done")
    results = []
    for i, s in enumerate(stages, 1):
        results.append(run_stage(s, str(root), force))
        update_progress_artifact(progress, 100.0 * i / len(stages))
    create_markdown_artifact(key="moe2dense-pipeline", markdown=render_markdown(results, headline_metrics(root)),
                             description="Stages run or skipped by DVC, and the headline metrics")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the moe2dense DVC pipeline as a Prefect flow")
    parser.add_argument("--repo", default=str(REPO), help="repository root holding dvc.yaml (default: this repo)")
    parser.add_argument("--stage", default=MAIN_TARGET, help=f"run only up to this stage (default {MAIN_TARGET})")
    parser.add_argument("--all", action="store_const", const=None, dest="stage", help="every stage, screen included")
    parser.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    args = parser.parse_args(argv)
    results = pipeline(repo=args.repo, stage=args.stage, force=args.force)
    for r in results:
        print(f"{r['stage']:>12}: {r['status']} ({r['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
