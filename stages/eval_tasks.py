"""Stage `eval_tasks`: generate the offline demo tasks (per-domain held-out perplexity, continuation choice) from the
held-out split -> eval_tasks/ (jsonl data + tasks.json manifest; the lm-eval YAML is rendered at evaluation time)."""

from __future__ import annotations

import logging

from stages._runner import run
from moe2dense.evaluate.tasks import build_demo_tasks
from moe2dense.io import atomic_dir
from moe2dense.params import load_params

EVAL_TEXT = "data/prepared/text/eval.parquet"
OUT = "eval_tasks"


def main() -> None:
    p = load_params().evaluate
    with atomic_dir(OUT) as out:
        manifest = build_demo_tasks(EVAL_TEXT, out, p.continuation, p.seed)
    for name, task in manifest["tasks"].items():
        size = f"{task['docs']} documents" if task["kind"] == "perplexity" else f"{task['items']} items"
        logging.info("%s (%s): %s", name, task["kind"], size)


if __name__ == "__main__":
    run("eval_tasks", main)
