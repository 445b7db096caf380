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
import tempfile
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
from flows.dvc_stage import stage_order
from moe2dense.env import stage_env
from moe2dense.markdown import table

REPO = Path(__file__).resolve().parents[1]
MAIN_TARGET = "report"  # the conversion job; the design-space screen is its own target (flows/screen.py)
_STAGE_ERROR = re.compile(r"^\[[^\]]+\] error: ")  # stages/_runner.py's one line for a user's mistake


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


def _lines(text: str, strip: bool = True) -> list[str]:
    """Output lines, without blank ones and progress-bar redraws."""
    return [line.strip() if strip else line for line in text.splitlines() if line.strip() and "\r" not in line]


class StageFailed(FlowError):
    """A DVC stage that failed, with the stage's own error message. `status`: the stage command's exit status (None
    when DVC failed without running it); 2 is the stage's verdict on its input (stages/_runner.py): not retried."""

    def __init__(self, stage: str, status: int | None, detail: str):
        self.stage, self.status, self.detail = stage, status, detail
        self.code = 2 if status == 2 else 1
        super().__init__(f"stage {stage!r} failed" + ("" if status is None else f" (exit {status})") + f": {detail}")

    def __reduce__(self):  # Prefect pickles task exceptions: rebuild from the fields
        return StageFailed, (self.stage, self.status, self.detail)

    @classmethod
    def from_child(cls, stage: str, proc: subprocess.CompletedProcess, result: dict | None) -> "StageFailed":
        """From flows/dvc_stage.py's result and the stage command's stderr (the child's: DVC logs to its stdout)."""
        said = _lines(proc.stderr)
        if result is None:  # the child itself died: its exit status and last words
            return cls(stage, proc.returncode, (said or _lines(proc.stdout) or ["no output"])[-1])
        status = result["status"]
        own = [line for line in said if _STAGE_ERROR.match(line)]  # stages/_runner.py's one line
        # the stage's own error line(s); exit 2 without one: all it said; a crash: its last line (the exception);
        # no stage output, or no command that failed: DVC's error
        said = said if status == 2 else said[-1:]
        return cls(stage, status, "; ".join(own or (said if status is not None else [])) or result["error"])


def _retry_unless_user_error(task, task_run, state) -> bool:
    return not (isinstance(state.data, StageFailed) and state.data.status == 2)


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_user_error, task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo: str, force: bool = False) -> dict:
    """`dvc repro --single-item <stage>` through DVC's API (flows/dvc_stage.py, in a child process whose output goes
    to the run log): upstream stages already ran as earlier tasks of this flow. `status`: `ran` when DVC reproduced
    the stage (ran its command, or restored its outputs from DVC's run cache), `skipped` when it was up to date. A
    failure raises StageFailed; it is retried once unless the stage rejected its input (exit 2)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "flows.dvc_stage", repo, stage] + (["--force"] if force else [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe2dense-stage-") as tmp:
        out = Path(tmp) / "result.json"
        # the stage commands run with this interpreter first on PATH, however the flow was started
        proc = subprocess.run(cmd + [str(out)], cwd=repo, env=stage_env(), capture_output=True, text=True)
        result = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None
    for line in _lines(proc.stdout, strip=False) + _lines(proc.stderr, strip=False):
        logger.info("%s", line)
    if result is None or "error" in result:
        raise StageFailed.from_child(stage, proc, result)
    seconds = round(time.perf_counter() - start, 2)
    status = "ran" if stage in result["ran"] else "skipped"
    logger.info("stage %s %s in %.1fs", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds}


def headline_metrics(repo: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((repo / "metrics").glob("*.json")):
        data = json.loads(path.read_text())
        out[path.stem] = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
    return out


def render_markdown(results: list[dict], metrics: dict[str, dict]) -> str:
    lines = ["# moe2dense pipeline run", "",
             *table(["stage", "status", "seconds"], ([r["stage"], r["status"], r["seconds"]] for r in results))]
    for name, values in metrics.items():
        lines += ["", f"## metrics/{name}.json", "", *table(["metric", "value"], sorted(values.items()))]
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
