"""Distillation benchmarks on the demo's own student and teacher (run `make demo` first).

    python bench/distill_bench.py throughput   # stage on 1 Ray worker vs a plain single-process loop
    python bench/distill_bench.py cached       # cached teacher logits vs the online teacher
    python bench/distill_bench.py determinism  # deterministic kernels (the default) vs the previous setting

throughput: the same student, teacher, chunked KD loss, batch and optimizer, (a) in a plain PyTorch loop in this
process and (b) through `run_distill` on one Ray Train worker given every core. Tokens/s of (b) is what the worker
measures over its training steps (start-up of Ray and model loading excluded, as in metrics/distill.json); the
wall time of the whole stage call is printed too. Budget: (b) >= 0.9 x (a).

cached: one distillation run with `distill.teacher_logits: cached` (the cache built beforehand, as the
`teacher_logits` stage does once per sweep) against the same run with the online teacher, both on one worker.
Budget: cached <= 0.6 x online, for the training loop (and, for information, for the whole call).

determinism: the same run (2 Ray workers by default) with `deterministic=True` (torch.use_deterministic_algorithms,
what the stage uses) and `False` (the previous setting), interleaved; tokens/s of each, their ratio, and whether
the deterministic runs ended with bit-identical weights. Budget: deterministic >= 0.9 x not.
`--root DIR` takes models/student, models/teacher and data/prepared/packed/train.parquet from DIR instead of the demo.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe2dense.distill.cache import write_cached_logits  # noqa: E402
from moe2dense.distill.data import load_rows, worker_micro_rows  # noqa: E402
from moe2dense.distill.driver import run_distill, visited_rows  # noqa: E402
from moe2dense.distill.loop import Objective, _labels, _online_target, student_state_from_checkpoint  # noqa: E402
from moe2dense.params import DistillParams  # noqa: E402
from moe2dense.teacher.load import load_teacher  # noqa: E402
from moe2dense.training import warmup_cosine_lr  # noqa: E402

STUDENT, TEACHER, TRAIN = ROOT / "models/student", ROOT / "models/teacher", ROOT / "data/prepared/packed/train.parquet"
EVAL = ROOT / "data/prepared/packed/eval.parquet"


def params(a, **kw) -> DistillParams:
    return DistillParams(**{"tokens": a.steps * a.batch * load_rows(TRAIN).shape[1], "batch_size": a.batch,
                            "workers": 1, "checkpoint_every": 10 ** 6, "warmup_steps": 2, **kw})


def plain_loop(a, p: DistillParams) -> float:
    """Tokens/s of the same training step without Ray: model, loss, AdamW, clipping, schedule."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = load_teacher(TEACHER, "float32", "cpu")
    student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).train()
    cfg = {"loss": p.loss, "temperature": p.temperature, "loss_options": {}, "ce_weight": 0.0,
           "chunk_tokens": p.chunk_tokens}
    objective = Objective(student, cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=p.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_lr(s, a.steps, 2, p.min_lr_ratio))
    rows = load_rows(TRAIN)
    start = time.perf_counter()
    for step in range(a.steps):
        (idx,) = worker_micro_rows(step, a.batch, len(rows), p.seed, 0, 1, 1)
        ids = torch.from_numpy(rows[idx].astype(np.int64))
        objective(ids, _online_target(teacher, ids), _labels(ids)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), p.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return a.steps * a.batch * rows.shape[1] / (time.perf_counter() - start)


def stage(p: DistillParams, cached: Path | None = None, deterministic: bool = True, weights: list | None = None
          ) -> tuple[float, float]:
    """(loop tokens/s as the worker measured it, wall seconds of the whole call); the final student weights are
    appended to `weights` when given."""
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        res = run_distill(p, student_dir=STUDENT, teacher_dir=teacher_checkpoint(TEACHER), train_path=TRAIN,
                          eval_path=EVAL, storage=storage, cached_logits=cached, deterministic=deterministic, progress=False)
        if weights is not None:
            weights.append(student_state_from_checkpoint(res["checkpoint"])[0])
        return res["metrics"]["tokens_per_s"], time.perf_counter() - start


