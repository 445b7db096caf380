"""What the two training loops share (the demo teacher's, moe2dense/teacher/demo.py, and distillation's,
moe2dense/distill/loop.py): the learning-rate schedule and the deterministic-kernels switch."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch


def warmup_cosine_lr(step: int, total: int, warmup: int, min_ratio: float, lr: float = 1.0) -> float:
    """The learning rate at 0-based `step` of `total`: linear warmup lr * (step + 1) / warmup, then a half cosine
    from lr down to min_ratio * lr at step `total`. The demo teacher sets this as the lr of each step; distillation
    passes lr = 1 to torch's LambdaLR, which multiplies base_lr by it. The two differ in the last bit at some warmup
    steps (lr * (s + 1) / w vs lr * ((s + 1) / w)), and each run keeps the arithmetic it was trained with.

    Not transformers' get_cosine_with_min_lr_schedule_with_warmup: its warmup is step / warmup (lr 0 at step 0); its
    `_lr_rate` variant has our warmup but reaches the floor one step earlier (tests/test_training.py shows both)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@contextmanager
def deterministic_algorithms(enabled: bool = True, *, warn_only: bool = False, cuda: bool = False,
                             fill_uninitialized_memory: bool = False):
    """torch.use_deterministic_algorithms(enabled, warn_only=warn_only) for the block, the caller's settings restored
    after. `cuda` also fixes cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG, read when the handle is created, so it is
    set for the process and not undone) and turns cuDNN's autotuner off.

    `fill_uninitialized_memory` (torch's NaN fill of every new uninitialized tensor under deterministic mode) only
    guards kernels that read memory they never wrote: none on the demo teacher's CPU path (its identical-weights test
    would catch one), where it was ~8% of a profiled training step; distillation keeps torch's default (on)."""
    import torch.utils.deterministic as det

    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    if enabled and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    det.fill_uninitialized_memory = fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]
        torch.backends.cudnn.benchmark = prev[3]
