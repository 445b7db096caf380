"""Stage `distill`: train the assembled dense student to match the MoE teacher's next-token distribution on Ray
Train -> models/distilled (HF checkpoint), metrics/distill.json, plots/distill_loss.csv (all byte-identical on a
rerun; speed, wall clock, the teacher's forward speed and the resume point go to the untracked timings/distill.json).
Stage `distill_baseline@<baseline>` (`python -m stages.distill d2d|random_ffn|random_init`): the same, with the same
distill params, for a baseline (moe2dense/baselines/runs.py says which model from which teacher, and where to).
Ray and the batch split are checked before any model is loaded; the driver never loads a teacher (the workers
measure the held-out KL(teacher || student) before and after training, on their devices); the terminal shows one
progress bar, Ray's logs go to .distill_runs/<run>/ray.log."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from stages._runner import run
from moe2dense.assemble import copy_tokenizer
from moe2dense.baselines.runs import DENSE_TEACHER, RUNS, STUDENT, TEACHER
from moe2dense.distill.cache import FILE as CACHE_FILE
from moe2dense.distill.driver import STORAGE, prepare_distill
from moe2dense.distill.loop import student_state_from_checkpoint
from moe2dense.io import atomic_dir, atomic_file, write_json, write_timings
from moe2dense.params import load_params

TRAIN = "data/prepared/packed/train.parquet"
EVAL = "data/prepared/packed/eval.parquet"
CACHE = "teacher_logits"  # the MoE teacher's top-N log-probs (stage teacher_logits)
DISTILLED_NOTE = """
## Distillation

This checkpoint is the model above after distillation from the {teacher_kind} teacher ({loss}, {tokens:,}
training tokens); held-out KL(teacher || student) went from {before:.4f} to {after:.4f}.
"""


@dataclass(frozen=True)
class Target:
    """What one distillation run reads and writes."""

    student: str
    teacher: str
    out: str
    metrics: str
    plot: str
    timings: str


TARGETS = {"m2d": Target(STUDENT, TEACHER, "models/distilled", "metrics/distill.json", "plots/distill_loss.csv",
                         "distill"),
           **{r.name: Target(r.initial, r.teacher, r.distilled, r.metrics, r.loss_plot, r.timings)
              for r in RUNS.values()}}


def main() -> None:
    import ray
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(prog="python -m stages.distill")
    parser.add_argument("target", nargs="?", default="m2d", choices=TARGETS,
                        help="m2d: the assembled student (default); or a baseline")
    t = TARGETS[parser.parse_args().target]
    p = load_params().distill
    cached = f"{CACHE}/{CACHE_FILE}" if p.teacher_logits == "cached" else None
    if cached and t.teacher != TEACHER:  # the cache holds the MoE teacher's logits
        logging.warning("distill.teacher_logits = cached holds the MoE teacher's logits; this run distils from %s "
                        "and computes its logits online", t.teacher)
        cached = None
    start = time.perf_counter()
    try:
        # Ray (RAY_ADDRESS), workers, device and batch split first: they fail in seconds. The driver loads no
        # teacher: the workers measure the held-out KL before and after training on their devices.
        job = prepare_distill(p, student_dir=t.student, teacher_dir=t.teacher, train_path=TRAIN, eval_path=EVAL,
                              storage=STORAGE, cached_logits=cached)
        res = job.fit()
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - start
    m = res["metrics"]
    before, after = m["heldout_kl_before"], m["heldout_kl_after"]
    state, history = student_state_from_checkpoint(res["checkpoint"])
    # Only to write the checkpoint: the student in its stored dtype, on the CPU.
    student = AutoModelForCausalLM.from_pretrained(t.student, dtype="auto", local_files_only=True)
    student.load_state_dict(state)
    with atomic_dir(t.out) as out:
        student.save_pretrained(out)
        copy_tokenizer(Path(t.student), out)
        if (Path(t.student) / "README.md").is_file():
            card = (Path(t.student) / "README.md").read_text()
            (out / "README.md").write_text(card + DISTILLED_NOTE.format(
                loss=p.loss, tokens=history[-1][1], before=before, after=after,
                teacher_kind="dense" if t.teacher == DENSE_TEACHER else "MoE"))
    losses = [h[2] for h in history]
    write_json(t.metrics, {
        "loss": p.loss, "steps": res["steps"], "tokens": history[-1][1], "workers": res["workers"],
        "device": res["device"], "final_loss": losses[-1], "best_loss": min(losses),
        "heldout_kl_before": round(before, 6), "heldout_kl_after": round(after, 6),
        # not "teacher_logits": a metric named like a stage output breaks `dvc exp show --drop` (duplicate column)
        "teacher_logits_source": "cached" if cached else "online", "run_name": res["run_name"],
        "teacher": t.teacher, "parameters": sum(v.numel() for v in student.parameters()),
    })
    # wall clock and speeds vary run to run: the untracked timings file (the baselines' cost comparison reads it)
    write_timings(t.timings, {
        # the workers' training time (what a step loop costs, as the paper compares), not this call's wall clock:
        # a rerun of a finished run returns its stored result in seconds
        "seconds": round(history[-1][1] / m["tokens_per_s"], 2) if m["tokens_per_s"] else None,
        "call_seconds": round(seconds, 2), "tokens_per_s": round(m["tokens_per_s"], 1),
        "teacher_forward_tokens_per_s": round(m["teacher_tokens_per_s"], 1) if m.get("teacher_tokens_per_s") else None,
        "resumed_from_step": m["resumed_from"], "ray_log": res["ray_log"],
        "tokens_per_s_per_device": round(m["tokens_per_s_per_device"], 1), "mfu": m["mfu"]})
    with atomic_file(t.plot) as fh:
        fh.write("step,tokens,loss\n" + "".join(f"{step},{tokens},{loss}\n" for step, tokens, loss in history))
    logging.info("held-out KL %.4f -> %.4f after %d steps (%s tokens, %.0f tokens/s on %d %s worker(s))", before,
                 after, res["steps"], f"{history[-1][1]:,}", m["tokens_per_s"], res["workers"], res["device"])


if __name__ == "__main__":
    run("distill", main)
