"""Loading the recorded teacher for inference (calibration, later distillation and evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe2dense.teacher.source import teacher_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, key: str = "calibrate.device") -> torch.device:
    """auto -> cuda when present, else cpu; `key` names the param in the error when cuda is missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    return torch.device(device)


def load_teacher(teacher_dir: str | Path = "models/teacher", dtype: str = "float32", device: str = "auto"):
    """The frozen teacher in eval mode on `device`, loaded offline from the stage output (or where it points)."""
    from transformers import AutoModelForCausalLM

    path = teacher_checkpoint(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    model.requires_grad_(False)
    return model.to(resolve_device(device)).eval()


def teacher_config(teacher_dir: str | Path = "models/teacher"):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(teacher_checkpoint(teacher_dir)), local_files_only=True)
