"""Stage `evaluate@<model>`: lm-evaluation-harness on one model (teacher, student or distilled), in memory and
offline -> eval/<model>.json. One DVC stage per model, so the teacher's result is computed once and restored
from the cache while students change; stage `report` merges them into metrics/eval.json. Stage
`evaluate_baseline@<model>`: the same for the baselines' models (dense teacher, each baseline before and after
distillation) -> eval/baselines/<model>.json, which stage `baselines` tabulates."""

from __future__ import annotations

import argparse
import logging
import time

from stages._runner import run
from moe2dense.evaluate.runner import evaluate_model, load_model, load_tasks
from moe2dense.baselines.runs import EVAL_MODELS as BASELINE_MODELS
from moe2dense.io import write_json, write_timings
from moe2dense.params import EVAL_MODELS, load_params

TASKS = "eval_tasks"
MODELS = {m: f"models/{m}" for m in (*EVAL_MODELS, *BASELINE_MODELS)}
OUTS = {**{m: f"eval/{m}.json" for m in EVAL_MODELS}, **{m: f"eval/baselines/{m}.json" for m in BASELINE_MODELS}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate")
    parser.add_argument("model", choices=MODELS)
    args = parser.parse_args()
    p = load_params().evaluate
    tasks = load_tasks(p, TASKS)  # every task and dataset resolved before the model is read
    try:
        logging.info("%s: %s on %s", args.model, ", ".join(tasks.names), MODELS[args.model])
        model, tokenizer = load_model(MODELS[args.model], p)
        start = time.perf_counter()
        result = evaluate_model(model, tokenizer, tasks, p)
        seconds = time.perf_counter() - start
    finally:
        tasks.close()
    write_json(OUTS[args.model], {"path": MODELS[args.model], **result})
    # the evaluation's wall time stays out of eval/<model>.json, which must be byte-identical across reruns
    write_timings(f"evaluate_{args.model}", {"seconds": round(seconds, 2)})
    for task in tasks.names:
        shown = {k: v for k, v in result[task].items() if not k.endswith("stderr") and k != "samples"}
        logging.info("%s %s: %s", args.model, task, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))


if __name__ == "__main__":
    run("evaluate", main)
