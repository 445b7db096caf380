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

from flows.cli import FlowError, check_server, run

REPO = Path(__file__).resolve().parents[1]
MAIN_TARGET = "report"  # the conversion job; the design-space screen is its own target (flows/screen.py)
_RAN = re.compile(r"Running stage '([^']+)'")
_EXITED = re.compile(r"exited with (-?\d+)")
_STAGE_ERROR = re.compile(r"^\[[^\]]+\] error: ")


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


def check_before_run(repo: str | Path, stage: str | None) -> Path:
    """What a flow run can be refused for, checked in seconds before Prefect or DVC starts any work: the Prefect
    server named by PREFECT_API_URL, the repository and the target stage, params.yaml (every problem, as the
    pipeline's `check` stage reports them). Raises FlowError."""
    from dvc.exceptions import DvcException
    from prefect.settings import PREFECT_API_URL

    from moe2dense.checks import preflight
    from moe2dense.params import ParamsError, load_params

    check_server(PREFECT_API_URL.value())
    root = Path(repo).resolve()
    try:
        stage_order(root, stage)
        preflight(load_params(root / "params.yaml"), root)
    except (ValueError, ParamsError) as err:
        raise FlowError(str(err)) from None
    except DvcException as err:
        raise FlowError(f"{root}: {err}") from None
    return root


def run_logged(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run `cmd`; relay its output lines (not progress-bar redraws) to the run log."""
    logger = get_run_logger()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "\r" not in line:
            logger.info("%s", line)
    return proc


class StageFailed(FlowError):
    """A DVC stage that failed, with the stage's own error message. `status`: the stage command's exit status
    (DVC's when the command never ran); 2 is the stage's verdict on its input (stages/_runner.py): not retried."""

    def __init__(self, stage: str, status: int, detail: str):
        self.stage, self.status, self.detail = stage, status, detail
        self.code = 2 if status == 2 else 1
        super().__init__(f"stage {stage!r} failed (exit {status}): {detail}")

    def __reduce__(self):  # Prefect pickles task exceptions: rebuild from the fields
        return StageFailed, (self.stage, self.status, self.detail)

    @classmethod
    def from_dvc(cls, stage: str, proc: subprocess.CompletedProcess) -> "StageFailed":
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip() and "\r" not in line]
        dvc_errors = [line for line in lines if line.startswith("ERROR:")]
        exited = _EXITED.search(" ".join(dvc_errors))
        own = [line for line in lines if _STAGE_ERROR.match(line)]  # stages/_runner.py's one line
        rest = [line for line in lines if not line.startswith("ERROR:")]
        status = int(exited.group(1)) if exited else proc.returncode
        # the stage's own error line(s); exit 2 without one: all it said; a crash: its last line (the exception);
        # no stage output: DVC's error
        said = rest if status == 2 else rest[-1:]
        detail = ("; ".join(own or (said if exited else [])) or "; ".join(dvc_errors)
                  or (proc.stdout.strip().splitlines() or ["no output"])[-1])
        return cls(stage, status, detail)


def _retry_unless_user_error(task, task_run, state) -> bool:
    return not (isinstance(state.data, StageFailed) and state.data.status == 2)


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_user_error, task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo: str, force: bool = False) -> dict:
    """`dvc repro --single-item <stage>`: upstream stages already ran as earlier tasks of this flow. A failure
    raises StageFailed; it is retried once unless the stage rejected its input (exit 2)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    start = time.perf_counter()
    proc = run_logged(cmd, repo)
    if proc.returncode != 0:
        raise StageFailed.from_dvc(stage, proc)
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

    def go() -> None:
        check_before_run(args.repo, args.stage)
        for r in pipeline(repo=args.repo, stage=args.stage, force=args.force):
            print(f"{r['stage']:>12}: {r['status']} ({r['seconds']} s)")

    return run(go)


if __name__ == "__main__":
    sys.exit(main())
