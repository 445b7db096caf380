"""Ray Train driver for distillation: one code path for 2 local CPU workers, a GPU box, or an existing cluster.

- `prepare_distill` does every check that needs no model, before the stage loads one: RAY_ADDRESS answers (a TCP
  connect bounded by RAY_CONNECT_TIMEOUT_S: ray.init retries an unreachable GCS forever), the workers Ray can place,
  distill.device, the batch split. Cluster: `RAY_ADDRESS` set -> join it (the package ships to the workers as a
  py_module); otherwise start a local Ray with this machine's CPUs (and GPUs).
- Workers are clamped to the CPUs (or GPUs) Ray reports, with a warning: asking for more hangs Ray silently.
- The run's storage name is a hash of everything that defines the run (params, student weights, data content), so
  rerunning an interrupted run resumes it from its last checkpoint, and a changed config never resumes an old one.
- The terminal shows one progress bar fed by rank 0 through a Ray queue; Ray's own logs (its driver logger and what
  its actors print) go to <run dir>/ray.log, or to the terminal with MOE2DENSE_DEBUG=1.
- Determinism: see `moe2dense.distill.loop.setup_worker`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe2dense.checks import set_offline_env
from moe2dense.distill.cache import FILE as CACHE_FILE
from moe2dense.distill.data import check_batch_split, decode_rows, seq_len_of, step_rows
from moe2dense.distill.memory import MemoryPlan, Setup, check, gpu_memory, plan, student_shape, teacher_shape
from moe2dense.io import hash_files, hash_parquet_footer
from moe2dense.params import DistillParams
from moe2dense.teacher.source import teacher_checkpoint

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
RAY_LOG = "ray.log"
ROWS_DIR = "rows"  # under the run storage: the decoded training rows, shared by runs on the same split
RAY_CONNECT_TIMEOUT_S = 10.0
STORAGE = ".distill_runs"  # Ray run dirs of the stages (checkpoints, logs, decoded rows); never DVC-tracked


def debug() -> bool:
    """The project's debug switch (stages/_runner.py): tracebacks, and here Ray's logs in the terminal."""
    return bool(os.environ.get("MOE2DENSE_DEBUG"))


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A host:port RAY_ADDRESS must accept a connection and answer as a gRPC server, each within `timeout` s (`auto`
    is resolved by Ray)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RAY_ADDRESS = {address!r} is not host:port (or auto); unset RAY_ADDRESS to start a "
                         "local Ray")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as err:
        raise ValueError(f"RAY_ADDRESS = {address}: no Ray cluster answers there ({err.strerror or err}, waited at "
                         f"most {timeout:.0f} s); start its head with `ray start --head --port={port}` or unset "
                         "RAY_ADDRESS to run on a local Ray") from None
    with sock:
        if not os.environ.get("RAY_USE_TLS"):  # a TLS head needs certificates: ray.init's own wait applies there
            _check_http2(sock, address, timeout)


# The client's HTTP/2 connection preface followed by an empty SETTINGS frame (RFC 9113, section 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_http2(sock: socket.socket, address: str, timeout: float) -> None:
    """A Ray head's GCS is a gRPC (HTTP/2) server, whose first frame is a SETTINGS frame (type 4), sent at once. A
    port that accepts connections and then says nothing (a stuck head, a firewall, another service) would keep
    ray.init retrying for ever: ask for that frame with a deadline instead."""
    try:
        sock.sendall(_H2_PREFACE)
        head = sock.recv(9)
    except OSError as err:  # socket.timeout included
        raise ValueError(f"RAY_ADDRESS = {address}: the port accepts connections but no Ray head answered within "
                         f"{timeout:.0f} s ({err.strerror or err}); check the head's address and port, or unset "
                         "RAY_ADDRESS to run on a local Ray") from None
    if len(head) < 4 or head[3] != 4:
        raise ValueError(f"RAY_ADDRESS = {address}: the service there is not a Ray head (it does not speak gRPC); "
                         "check the head's address and port (`ray start --head` prints it)")


class _RayRecords(logging.Filter):
    """Keeps (keep=True) or drops the records of Ray's own loggers ("ray", "ray.*")."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name == "ray" or record.name.startswith("ray.")) == self.keep


