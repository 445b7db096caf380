"""Stage `teacher_logits`: with `distill.teacher_logits: cached`, run the teacher once over every training row the
distillation run will visit and store its top-N log-probs (teacher_logits/, DVC-cached), so each student run of a
sweep (loss, lr, freeze, ...) skips the teacher forward. With `online` it records that nothing is cached.

With distill.workers > 1 the rows are split over that many Ray workers (a GPU each, or CPU workers), each loading the
teacher itself and writing a Parquet part; the merged file is the one a single worker writes, byte for byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from stages._runner import run
from moe2dense.distill.cache import write_cached_logits, write_cached_logits_ray
from moe2dense.distill.data import load_rows, seq_len_of
from moe2dense.distill.driver import STORAGE, plan_workers, start_ray, visited_rows
from moe2dense.io import atomic_dir
from moe2dense.params import load_params
from moe2dense.teacher.load import load_teacher, resolve_device, run_dtype, teacher_config
from moe2dense.teacher.source import teacher_checkpoint
from moe2dense.training import deterministic_algorithms

TEACHER = "models/teacher"
TRAIN = "data/prepared/packed/train.parquet"
OUT = "teacher_logits"
RAY_LOG = "teacher_logits.ray.log"  # under the distill stage's run storage (never DVC-tracked)


def main() -> None:
    p = load_params().distill
    with atomic_dir(OUT) as out:
        if p.teacher_logits == "online":
            (out / "cache.json").write_text(json.dumps({"cached": False, "reason": "distill.teacher_logits is "
                                                        "online: the distill stage runs the teacher itself"}) + "\n")
            logging.info("distill.teacher_logits = online: nothing to cache")
            return
        meta = {"teacher_top_k": p.teacher_top_k}
        if p.workers > 1:
            ids = visited_rows(p, pq.ParquetFile(TRAIN).metadata.num_rows, seq_len_of(TRAIN))
            teacher_config(TEACHER)  # a moved or broken teacher fails here in one line, before Ray starts
            workers, use_gpu, cpus = plan_workers(p.workers, p.device, start_ray(Path(STORAGE) / RAY_LOG))
            logging.info("teacher logits over %d Ray %s worker(s)", workers, "GPU" if use_gpu else "CPU")
            write_cached_logits_ray(teacher_checkpoint(TEACHER), TRAIN, ids, out, workers=workers, use_gpu=use_gpu,
                                    cpus_per_worker=cpus, top_n=p.cached_top_n, temperature=p.temperature,
                                    top_k=p.teacher_top_k, meta=meta)
            _done(out, p, ids)
            return
        rows = load_rows(TRAIN)
        ids = visited_rows(p, len(rows), rows.shape[1])
        device = resolve_device(p.device, key="distill.device")
        # The cache is a DVC output: the same bytes on every rerun.
        with deterministic_algorithms(warn_only=True, cuda=device.type == "cuda", fill_uninitialized_memory=True):
            # The dtype the distill workers' online teacher runs in: bf16 on CUDA, fp32 on CPU.
            teacher = load_teacher(TEACHER, run_dtype(device), device, p.teacher_top_k)
            write_cached_logits(teacher, rows, ids, out, top_n=p.cached_top_n, temperature=p.temperature, meta=meta)
        _done(out, p, ids)


def _done(out: Path, p, ids) -> None:
    (out / "cache.json").write_text(json.dumps({"cached": True, "rows": int(len(ids)),
                                                "top_n": p.cached_top_n}) + "\n")
    logging.info("cached the teacher's top-%d log-probs for %d training rows", p.cached_top_n, len(ids))


if __name__ == "__main__":
    run("teacher_logits", main)
