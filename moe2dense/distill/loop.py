"""The distillation training loop that runs on every Ray Train worker.

Each worker holds the frozen teacher and a replica of the student (DDP; FSDP shards it). A step runs `accum`
micro-batches of the rows `data.worker_micro_rows` assigns, computes the chunked KD loss against the teacher's
next-token distribution (online teacher forward, or cached top-N log-probs), clips, steps AdamW on a warmup + cosine
schedule. Every `checkpoint_every` steps rank 0 writes (student, optimizer, step, loss history) and every rank calls
`ray.train.report`; a restarted worker group resumes from the last reported checkpoint at the next step, and since
batches are a function of the step alone, the resumed run trains on exactly the batches the uninterrupted one would.
After every step rank 0 puts (tokens, loss) in the driver's progress queue. Before the first step of a fresh run
and after the last, the workers measure the held-out KL(teacher || student) on their devices (`heldout_kl`); the
"before" value travels in every checkpoint, so a resumed run keeps it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe2dense import lm_head
from moe2dense.distill.cache import CachedTeacher
from moe2dense.distill.data import open_rows, worker_micro_rows
from moe2dense.distill.losses import chunked_kd_loss
from moe2dense.distill.memory import mfu, peak_flops
from moe2dense.teacher.load import load_frozen, run_dtype
from moe2dense.training import deterministic_algorithms, warmup_cosine_lr

STATE = "state.pt"
HISTORY = "history.json"
HELDOUT = "heldout_kl.json"  # {"before": ..., "after": ... once the last step is done}


def worker_seed(seed: int, rank: int) -> int:
    """Each rank its own dropout stream, the same on every rerun (weights come from the checkpoint, not init)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def freeze(student: nn.Module, parts: list[str]) -> None:
    if "embeddings" in parts:
        student.get_input_embeddings().requires_grad_(False)
    if "attention" in parts:
        for name, module in student.named_modules():
            if name.endswith("self_attn"):
                module.requires_grad_(False)


class Objective(nn.Module):
    """The student and its loss in one module, so DDP/FSDP see a forward and synchronise every trained weight
    (the LM head included, which the chunked loss uses directly)."""

    def __init__(self, student: nn.Module, cfg: dict):
        super().__init__()
        self.student, self.cfg = student, cfg

    def forward(self, ids: torch.Tensor, teacher_chunk, labels: torch.Tensor | None) -> torch.Tensor:
        """The training loss; with `labels` None the held-out measure instead: KL(teacher || student) at T = 1
        summed over every token (moe2dense.heldout.kl's definition), through this forward so that DDP/FSDP run
        their collectives (buffer broadcast, parameter gathering) as in training."""
        hidden = lm_head.hidden_states(self.student, ids)
        head = self.student.get_output_embeddings()
        c, flat = self.cfg, hidden.reshape(-1, hidden.shape[-1])
        common = dict(chunk_tokens=c["chunk_tokens"], head_bias=head.bias,
                      head_transform=lm_head.transform(self.student.config))
        if labels is None:
            return chunked_kd_loss(flat, head.weight, teacher_chunk, loss="forward_kl", **common) * flat.shape[0]
        return chunked_kd_loss(flat, head.weight, teacher_chunk, loss=c["loss"], temperature=c["temperature"],
                               options=c["loss_options"], labels=labels.reshape(-1), ce_weight=c["ce_weight"],
                               **common)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _online_target(teacher: nn.Module, ids: torch.Tensor):
    """teacher_chunk(start, end): the teacher's fp32 logits of those tokens, the head run chunk by chunk."""
    with torch.no_grad():
        hidden = lm_head.hidden_states(teacher, ids).reshape(-1, teacher.config.hidden_size)
    return lambda start, end: lm_head.logits(teacher, hidden[start:end])


