"""The training loops' shared helpers (moe2dense/training.py): the learning-rate schedule, pinned bit for bit to the
two schedules it replaced (the demo teacher's and distillation's), and the deterministic-kernels switch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.utils.deterministic as det

from moe2dense.training import deterministic_algorithms, warmup_cosine_lr

# (lr, steps, warmup, min_ratio): the demo teacher (params.yaml), the demo distillation, the smoke teacher, others.
SETTINGS = [(0.005, 390, 20, 0.1), (0.001, 97, 10, 0.1), (0.005, 32, 4, 0.1), (3e-3, 488, 20, 0.1),
            (1e-2, 60, 5, 0.1), (7e-4, 1000, 37, 0.03), (0.01, 5, 10, 0.0)]


def _demo_lr_before(step, total, lr, warmup, min_ratio):
    """teacher/demo.py's lr_at before the fold, verbatim."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _distill_factor_before(step, total, warmup, min_ratio):
    """distill/loop.py's lr_factor before the fold, verbatim."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lambda_lr_sequence(factor, lr, steps):
    """The lr the optimizer sees at each step under LambdaLR (as the distillation worker steps it)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("lr,total,warmup,min_ratio", SETTINGS)
def test_schedule_equals_both_old_schedules_bit_for_bit(lr, total, warmup, min_ratio):
    steps = range(total + 1)
    assert [warmup_cosine_lr(s, total, warmup, min_ratio, lr=lr) for s in steps] == \
        [_demo_lr_before(s, total, lr, warmup, min_ratio) for s in steps]
    assert [warmup_cosine_lr(s, total, warmup, min_ratio) for s in steps] == \
        [_distill_factor_before(s, total, warmup, min_ratio) for s in steps]
    assert _lambda_lr_sequence(lambda s: warmup_cosine_lr(s, total, warmup, min_ratio), lr, total) == \
        _lambda_lr_sequence(lambda s: _distill_factor_before(s, total, warmup, min_ratio), lr, total)


def test_the_two_arithmetics_differ_so_the_demo_keeps_lr_times_step_over_warmup():
    """Why `lr` is an argument: lr * (s + 1) / w (the demo teacher) and LambdaLR's lr * ((s + 1) / w) differ in the
    last bit at some steps of the demo's own settings; either form alone would change one run's weights."""
    lr, total, warmup = 0.005, 390, 20
    direct = [warmup_cosine_lr(s, total, warmup, 0.1, lr=lr) for s in range(warmup)]
    factored = [lr * warmup_cosine_lr(s, total, warmup, 0.1) for s in range(warmup)]
    assert direct != factored and direct == pytest.approx(factored, rel=1e-15)


def test_transformers_schedules_are_not_ours():
    """transformers' cosine-with-min-lr schedules (what we would have used): its warmup starts at lr 0, and its
    `_lr_rate` variant (our warmup) reaches the floor a step earlier. Should this ever pass through, switch."""
    from transformers.optimization import (get_cosine_with_min_lr_schedule_with_warmup,
                                           get_cosine_with_min_lr_schedule_with_warmup_lr_rate)

    lr, total, warmup = 0.001, 97, 10
    ours = _lambda_lr_sequence(lambda s: warmup_cosine_lr(s, total, warmup, 0.1), lr, total)
    for make in (get_cosine_with_min_lr_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup_lr_rate):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = make(opt, warmup, total, min_lr_rate=0.1)
        theirs = []
        for _ in range(total):
            theirs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert theirs != ours
    assert ours[0] == lr / warmup and ours[warmup] == lr


def test_deterministic_algorithms_sets_then_restores_the_callers_settings():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_algorithms(warn_only=True, fill_uninitialized_memory=True):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled() and det.fill_uninitialized_memory
            with deterministic_algorithms(False):  # nested: the demo bench's "off" setting
                assert not torch.are_deterministic_algorithms_enabled() and not det.fill_uninitialized_memory
            assert torch.are_deterministic_algorithms_enabled() and det.fill_uninitialized_memory
            raise RuntimeError("boom")
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory, torch.backends.cudnn.benchmark) == before


def test_cuda_fixes_cublas_workspace_and_turns_the_cudnn_autotuner_off(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with deterministic_algorithms(warn_only=True, cuda=True):
        assert not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # read when the cuBLAS handle is created: it stays
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
