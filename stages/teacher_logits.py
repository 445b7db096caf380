"""Stage `teacher_logits`: with `distill.teacher_logits: cached`, run the teacher once over every training row the
distillation run will visit and store its top-N log-probs (teacher_logits/, DVC-cached), so each student run of a
sweep (loss, lr, freeze, ...) skips the teacher forward. With `online` it records that nothing is cached."""

from __future__ import annotations

import json
import logging

from stages._runner import run
from moe2dense.distill.cache import write_cached_logits
from moe2dense.distill.data import load_rows
from moe2dense.distill.driver import visited_rows
from moe2dense.io import atomic_dir
from moe2dense.params import load_params
from moe2dense.teacher.load import load_teacher, resolve_device, run_dtype
from moe2dense.training import deterministic_algorithms

TEACHER = "models/teacher"
TRAIN = "data/prepared/packed/train.parquet"
OUT = "teacher_logits"


def main() -> None:
    p = load_params().distill
    with atomic_dir(OUT) as out:
        if p.teacher_logits == "online":
            (out / "cache.json").write_text(json.dumps({"cached": False, "reason": "distill.teacher_logits is "
                                                        "online: the distill stage runs the teacher itself"}) + "\n")
            logging.info("distill.teacher_logits = online: nothing to cache")
            return
        rows = load_rows(TRAIN)
        ids = visited_rows(p, len(rows), rows.shape[1])
        device = resolve_device(p.device, key="distill.device")
        # The cache is a DVC output: the same bytes on every rerun.
        with deterministic_algorithms(warn_only=True, cuda=device.type == "cuda", fill_uninitialized_memory=True):
            # The dtype the distill workers' online teacher runs in: bf16 on CUDA, fp32 on CPU.
            teacher = load_teacher(TEACHER, run_dtype(device), device, p.teacher_top_k)
            write_cached_logits(teacher, rows, ids, out, top_n=p.cached_top_n, temperature=p.temperature,
                                meta={"teacher_top_k": p.teacher_top_k})
        (out / "cache.json").write_text(json.dumps({"cached": True, "rows": int(len(ids)),
                                                    "top_n": p.cached_top_n}) + "\n")
        logging.info("cached the teacher's top-%d log-probs for %d training rows", p.cached_top_n, len(ids))


if __name__ == "__main__":
    run("teacher_logits", main)