def _timed_target(w: "Worker", ids: torch.Tensor):
    """`_online_target`, its decoder forward timed (the LM head runs later, chunk by chunk, inside the loss)."""
    start = time.perf_counter()
    target = _online_target(w.teacher, ids)
    if w.cuda:
        torch.cuda.synchronize(w.device)  # kernels are asynchronous: wait for them before reading the clock
    w.teacher_seconds += time.perf_counter() - start
    w.teacher_tokens += ids.numel()
    return target


@dataclass
class Worker:
    """One Ray Train worker's run: its place in the group, the frozen teacher (or the cached logits), the student
    inside its DDP/FSDP objective, and the optimizer."""

    cfg: dict
    rank: int
    world: int
    device: torch.device
    teacher: nn.Module | None
    cached: CachedTeacher | None
    objective: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: Any  # rank 0: the driver's ray.util.queue.Queue; other ranks: None
    teacher_seconds: float = 0.0  # this rank's time in the teacher's forward (online), for the cost comparison
    teacher_tokens: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_worker(cfg: dict, rank: int) -> torch.device:
    """Threads, seed and device of this worker. Bit-identical reruns on one machine: batches are a function of
    (seed, step) (data.py); every worker runs the same fixed thread count (cfg["threads"]), so CPU reductions split
    the same way; the teacher is frozen and run in eval mode (no dropout, its MoE routing/index_add is a pure
    function of the input on CPU); ranks only pick data slices, and all ranks run identical code, so which process
    gets which rank does not matter on one node; a 2-worker gloo/NCCL all-reduce sums a + b, which is commutative
    (more workers: a ring order fixed by rank). `train_worker` adds deterministic kernels where PyTorch has a choice
    (CUDA index_add/scatter in the MoE forward, cuBLAS workspace), warning instead of failing where it has none."""
    import ray.train.torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(worker_seed(cfg["seed"], rank))
    return ray.train.torch.get_device()


def load_sharded_teacher(load: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """The teacher FSDP-sharded (fully_shard, forward only) over the process group. Ranks take turns: each loads the
    whole teacher on the host (`load`), keeps its shard on `device` and frees the rest before the next rank loads,
    so the host holds one teacher at a time, not one per worker. Each decoder layer's weights are gathered for its
    forward and freed after it; the decoder is the root (its embedding and norm stay gathered between forwards).
    The LM head, which the chunked loss calls outside the forward, is left out and replicated on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # collective: every rank, before the turns
    teacher = None
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            teacher = load()
            decoder = lm_head.decoder(teacher)
            head = teacher.get_output_embeddings()
            for layer in decoder.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(decoder, mesh=mesh, ignored_params=set(head.parameters()))
            head.to(device)
        dist.barrier()
    return teacher


def _load_teacher(cfg: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Replicated on `device`, or FSDP-sharded where the memory plan found no room for it next to the student."""
    if cfg.get("shard_teacher"):
        return load_sharded_teacher(
            lambda: load_frozen(cfg["teacher_dir"], dtype, torch.device("cpu"), cfg["teacher_top_k"]), device)
    return load_frozen(cfg["teacher_dir"], dtype, device, cfg["teacher_top_k"])


def build_worker(cfg: dict, rank: int, world: int, device: torch.device) -> Worker:
    """Teacher (unless its logits are cached), student wrapped for DDP/FSDP, AdamW on a warmup + cosine schedule."""
    import ray.train.torch
    from transformers import AutoModelForCausalLM

    progress = cfg.get("progress") if rank == 0 else None
    teacher = None if cfg["cached_logits"] else _load_teacher(cfg, run_dtype(device), device)
    cached = CachedTeacher(cfg["cached_logits"]) if cfg["cached_logits"] else None
    student = AutoModelForCausalLM.from_pretrained(cfg["student_dir"], dtype=torch.float32, local_files_only=True)
    freeze(student, cfg["freeze"])
    if cfg.get("activation_checkpointing"):  # before DDP/FSDP wrap it (transformers 5: gradient_checkpointing_enable)
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    objective = ray.train.torch.prepare_model(Objective(student, cfg), parallel_strategy=cfg["strategy"])
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine_lr(s, cfg["steps"], cfg["warmup_steps"], cfg["min_lr_ratio"]))
    return Worker(cfg, rank, world, device, teacher, cached, objective, params, optimizer, scheduler, progress)