def determinism(a) -> None:
    p = params(a, workers=a.workers)
    det, nondet, weights = [], [], []
    for r in range(a.reps):
        det.append(stage(p, deterministic=True, weights=weights)[0])
        nondet.append(stage(p, deterministic=False)[0])
        print(f"round {r + 1}: deterministic {det[-1]:,.0f} tok/s, previous setting {nondet[-1]:,.0f} tok/s",
              flush=True)
    ratio = statistics.median(d / n for d, n in zip(det, nondet))
    same = all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    print(f"\n{a.steps} steps x {a.batch} sequences on {a.workers} worker(s); medians of {a.reps} interleaved rounds")
    print(f"  deterministic     {statistics.median(det):>10,.0f} tok/s")
    print(f"  previous setting  {statistics.median(nondet):>10,.0f} tok/s")
    print(f"deterministic / previous = {ratio:.3f}x   budget >= 0.9x   {'OK' if ratio >= 0.9 else 'MISSED'}")
    print(f"deterministic runs bit-identical: {same} ({len(weights)} runs)")


def throughput(a) -> None:
    p = params(a)
    plain, ray_tps, walls = [], [], []
    for r in range(a.reps):
        plain.append(plain_loop(a, p))
        tps, wall = stage(p)
        ray_tps.append(tps)
        walls.append(wall)
        print(f"round {r + 1}: plain {plain[-1]:,.0f} tok/s, stage {tps:,.0f} tok/s (call {wall:.1f} s)", flush=True)
    ratio = statistics.median(s / q for s, q in zip(ray_tps, plain))
    print(f"\n{a.steps} steps x {a.batch} sequences; medians of {a.reps} interleaved rounds")
    print(f"  plain loop          {statistics.median(plain):>10,.0f} tok/s")
    print(f"  stage, 1 Ray worker {statistics.median(ray_tps):>10,.0f} tok/s   (whole call {statistics.median(walls):.1f} s)")
    print(f"stage / plain = {ratio:.3f}x   budget >= 0.9x   {'OK' if ratio >= 0.9 else 'MISSED'}")


def cached(a) -> None:
    p_online = params(a)
    p_cached = params(a, teacher_logits="cached", cached_top_n=a.top_n)
    rows = load_rows(TRAIN)
    teacher = load_teacher(TEACHER, "float32", "cpu")
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        path = write_cached_logits(teacher, rows, visited_rows(p_cached, len(rows), rows.shape[1]), d,
                                   top_n=a.top_n, temperature=1.0, progress=False)
        build = time.perf_counter() - start
        del teacher
        on, ca = [], []
        for r in range(a.reps):
            on.append(stage(p_online))
            ca.append(stage(p_cached, path))
            print(f"round {r + 1}: online {on[-1][0]:,.0f} tok/s ({on[-1][1]:.1f} s), cached {ca[-1][0]:,.0f} tok/s "
                  f"({ca[-1][1]:.1f} s)", flush=True)
    loop_ratio = statistics.median(o[0] / c[0] for o, c in zip(on, ca))  # cost ratio = inverse throughput ratio
    wall_ratio = statistics.median(c[1] / o[1] for o, c in zip(on, ca))
    print(f"\n{a.steps} steps x {a.batch} sequences, top-{a.top_n} of the teacher's log-probs cached "
          f"(built once in {build:.1f} s)")
    print(f"cached / online training-loop cost = {loop_ratio:.3f}x   budget <= 0.6x   "
          f"{'OK' if loop_ratio <= 0.6 else 'MISSED'}")
    print(f"cached / online whole call (Ray start-up included) = {wall_ratio:.3f}x   (information)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "cached", "determinism"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--top-n", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="determinism: Ray workers")
    ap.add_argument("--root", type=Path, help="a pipeline dir with models/ and data/prepared (default: this repo)")
    a = ap.parse_args()
    if a.root:
        global STUDENT, TEACHER, TRAIN
        STUDENT, TEACHER = a.root / "models/student", a.root / "models/teacher"
        TRAIN = a.root / "data/prepared/packed/train.parquet"
    for path in (STUDENT, TEACHER, TRAIN):
        if not path.exists():
            sys.exit(f"{path} is missing: run `make demo` (or `dvc repro assemble`) first")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        {"throughput": throughput, "cached": cached, "determinism": determinism}[a.what](a)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
