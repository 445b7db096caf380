"""Ray Train driver for distillation: one code path for 2 local CPU workers, a GPU box, or an existing cluster.

- Cluster: `RAY_ADDRESS` set -> join it (the package ships to the workers as a py_module); otherwise start a local
  Ray with this machine's CPUs (and GPUs).
- Workers are clamped to the CPUs (or GPUs) Ray reports, with a warning: asking for more hangs Ray silently.
- The run's storage name is a hash of everything that defines the run (params, student weights, data), so rerunning
  an interrupted run resumes it from its last checkpoint, and a changed config never resumes an old one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from moe2dense.distill.data import check_batch_split, load_rows, step_rows
from moe2dense.params import DistillParams

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def start_ray() -> dict:
    """Connect to RAY_ADDRESS or start a local instance; returns the cluster's resources."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE_DIR)]}, log_to_driver=True)
        else:
            # Local workers import this checkout's code (a DVC experiment runs in a temp copy of the repo).
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(PACKAGE_DIR.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(include_dashboard=False, log_to_driver=True)
    return ray.cluster_resources()


def plan_workers(requested: int, device: str, resources: dict) -> tuple[int, bool, int]:
    """(workers, use_gpu, cpus per worker), clamped to what the cluster has."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if device == "cuda" and gpus == 0:
        raise ValueError("distill.device = cuda, but the Ray cluster reports no GPU; use auto or cpu")
    use_gpu = gpus > 0 and device != "cpu"
    limit = gpus if use_gpu else max(1, cpus)
    workers = min(requested, limit)
    if workers < requested:
        log.warning("distill.workers = %d but Ray sees only %d %s: using %d (more would wait forever)", requested,
                    limit, "GPUs" if use_gpu else "CPUs", workers)
    cpus_per_worker = 1 if use_gpu else max(1, cpus // workers)
    return workers, use_gpu, cpus_per_worker


def _hash_files(paths: list[Path], h) -> None:
    for path in sorted(paths):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)


def run_name(p: DistillParams, student_dir: Path, train_path: Path, cached_logits: Path | None) -> str:
    """Hash of the params that change training (not the worker count: batches are global) and of the inputs."""
    h = hashlib.sha256()
    h.update(json.dumps(p.model_dump(exclude={"workers", "max_failures", "eval_tokens"}), sort_keys=True).encode())
    _hash_files(list(student_dir.glob("*.safetensors")) + [student_dir / "config.json"], h)
    h.update(f"{train_path.resolve()}:{train_path.stat().st_size}:{train_path.stat().st_mtime_ns}".encode())
    if cached_logits is not None:
        h.update(str(cached_logits.resolve()).encode())
    return "distill-" + h.hexdigest()[:16]


def run_distill(p: DistillParams, *, student_dir: str | Path, teacher_dir: str | Path, train_path: str | Path,
                storage: str | Path, cached_logits: str | Path | None = None) -> dict:
    """Train; returns {"checkpoint": dir of the final checkpoint, "metrics": ..., "history": [...], ...}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    student_dir, train_path = Path(student_dir).resolve(), Path(train_path).resolve()
    cached_logits = Path(cached_logits).resolve() if cached_logits else None
    rows = load_rows(train_path)
    steps = p.tokens // (p.batch_size * rows.shape[1])
    if steps < 1:
        raise ValueError(f"distill.tokens = {p.tokens} is less than one step of distill.batch_size x seq_len = "
                         f"{p.batch_size * rows.shape[1]} tokens")
    resources = start_ray()
    workers, use_gpu, cpus_per_worker = plan_workers(p.workers, p.device, resources)
    check_batch_split(p.batch_size, workers, p.grad_accum)
    name = run_name(p, student_dir, train_path, cached_logits)
    cfg = {
        "student_dir": str(student_dir), "teacher_dir": str(Path(teacher_dir).resolve()),
        "teacher_top_k": p.teacher_top_k, "train_path": str(train_path),
        "cached_logits": str(cached_logits) if cached_logits else None, "loss": p.loss,
        "loss_options": dict(p.loss_options), "temperature": p.temperature, "ce_weight": p.ce_weight,
        "chunk_tokens": p.chunk_tokens, "steps": steps, "global_batch": p.batch_size, "accum": p.grad_accum,
        "lr": p.lr, "min_lr_ratio": p.min_lr_ratio, "warmup_steps": p.warmup_steps,
        "weight_decay": p.weight_decay, "grad_clip": p.grad_clip, "freeze": list(p.freeze), "seed": p.seed,
        "checkpoint_every": p.checkpoint_every, "strategy": p.strategy,
        "threads": 0 if use_gpu else cpus_per_worker,
    }
    from moe2dense.distill.loop import train_worker

    log.info("distilling %d steps x %d sequences of %d tokens on %d %s worker(s); run %s", steps, p.batch_size,
             rows.shape[1], workers, "GPU" if use_gpu else "CPU", name)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=p.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"distillation run {name} finished without a checkpoint")
    return {"checkpoint": result.checkpoint.path, "metrics": result.metrics, "run_name": name, "steps": steps,
            "workers": workers, "device": "cuda" if use_gpu else "cpu", "seq_len": int(rows.shape[1])}


@torch.no_grad()
def heldout_kl(student, teacher, rows: np.ndarray, batch_rows: int = 8) -> float:
    """Mean per-token forward KL(teacher || student) at T = 1 over `rows` (the distillation objective, held out)."""
    total, n = 0.0, 0
    for s in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(rows[s:s + batch_rows].astype(np.int64))
        log_p = teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        log_q = student(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += ids.numel()
    return total / n


def visited_rows(p: DistillParams, n_rows: int, seq_len: int) -> np.ndarray:
    """Every training row a run with these params visits (what the teacher-logits cache must cover)."""
    steps = p.tokens // (p.batch_size * seq_len)
    return np.unique(np.concatenate([step_rows(s, p.batch_size, n_rows, p.seed) for s in range(steps)]))
