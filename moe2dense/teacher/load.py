"""Loading the recorded teacher for inference (calibration, later distillation and evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe2dense.teacher.source import teacher_checkpoint, validate_checkpoint_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_teacher(teacher_dir: str | Path = "models/teacher", dtype: str = "float32", device: str = "auto"):
    """The frozen teacher in eval mode on `device`, loaded offline from the stage output (or where it points)."""
    from transformers import AutoModelForCausalLM

    path = teacher_checkpoint(teacher_dir)  # a teacher moved since the teacher stage fails here, naming both
    validate_checkpoint_dir(path)  # a truncated shard or missing config key: one line, before from_pretrained
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    model.requires_grad_(False)
    return model.to(resolve_device(device)).eval()


def teacher_config(teacher_dir: str | Path = "models/teacher"):
    """The teacher's config, after validate_checkpoint_dir: calibrate calls this first, so a moved, truncated or
    incomplete teacher fails in a second with the file named, before any weight is loaded."""
    from transformers import AutoConfig

    path = teacher_checkpoint(teacher_dir)
    validate_checkpoint_dir(path)
    return AutoConfig.from_pretrained(str(path), local_files_only=True)
