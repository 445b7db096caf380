"""DVC's Python API for the pipeline flow: the order `dvc repro` runs stages in, and one stage reproduced.

    python -m flows.dvc_stage REPO STAGE RESULT [--force]

reproduces one stage with `Repo.reproduce` and writes to RESULT (JSON) the stages DVC returned as reproduced, or
DVC's error. The flow (flows/pipeline.py `run_stage`) runs it as a child process: DVC starts a stage's command with
the calling process's own stdout and stderr (dvc/stage/run.py), so only a child's pipes let the flow relay the stage's
output to the run log and quote a failing stage's own error; and DVC's repo lock and caches end with the child,
however it ends. Imports neither Prefect nor torch (it starts once per stage).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

# the one place a stage command's exit status is kept: StageCmdFailedError's message (dvc/stage/exceptions.py)
_EXITED = re.compile(r", exited with (-?\d+)$")


def _target(root: str, stage: str | None) -> str:
    # absolute: DVC resolves a bare stage name or "dvc.yaml" against the process's cwd, not the repo's root
    return str(Path(root) / "dvc.yaml") + (f":{stage}" if stage else "")


def stage_order(repo: str | Path, target: str | None = None) -> list[str]:
    """The stages `dvc repro [target]` runs, in the order it runs them (upstream first; None: every stage). DVC's own
    plan: the functions `Repo.reproduce` calls (dvc/repo/reproduce.py `collect_stages`, `plan_repro`: a post-order
    walk of the pipeline graph). An unknown target is a ValueError naming the stages of dvc.yaml."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(str(repo)) as dvc_repo:
        if target is not None:
            names = [s.name for s in dvc_repo.index.stages]
            if target not in names:
                raise ValueError(f"unknown stage {target!r}; stages in dvc.yaml: {', '.join(names)}")
        stages = collect_stages(dvc_repo, [_target(dvc_repo.root_dir, target)])
        return [s.name for s in plan_repro(get_active_graph(dvc_repo.index.graph), stages)]


def reproduce(repo: str | Path, stage: str, force: bool = False) -> dict:
    """`dvc repro --single-item [--force] <stage>` through the API: {"ran": [names DVC reproduced]} (empty: up to
    date), or {"error": DVC's message, "status": the stage command's exit status, or None when no command failed}."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    try:
        with Repo(str(repo)) as dvc_repo:  # closed, and the repo lock released, on every way out
            ran = dvc_repo.reproduce(_target(dvc_repo.root_dir, stage), single_item=True, force=force)
    except DvcException as err:
        chain, cause = [str(err)], err.__cause__
        while cause is not None:  # "failed to reproduce 'x': failed to run: <cmd>, exited with 2", as DVC's CLI
            chain.append(str(cause))
            cause = cause.__cause__
        failed = err if isinstance(err, StageCmdFailedError) else err.__cause__
        exited = _EXITED.search(str(failed)) if isinstance(failed, StageCmdFailedError) else None
        return {"error": ": ".join(chain), "status": int(exited.group(1)) if exited else None}
    return {"ran": [s.name for s in ran]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reproduce one DVC stage; write what DVC reproduced as JSON")
    parser.add_argument("repo", type=Path)
    parser.add_argument("stage")
    parser.add_argument("result", type=Path, help="JSON file to write")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    result = args.result.resolve()
    os.chdir(args.repo)  # DVC resolves some paths against the cwd (this process's own)
    import dvc  # noqa: F401 - sets up DVC's console log handlers
    # DVC's log to stdout (it logs warnings and errors to stderr), so stderr is the stage command's own
    for name in ("dvc", "dvc_objects", "dvc_data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stdout)
    result.write_text(json.dumps(reproduce(Path.cwd(), args.stage, args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
