"""Prefect flow for the design-space screen: `dvc repro screen` stage by stage (prepare ... score, one shared
calibration, then the `screen` stage, which assembles and scores every configuration of params `screen`; each result
is cached by content in .screen_cache/, so adding a K value computes only the new ones). Publishes the best
configurations as a table artifact and screen/results.md as a markdown artifact.

    python -m flows.screen                   # this repo; temporary Prefect server unless PREFECT_API_URL is set
    python -m flows.screen --repo PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.cli import run
from flows.pipeline import REPO, check_before_run, pipeline

TABLE_COLUMNS = ("config", "method", "experts", "grouping", "scaling", "perplexity", "routed_mass_kept")


@flow(name="moe2dense-screen", log_prints=True)
def screen(repo: str = str(REPO)) -> list[dict]:
    """The design-space screen; returns its rows, best first."""
    import polars as pl

    root = Path(repo).resolve()
    pipeline(repo=str(root), stage="screen")  # DVC skips what is up to date, the screen included
    table = pl.read_parquet(root / "screen/results.parquet")
    best = table.head(20).select(TABLE_COLUMNS).to_dicts()
    create_table_artifact(key="moe2dense-screen-best", table=best,
                          description=f"The 20 best of {table.height} configurations by held-out perplexity")
    create_markdown_artifact(key="moe2dense-screen", markdown=(root / "screen/results.md").read_text(),
                             description="Design-space screen: best configurations, best per scoring method and K")
    return table.to_dicts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO))
    args = parser.parse_args(argv)

    def go() -> None:
        check_before_run(args.repo, "screen")
        for r in screen(repo=args.repo)[:10]:
            print(f"{r['config']:>32}: perplexity {r['perplexity']:.3f}")

    return run(go)


if __name__ == "__main__":
    sys.exit(main())
