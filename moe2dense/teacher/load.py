"""Loading the recorded teacher for inference (calibration, later distillation and evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe2dense.checkpoint import DTYPES
from moe2dense.teacher.source import teacher_checkpoint, validate_checkpoint_dir


def resolve_device(device: str, key: str = "calibrate.device") -> torch.device:
    """auto -> cuda when present, else cpu; `key` names the param in the error."""
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"{key} {device!r}: choose auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key}: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"{key} {device!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def run_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen teacher runs in on `device`: bf16 on CUDA (the dtype real checkpoints are stored in; half
    the memory of fp32), fp32 on CPU (CPU bf16 matmuls are slow, and the CPU demo's outputs stay as they were)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_frozen(path: str | Path, dtype: torch.dtype, device: torch.device, top_k: int | None = None):
    """The checkpoint at `path`, offline, frozen (no grads) in eval mode on `device`; `top_k` routes each token to
    that many experts instead of its trained k (distill.teacher_top_k, the paper's Eq. 6)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if top_k is not None:
        config.num_experts_per_tok = top_k
    # device_map: the weights go straight to `device` (no whole copy on the host first when it is a GPU)
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, device_map=device,
                                                 local_files_only=True)
    return model.eval().requires_grad_(False)


def load_teacher(teacher_dir: str | Path = "models/teacher", dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "auto", top_k: int | None = None):
    """The teacher stage's output (or where its pointer leads), validated, then `load_frozen`."""
    path = teacher_checkpoint(teacher_dir)  # a teacher moved since the teacher stage fails here, naming both
    validate_checkpoint_dir(path)  # a truncated shard or missing config key: one line, before from_pretrained
    return load_frozen(path, DTYPES[dtype] if isinstance(dtype, str) else dtype,
                       resolve_device(device) if isinstance(device, str) else device, top_k)


def teacher_config(teacher_dir: str | Path = "models/teacher"):
    """The teacher's config, after validate_checkpoint_dir: calibrate calls this first, so a moved, truncated or
    incomplete teacher fails in a second with the file named, before any weight is loaded."""
    from transformers import AutoConfig

    path = teacher_checkpoint(teacher_dir)
    validate_checkpoint_dir(path)
    return AutoConfig.from_pretrained(str(path), local_files_only=True)
