"""Prefect flow for the design-space screen: the pipeline up to `score` through DVC (one shared calibration), then
`python -m stages.screen`, which assembles and scores every configuration of params `screen` (each cached by content
in .screen_cache/, so adding a K value computes only the new ones). Publishes the best configurations as a table
artifact and screen/results.md as a markdown artifact.

    python -m flows.screen                   # this repo; temporary Prefect server unless PREFECT_API_URL is set
    python -m flows.screen --repo PATH
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.pipeline import REPO, pipeline, run_logged  # noqa: E402

TABLE_COLUMNS = ("config", "method", "experts", "grouping", "scaling", "perplexity", "routed_mass_kept")


@task(name="screen", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def run_screen_stage(repo: str) -> None:
    """`python -m stages.screen` in `repo` with that repo's code first on the path (its params.yaml decides)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    run_logged([sys.executable, "-m", "stages.screen"], repo, "the screen", env)


@flow(name="moe2dense-screen", log_prints=True)
def screen(repo: str = str(REPO)) -> list[dict]:
    """The design-space screen; returns its rows, best first."""
    import polars as pl

    root = Path(repo).resolve()
    pipeline(repo=str(root), stage="score")  # calibration and scores, shared by every configuration
    run_screen_stage(str(root))
    table = pl.read_parquet(root / "screen/results.parquet")
    best = table.head(20).select(TABLE_COLUMNS).to_dicts()
    create_table_artifact(key="moe2dense-screen-best", table=best,
                          description=f"The 20 best of {table.height} configurations by held-out perplexity")
    create_markdown_artifact(key="moe2dense-screen", markdown=(root / "screen/results.md").read_text(),
                             description="Design-space screen: best configurations, best per scoring method and K")
    return table.to_dicts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO))
    args = parser.parse_args()
    rows = screen(repo=args.repo)
    for r in rows[:10]:
        print(f"{r['config']:>32}: perplexity {r['perplexity']:.3f}")


if __name__ == "__main__":
    main()