def _ray_logs_to_file(path: Path) -> None:
    """The driver's "ray" loggers (init, auth, Train) to `path` instead of the terminal. ray.init(configure_logging=
    False) leaves them propagating to the root logger (it clears handlers on "ray" itself): route them there. A
    later call (another run in the same process) replaces the file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and any(isinstance(f, _RayRecords) and f.keep
                                                            for f in handler.filters):
            root.removeHandler(handler)
            handler.close()
        elif not any(isinstance(f, _RayRecords) for f in handler.filters):
            handler.addFilter(_RayRecords(keep=False))
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RayRecords(keep=True))
    root.addHandler(handler)
    logging.getLogger("ray").propagate = True


class _PlainText:
    """A text sink without the ANSI colours Ray puts in front of forwarded lines."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, path: Path):
        self.fh = open(path, "a", buffering=1)  # noqa: SIM115  (lives as long as the Ray connection)

    def write(self, text: str) -> int:
        return self.fh.write(self.ANSI.sub("", text))

    def flush(self) -> None:
        self.fh.flush()


def _actor_output_to_file(path: Path) -> None:
    """What Ray's actors print (Train controller, workers, core_worker errors) to `path`: Ray forwards it to the
    driver through one dispatcher handler, which prints it to the terminal; swap its sink for the file."""
    from ray._private import worker as ray_worker

    sink = _PlainText(path)
    ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    ray_worker.global_worker_stdstream_dispatcher.add_handler(
        "ray_print_logs", lambda data: ray_worker.print_worker_logs(data, sink))


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and each phase of
# a run (workers up, reports, finish) waits for a poll: 0.25 s takes ~5 s off every run's fixed cost (13.5 -> 8.8 s
# for an empty 2-worker fit on 2 cores); a poll is one small RPC per worker. A value the user exported wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def runtime_env(**extra) -> dict:
    """The job's Ray runtime_env: TRAIN_ENV (the user's own values first) for every actor, wherever it runs."""
    return {"env_vars": {k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()}, **extra}