def _full_state():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def resume(w: Worker) -> tuple[int, list, dict]:
    """(first step to train, loss history so far, held-out KLs so far): from the last reported checkpoint of this
    run, if any."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, [], {}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        history = json.loads((Path(d) / HISTORY).read_text())
        heldout = json.loads((Path(d) / HELDOUT).read_text())
    set_model_state_dict(w.objective, state["model"], options=_full_state())
    set_optimizer_state_dict(w.objective, w.optimizer, state["optimizer"], options=_full_state())
    w.scheduler.load_state_dict(state["scheduler"])
    return state["step"], history, heldout


def heldout_kl_sums(w: Worker, rows: np.ndarray) -> torch.Tensor:
    """(KL(teacher || student) at T = 1 summed over tokens, tokens) of this rank's share of `rows` (rows
    rank::world, in micro-batches of the training size), float64 on the worker's device. A DDP/FSDP forward is a
    collective, so every rank runs as many forwards as the largest share has batches (a rank out of rows runs row 0
    and drops it). The online teacher is the one the worker holds; with cached logits the teacher is loaded for this
    measure only (in its run dtype on the device, as `build_worker` would) and freed."""
    cfg = w.cfg
    teacher = w.teacher if w.teacher is not None else _load_teacher(cfg, run_dtype(w.device), w.device)
    size = cfg["global_batch"] // (w.world * cfg["accum"])
    mine = np.arange(w.rank, len(rows), w.world)
    sums = torch.zeros(2, dtype=torch.float64, device=w.device)
    w.objective.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16) if w.cuda else nullcontext():
        for b in range(math.ceil(math.ceil(len(rows) / w.world) / size)):
            idx = mine[b * size:(b + 1) * size]
            ids = torch.from_numpy(rows[idx if len(idx) else [0]].astype(np.int64)).to(w.device)
            total = w.objective(ids, _online_target(teacher, ids), None)
            if len(idx):
                sums[0] += total.double()
                sums[1] += ids.numel()
    w.objective.train()
    if w.teacher is None:
        del teacher
        if w.cuda:
            torch.cuda.empty_cache()
    return sums


def heldout_kl(w: Worker, rows: np.ndarray) -> float:
    """Mean per-token KL(teacher || student) at T = 1 over `rows` (moe2dense.heldout.kl's definition), measured by
    all ranks on their devices: `heldout_kl_sums` all-reduced (a 2-rank sum is commutative: the same bits on every
    rank and rerun)."""
    sums = heldout_kl_sums(w, rows)
    if w.world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def train_step(w: Worker, rows: np.ndarray, step: int) -> float:
    """One optimizer step over this rank's micro-batches of `step`; the loss averaged over all ranks (6 decimals)."""
    cfg, accum = w.cfg, w.cfg["accum"]
    micro = worker_micro_rows(step, cfg["global_batch"], len(rows), cfg["seed"], w.rank, w.world, accum)
    step_loss = torch.zeros((), device=w.device)
    for a, idx in enumerate(micro):
        ids = torch.from_numpy(rows[idx].astype(np.int64)).to(w.device)
        target = w.cached.target(idx, cfg["temperature"], w.device) if w.cached else _timed_target(w, ids)
        sync = a == accum - 1 or not hasattr(w.objective, "no_sync")
        with (nullcontext() if sync else w.objective.no_sync()):
            with torch.autocast("cuda", dtype=torch.bfloat16) if w.cuda else nullcontext():
                loss = w.objective(ids, target, _labels(ids)) / accum
            loss.backward()
        step_loss += loss.detach()
    torch.nn.utils.clip_grad_norm_(w.params, cfg["grad_clip"])
    w.optimizer.step()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)
    if w.world > 1:
        dist.all_reduce(step_loss)
        step_loss /= w.world
    return round(float(step_loss), 6)


