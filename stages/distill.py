"""Stage `distill`: train the assembled dense student to match the MoE teacher's next-token distribution on Ray
Train -> models/distilled (HF checkpoint), metrics/distill.json, plots/distill_loss.csv (all byte-identical on a
rerun; speed and resume point go to the untracked timings/distill.json). Ray and the batch split are checked before
any model is loaded; the terminal shows one progress bar, Ray's logs go to .distill_runs/<run>/ray.log."""

from __future__ import annotations

import logging
from pathlib import Path

from stages._runner import run
from moe2dense.assemble import copy_tokenizer
from moe2dense.distill.cache import FILE as CACHE_FILE
from moe2dense.distill.data import load_rows, seq_len_of
from moe2dense.distill.driver import prepare_distill
from moe2dense.distill.loop import student_state_from_checkpoint
from moe2dense.heldout import kl as heldout_kl
from moe2dense.io import atomic_dir, atomic_file, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.teacher.load import load_frozen

STUDENT = "models/student"
TEACHER = "models/teacher"
TRAIN = "data/prepared/packed/train.parquet"
EVAL = "data/prepared/packed/eval.parquet"
CACHE = "teacher_logits"
STORAGE = ".distill_runs"  # Ray Train run dirs (checkpoints); resumable, never DVC-tracked
OUT = "models/distilled"
METRICS = "metrics/distill.json"
PLOT = "plots/distill_loss.csv"
DISTILLED_NOTE = """
## Distillation

This checkpoint is the assembled student above after distillation from the MoE teacher ({loss}, {tokens:,}
training tokens); held-out KL(teacher || student) went from {before:.4f} to {after:.4f}.
"""


def main() -> None:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    p = load_params().distill
    cached = f"{CACHE}/{CACHE_FILE}" if p.teacher_logits == "cached" else None
    try:
        # Ray (RAY_ADDRESS), workers, device and batch split first: they fail in seconds, the models load slowly.
        job = prepare_distill(p, student_dir=STUDENT, teacher_dir=TEACHER, train_path=TRAIN,
                              storage=STORAGE, cached_logits=cached)
        eval_rows = load_rows(EVAL, limit=max(1, p.eval_tokens // seq_len_of(EVAL)))
        teacher = load_frozen(job.cfg["teacher_dir"], torch.float32, torch.device("cpu"), p.teacher_top_k)
        student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
        before = heldout_kl(student, teacher, eval_rows)
        logging.info("held-out KL(teacher || assembled student) = %.4f over %d tokens", before, eval_rows.size)
        res = job.fit()
    finally:
        ray.shutdown()
    state, history = student_state_from_checkpoint(res["checkpoint"])
    student.load_state_dict(state)
    after = heldout_kl(student.eval(), teacher, eval_rows)
    with atomic_dir(OUT) as out:
        student.save_pretrained(out)
        copy_tokenizer(Path(STUDENT), out)
        if (Path(STUDENT) / "README.md").is_file():
            card = (Path(STUDENT) / "README.md").read_text()
            (out / "README.md").write_text(card + DISTILLED_NOTE.format(loss=p.loss, tokens=history[-1][1],
                                                                        before=before, after=after))
    losses = [h[2] for h in history]
    m = res["metrics"]
    write_json(METRICS, {
        "loss": p.loss, "steps": res["steps"], "tokens": history[-1][1], "workers": res["workers"],
        "device": res["device"], "final_loss": losses[-1], "best_loss": min(losses),
        "heldout_kl_before": round(before, 6), "heldout_kl_after": round(after, 6),
        # not "teacher_logits": a metric named like a stage output breaks `dvc exp show --drop` (duplicate column)
        "teacher_logits_source": p.teacher_logits, "run_name": res["run_name"],
    })
    write_timings("distill", {"tokens_per_s": round(m["tokens_per_s"], 1), "resumed_from_step": m["resumed_from"],
                              "ray_log": res["ray_log"]})
    with atomic_file(PLOT) as fh:
        fh.write("step,tokens,loss\n" + "".join(f"{s},{t},{l}\n" for s, t, l in history))
    logging.info("held-out KL %.4f -> %.4f after %d steps (%s tokens, %.0f tokens/s on %d %s worker(s))", before,
                 after, res["steps"], f"{history[-1][1]:,}", m["tokens_per_s"], res["workers"], res["device"])


if __name__ == "__main__":
    run("distill", main)