def start_ray(log_file: Path | None = None) -> dict:
    """Connect to RAY_ADDRESS or start a local instance; returns the cluster's resources. With `log_file` (and no
    MOE2DENSE_DEBUG), Ray's logs go there instead of the terminal; an already connected Ray is left as it is."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
    import ray

    set_offline_env()  # Ray's usage stats off, before ray.init
    if not ray.is_initialized():
        quiet = log_file is not None and not debug()
        if quiet:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            _ray_logs_to_file(log_file)
        if address:
            try:
                ray.init(address=address, runtime_env=runtime_env(py_modules=[str(PACKAGE_DIR)]), log_to_driver=True,
                         configure_logging=not quiet)
            except (ConnectionError, RuntimeError) as err:  # something answers there, but not a Ray GCS
                raise ValueError(f"RAY_ADDRESS = {address}: could not join a Ray cluster there "
                                 f"({str(err).splitlines()[0]}); check the head's address and port") from None
        else:
            # Local workers import this checkout's code (a DVC experiment runs in a temp copy of the repo).
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(PACKAGE_DIR.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=not quiet,
                     runtime_env=runtime_env())
        if quiet:
            _actor_output_to_file(log_file)
            log.info("Ray's logs: %s (MOE2DENSE_DEBUG=1 shows them here)", log_file)
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


def run_name(p: DistillParams, student_dir: Path, train_path: Path, cached_logits: Path | None,
             eval_path: Path) -> str:
    """Hash of the params that change training or the held-out KL the run measures (not the worker count: batches
    are global) and of the inputs' content (not their paths or mtimes: a DVC experiment's temp copy or a rebuilt
    identical file keep the name)."""
    h = hashlib.sha256()
    h.update(json.dumps(p.model_dump(exclude={"workers", "max_failures"}), sort_keys=True).encode())
    hash_files(h, sorted([*student_dir.glob("*.safetensors"), student_dir / "config.json"]), lambda f: f.name)
    hash_parquet_footer(h, train_path)
    hash_parquet_footer(h, eval_path)  # a resumed run keeps the "before" KL it measured on these rows
    if cached_logits is not None:
        hash_parquet_footer(h, cached_logits / CACHE_FILE if cached_logits.is_dir() else cached_logits)
    return "distill-" + h.hexdigest()[:16]


@dataclass
class DistillJob:
    """A checked distillation run, connected to Ray, ready to `fit`."""

    cfg: dict
    name: str
    storage: Path
    steps: int
    seq_len: int
    workers: int
    use_gpu: bool
    cpus_per_worker: int
    max_failures: int

    @property
    def run_dir(self) -> Path:
        return self.storage / self.name

    def fit(self, progress: bool = True) -> dict:
        """Train; returns {"checkpoint": dir of the final checkpoint, "metrics": the last report's (with
        heldout_kl_before and heldout_kl_after, measured by the workers), "run_name", ...}."""
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # rank 0 -> the driver's progress bar
        bar = ProgressBar(queue, self.steps * self.cfg["global_batch"] * self.seq_len, enabled=progress)
        try:
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchConfig, TorchTrainer

            from moe2dense.distill.loop import train_worker

            trainer = TorchTrainer(
                train_worker,
                train_loop_config={**self.cfg, "progress": queue},
                torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                                             resources_per_worker={"GPU": 1} if self.use_gpu else
                                             {"CPU": self.cpus_per_worker}),
                run_config=RunConfig(name=self.name, storage_path=str(self.storage),
                                     failure_config=FailureConfig(max_failures=self.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)),
            )
            result = trainer.fit()
        finally:
            bar.close()
            queue.shutdown(force=True)
        if result.checkpoint is None:
            raise RuntimeError(f"distillation run {self.name} finished without a checkpoint")
        return {"checkpoint": result.checkpoint.path, "metrics": result.metrics, "run_name": self.name,
                "steps": self.steps, "workers": self.workers, "device": "cuda" if self.use_gpu else "cpu",
                "seq_len": self.seq_len, "ray_log": str(self.run_dir / RAY_LOG)}


class ProgressBar:
    """One tqdm bar (tokens done / total, tokens/s, ETA, loss) driven by what rank 0 puts in `queue`: a thread
    polls it while trainer.fit() blocks the main thread (which keeps Ctrl-C)."""

    def __init__(self, queue, total_tokens: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.queue, self.stop = queue, threading.Event()
        self.bar = tqdm(total=total_tokens, desc="distill", unit="tok", unit_scale=True, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self.bar.set_postfix_str("starting workers")
        self.thread = threading.Thread(target=self._poll, name="distill-progress", daemon=True)
        self.thread.start()

    def _show(self, item: dict) -> None:
        if "heldout_kl_before" in item:  # measured by the workers before the first step
            with self.bar.external_write_mode():
                log.info("held-out KL(teacher || student) before training = %.4f over %d tokens",
                         item["heldout_kl_before"], item["eval_tokens"])
        elif "start_tokens" in item:  # a worker group (re)started: rate and ETA count from here
            self.bar.reset()
            self.bar.initial = self.bar.n = self.bar.last_print_n = item["start_tokens"]
            self.bar.set_postfix_str(f"resumed at {item['start_tokens']:,} tokens" if item["start_tokens"] else "")
        else:
            self.bar.set_postfix(loss=f"{item['loss']:.4f}", refresh=False)
            self.bar.update(item["tokens"] - self.bar.n)

    def _poll(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self._show(self.queue.get(timeout=0.5))
            except Empty:
                if self.stop.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shut down): the run itself reports its error
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.bar.close()


def plan_memory(p: DistillParams, student_dir: Path, teacher_dir: Path, seq_len: int, workers: int, use_gpu: bool,
                cached: bool) -> MemoryPlan:
    """The per-device memory plan from the configs and safetensors headers (no weight read), logged; an error naming
    the params to change when a local GPU cannot hold it (memory.py)."""
    setup = Setup(workers=workers, cuda=use_gpu, strategy=p.strategy,
                  micro_tokens=p.batch_size // (workers * p.grad_accum) * seq_len, chunk_tokens=p.chunk_tokens,
                  activation_checkpointing=p.activation_checkpointing, teacher_cached=cached)
    teacher, teacher_bytes = (None, 0) if cached else teacher_shape(
        teacher_dir, torch.bfloat16 if use_gpu else torch.float32)
    gpu = gpu_memory() if use_gpu else None
    memory = plan(student_shape(student_dir, list(p.freeze)), teacher, teacher_bytes, setup, gpu and gpu[0])
    check(memory, setup, gpu and gpu[0], gpu[1] if gpu else "GPU")
    return memory


def prepare_distill(p: DistillParams, *, student_dir: str | Path, teacher_dir: str | Path, train_path: str | Path,
                    eval_path: str | Path, storage: str | Path, cached_logits: str | Path | None = None,
                    deterministic: bool = True) -> DistillJob:
    """Every check a run can fail without loading a model: RAY_ADDRESS, steps, device, workers, batch split, the
    memory plan. Connects to (or starts) Ray. `teacher_dir`: a teacher checkpoint or the teacher stage's pointer
    dir; `eval_path`: the packed rows whose first distill.eval_tokens the workers measure the held-out KL on."""
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])  # first: before anything is read
    student_dir, train_path = Path(student_dir).resolve(), Path(train_path).resolve()
    eval_path = Path(eval_path).resolve()
    teacher_dir = teacher_checkpoint(teacher_dir)  # the dir itself, or where its pointer leads
    cached_logits = Path(cached_logits).resolve() if cached_logits else None
    seq_len = seq_len_of(train_path)
    steps = p.tokens // (p.batch_size * seq_len)
    if steps < 1:
        raise ValueError(f"distill.tokens = {p.tokens} is less than one step of distill.batch_size x seq_len = "
                         f"{p.batch_size * seq_len} tokens")
    name = run_name(p, student_dir, train_path, cached_logits, eval_path)
    storage = Path(storage).resolve()
    workers, use_gpu, cpus_per_worker = plan_workers(p.workers, p.device, start_ray(storage / name / RAY_LOG))
    check_batch_split(p.batch_size, workers, p.grad_accum)
    memory = plan_memory(p, student_dir, Path(teacher_dir), seq_len, workers, use_gpu, cached_logits is not None)
    cfg = {
        "student_dir": str(student_dir), "teacher_dir": str(Path(teacher_dir).resolve()),
        "teacher_top_k": p.teacher_top_k, "train_path": str(train_path),
        # decoded once here, memory-mapped by every worker (storage is shared by the nodes of a cluster)
        "train_rows": str(decode_rows(train_path, storage / ROWS_DIR)),
        "eval_rows": str(decode_rows(eval_path, storage / ROWS_DIR)),
        "eval_limit": max(1, p.eval_tokens // seq_len_of(eval_path)),
        "cached_logits": str(cached_logits) if cached_logits else None, "loss": p.loss,
        "loss_options": dict(p.loss_options), "temperature": p.temperature, "ce_weight": p.ce_weight,
        "chunk_tokens": p.chunk_tokens, "steps": steps, "global_batch": p.batch_size, "accum": p.grad_accum,
        "lr": p.lr, "min_lr_ratio": p.min_lr_ratio, "warmup_steps": p.warmup_steps,
        "weight_decay": p.weight_decay, "grad_clip": p.grad_clip, "freeze": list(p.freeze), "seed": p.seed,
        "checkpoint_every": p.checkpoint_every, "strategy": p.strategy,
        "threads": 0 if use_gpu else cpus_per_worker, "deterministic": deterministic,
        "activation_checkpointing": p.activation_checkpointing, "shard_teacher": memory.shard_teacher,
        "trained_params": memory.trained_params,
    }
    # The thread count is part of what makes a rerun bit-identical (CPU reductions split by thread): say it.
    log.info("distilling %d steps x %d sequences of %d tokens on %d %s; run %s", steps, p.batch_size, seq_len,
             workers, "GPU worker(s)" if use_gpu else f"CPU worker(s) x {cpus_per_worker} thread(s)", name)
    return DistillJob(cfg=cfg, name=name, storage=storage, steps=steps, seq_len=seq_len, workers=workers,
                      use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=p.max_failures)


def run_distill(p: DistillParams, *, student_dir: str | Path, teacher_dir: str | Path, train_path: str | Path,
                eval_path: str | Path, storage: str | Path, cached_logits: str | Path | None = None,
                deterministic: bool = True, progress: bool = True) -> dict:
    """`prepare_distill` + `fit` in one call."""
    return prepare_distill(p, student_dir=student_dir, teacher_dir=teacher_dir, train_path=train_path,
                           eval_path=eval_path, storage=storage, cached_logits=cached_logits, deterministic=deterministic).fit(progress)


def visited_rows(p: DistillParams, n_rows: int, seq_len: int) -> np.ndarray:
    """Every training row a run with these params visits (what the teacher-logits cache must cover)."""
    steps = p.tokens // (p.batch_size * seq_len)
    return np.unique(np.concatenate([step_rows(s, p.batch_size, n_rows, p.seed) for s in range(steps)]))
