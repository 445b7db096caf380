"""The distillation training loop that runs on every Ray Train worker.

Each worker holds the frozen teacher and a replica of the student (DDP; FSDP shards it). A step runs `accum`
micro-batches of the rows `data.worker_micro_rows` assigns, computes the chunked KD loss against the teacher's
next-token distribution (online teacher forward, or cached top-N log-probs), clips, steps AdamW on a warmup + cosine
schedule. Every `checkpoint_every` steps rank 0 writes (student, optimizer, step, loss history) and every rank calls
`ray.train.report`; a restarted worker group resumes from the last reported checkpoint at the next step, and since
batches are a function of the step alone, the resumed run trains on exactly the batches the uninterrupted one would.
After every step rank 0 puts (tokens, loss) in the driver's progress queue.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe2dense.distill.cache import CachedTeacher
from moe2dense.distill.data import load_rows, worker_micro_rows
from moe2dense.distill.losses import chunked_kd_loss

STATE = "state.pt"
HISTORY = "history.json"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_teacher(path: str, top_k: int | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The frozen teacher, optionally routing each token to `top_k` experts instead of its trained k (Eq. 6)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if top_k is not None:
        config.num_experts_per_tok = top_k
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def make_deterministic(cuda: bool) -> None:
    """Bit-identical reruns on one machine. What already holds by construction: batches are a function of
    (seed, step) (data.py); every worker runs the same fixed thread count (cfg["threads"]), so CPU reductions split
    the same way; the teacher is frozen and run in eval mode (no dropout, its MoE routing/index_add is a pure
    function of the input on CPU); ranks only pick data slices, and all ranks run identical code, so which process
    gets which rank does not matter on one node; a 2-worker gloo/NCCL all-reduce sums a + b, which is commutative
    (more workers: a ring order fixed by rank). What this adds: deterministic kernels where PyTorch has a choice
    (CUDA index_add/scatter in the MoE forward, cuBLAS workspace), warning instead of failing where it has none."""
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the cuBLAS handle is created
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


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

    def forward(self, ids: torch.Tensor, teacher_chunk, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
        head = self.student.get_output_embeddings()
        c = self.cfg
        return chunked_kd_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, teacher_chunk, loss=c["loss"],
                               temperature=c["temperature"], options=c["loss_options"], labels=labels.reshape(-1),
                               ce_weight=c["ce_weight"], chunk_tokens=c["chunk_tokens"], head_bias=head.bias)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _online_target(teacher: nn.Module, ids: torch.Tensor):
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state.reshape(-1, teacher.config.hidden_size)
    weight = teacher.get_output_embeddings().weight
    return lambda start, end: (hidden[start:end] @ weight.T).float()


def train_worker(cfg: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from transformers import AutoModelForCausalLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(worker_seed(cfg["seed"], rank))
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if cfg.get("deterministic", True):
        make_deterministic(cuda)
    progress = cfg.get("progress") if rank == 0 else None  # a ray.util.queue.Queue of the driver
    dtype = torch.bfloat16 if cuda else torch.float32

    teacher = None if cfg["cached_logits"] else load_teacher(cfg["teacher_dir"], cfg["teacher_top_k"], dtype, device)
    cached = CachedTeacher(cfg["cached_logits"]) if cfg["cached_logits"] else None
    student = AutoModelForCausalLM.from_pretrained(cfg["student_dir"], dtype=torch.float32, local_files_only=True)
    freeze(student, cfg["freeze"])
    student.train()
    objective = ray.train.torch.prepare_model(Objective(student, cfg), parallel_strategy=cfg["strategy"])
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg["steps"], cfg["warmup_steps"], cfg["min_lr_ratio"]))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / HISTORY).read_text())
        set_model_state_dict(objective, state["model"], options=full)
        set_optimizer_state_dict(objective, optimizer, state["optimizer"], options=full)
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]

    rows = load_rows(cfg["train_path"])
    seq_len = rows.shape[1]
    tokens_per_step = cfg["global_batch"] * seq_len
    accum = cfg["accum"]
    trained_tokens, t0 = 0, time.perf_counter()
    if progress is not None:
        progress.actor.put_nowait.remote({"start_tokens": start * tokens_per_step})  # fire and forget
    for step in range(start, cfg["steps"]):
        micro = worker_micro_rows(step, cfg["global_batch"], len(rows), cfg["seed"], rank, world, accum)
        step_loss = torch.zeros((), device=device)
        for a, idx in enumerate(micro):
            ids = torch.from_numpy(rows[idx].astype(np.int64)).to(device)
            target = cached.target(idx, cfg["temperature"], device) if cached else _online_target(teacher, ids)
            sync = a == accum - 1 or not hasattr(objective, "no_sync")
            with (nullcontext() if sync else objective.no_sync()):
                with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
                    loss = objective(ids, target, _labels(ids)) / accum
                loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        trained_tokens += tokens_per_step
        history.append([step + 1, (step + 1) * tokens_per_step, round(float(step_loss), 6)])
        if progress is not None:
            progress.actor.put_nowait.remote({"tokens": history[-1][1], "loss": history[-1][2]})
        last = step + 1 == cfg["steps"]
        if (step + 1) % cfg["checkpoint_every"] == 0 or last:
            seconds = time.perf_counter() - t0
            metrics = {"step": step + 1, "loss": history[-1][2], "resumed_from": start,
                       "tokens_per_s": trained_tokens / seconds if seconds > 0 else 0.0}
            model_state = get_model_state_dict(objective, options=full)  # collective under FSDP
            optim_state = get_optimizer_state_dict(objective, optimizer, options=full)
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                                "step": step + 1}, Path(d) / STATE)
                    (Path(d) / HISTORY).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def student_state_from_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[dict, list]:
    """The trained student's weights (names as in the student's own state_dict) and the loss history."""
    state = torch.load(Path(checkpoint_dir) / STATE, map_location="cpu", weights_only=True)
    prefix = "student."
    model = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    return model, json.loads((Path(checkpoint_dir) / HISTORY).read_text())
