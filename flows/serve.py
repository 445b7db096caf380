"""Register the moe2dense flows as Prefect deployments with cron schedules and serve them.

This is the long-running "serve" process: it executes the scheduled runs and the runs triggered from the UI or the
CLI. It needs a running Prefect server (schedules are not kept by the temporary one):

    prefect server start                                   # UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --cron "0 3 * * *"               # moe2dense-pipeline/nightly, moe2dense-screen/weekly,
                                                           # moe2dense-sweep/weekly (the screen's best, distilled)
    python -m flows.serve --repo /path/to/repo --stage assemble
    prefect deployment run 'moe2dense-pipeline/nightly'    # or "Quick run" in the UI

A new flow is served by adding a builder to DEPLOYMENTS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


from flows.cli import check_server, run
from flows.pipeline import MAIN_TARGET, REPO, pipeline


def pipeline_deployment(args: argparse.Namespace):
    return pipeline.to_deployment(
        name="nightly", cron=args.cron,
        parameters={"repo": str(Path(args.repo).resolve()), "stage": args.stage, "force": False},
        description="dvc repro of the moe2dense pipeline, stage by stage", tags=["moe2dense"])


def screen_deployment(args: argparse.Namespace):
    from flows.screen import screen

    return screen.to_deployment(
        name="weekly", cron=args.screen_cron, parameters={"repo": str(Path(args.repo).resolve())},
        description="the design-space screen (every scoring x grouping x scaling x K)", tags=["moe2dense"])


def sweep_deployment(args: argparse.Namespace):
    from flows.sweep import sweep

    return sweep.to_deployment(
        name="weekly", cron=args.sweep_cron,
        parameters={"repo": str(Path(args.repo).resolve()), "from_screen": args.sweep_best, "jobs": args.sweep_jobs},
        description="the screen's best configurations distilled and evaluated as DVC experiments",
        tags=["moe2dense"])


# One builder per served flow: (args) -> RunnerDeployment.
DEPLOYMENTS: list[Callable[[argparse.Namespace], object]] = [pipeline_deployment, screen_deployment,
                                                             sweep_deployment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the moe2dense Prefect deployments with cron schedules")
    parser.add_argument("--repo", default=str(REPO), help="repository root holding dvc.yaml (default: this repo)")
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: every day at 03:00)")
    parser.add_argument("--stage", default=MAIN_TARGET, help=f"run the pipeline up to this stage (default {MAIN_TARGET})")
    parser.add_argument("--screen-cron", default="0 4 * * 0", help="cron of the screen (default: Sundays 04:00)")
    parser.add_argument("--sweep-cron", default="0 6 * * 0", help="cron of the sweep (default: Sundays 06:00)")
    parser.add_argument("--sweep-best", type=int, default=3, help="screen configurations the sweep distils (3)")
    parser.add_argument("--sweep-jobs", type=int, default=1, help="experiments the sweep runs at a time (1)")
    args = parser.parse_args(argv)

    def go() -> None:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL

        check_server(PREFECT_API_URL.value(), required=True)
        serve(*[build(args) for build in DEPLOYMENTS])

    return run(go)


if __name__ == "__main__":
    sys.exit(main())