def checkpoint_and_report(w: Worker, step: int, history: list, heldout: dict, metrics: dict) -> None:
    """Every rank gathers the full state (a collective under FSDP) and reports `metrics` with the held-out KLs so
    far; rank 0 also writes the checkpoint (student, optimizer, scheduler, steps done, loss history, held-out
    KLs)."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(w.objective, options=_full_state())
    optim_state = get_optimizer_state_dict(w.objective, w.optimizer, options=_full_state())
    with tempfile.TemporaryDirectory() as d:
        if w.rank == 0:
            torch.save({"model": model_state, "optimizer": optim_state, "scheduler": w.scheduler.state_dict(),
                        "step": step}, Path(d) / STATE)
            (Path(d) / HISTORY).write_text(json.dumps(history))
            (Path(d) / HELDOUT).write_text(json.dumps(heldout))
        metrics = {**metrics, **{f"heldout_kl_{k}": v for k, v in heldout.items()}}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if w.rank == 0 else None)


def train_worker(cfg: dict) -> None:
    """Ray Train's train_loop_per_worker: set up, resume (a fresh run measures the held-out KL first), then per
    step train, tell the driver's progress bar (rank 0), and every `checkpoint_every` steps (and at the last, after
    measuring the held-out KL again) checkpoint and report."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = setup_worker(cfg, rank)
    with deterministic_algorithms(cfg.get("deterministic", True), warn_only=True, cuda=device.type == "cuda",
                                  fill_uninitialized_memory=True):
        w = build_worker(cfg, rank, world, device)
        start, history, heldout = resume(w)
        rows = open_rows(cfg["train_rows"])  # a memory map: no copy of the training split per worker
        eval_rows = open_rows(cfg["eval_rows"])[:cfg["eval_limit"]]
        if start == 0:
            heldout = {"before": heldout_kl(w, eval_rows)}
            if w.progress is not None:
                w.progress.actor.put_nowait.remote({"heldout_kl_before": heldout["before"],
                                                    "eval_tokens": int(eval_rows.size)})
        tokens_per_step = cfg["global_batch"] * rows.shape[1]
        trained_tokens, t0 = 0, time.perf_counter()
        if w.progress is not None:
            w.progress.actor.put_nowait.remote({"start_tokens": start * tokens_per_step})  # fire and forget
        for step in range(start, cfg["steps"]):
            loss = train_step(w, rows, step)
            trained_tokens += tokens_per_step
            history.append([step + 1, (step + 1) * tokens_per_step, loss])
            if w.progress is not None:
                w.progress.actor.put_nowait.remote({"tokens": history[-1][1], "loss": loss})
            last = step + 1 == cfg["steps"]
            if (step + 1) % cfg["checkpoint_every"] == 0 or last:
                seconds = time.perf_counter() - t0
                tokens_per_s = trained_tokens / seconds if seconds > 0 else 0.0
                if last:
                    heldout["after"] = heldout_kl(w, eval_rows)
                checkpoint_and_report(w, step + 1, history, heldout, {
                    "step": step + 1, "loss": loss, "resumed_from": start, "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_device": tokens_per_s / world,
                    "mfu": mfu(cfg["trained_params"], tokens_per_s, peak_flops(device), world),
                    "teacher_tokens_per_s": w.teacher_tokens / w.teacher_seconds if w.teacher_seconds else 0.0})


def student_state_from_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[dict, list]:
    """The trained student's weights (names as in the student's own state_dict) and the loss history."""
    state = torch.load(Path(checkpoint_dir) / STATE, map_location="cpu", weights_only=True)
    prefix = "student."
    model = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    return model, json.loads((Path(checkpoint_dir) / HISTORY).read_text())
