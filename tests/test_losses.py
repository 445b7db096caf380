"""Distillation losses: hand-computed closed forms, sparse (top-N) targets, chunked == naive, argument errors."""
from __future__ import annotations

import math
from math import log

import pytest
import torch

from moe2dense.distill.losses import (LOSSES, SparseTarget, chunked_kd_loss, full_kd_loss, get_loss, kd_loss)

# Pair A has a teacher zero (0 log 0 = 0; reverse KL is infinite there); pair B is strictly positive.
P_A, Q_A = [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]
P_B, Q_B = [0.7, 0.2, 0.1], [0.5, 0.1, 0.4]

FKL_B = 0.7 * log(0.7 / 0.5) + 0.2 * log(0.2 / 0.1) + 0.1 * log(0.1 / 0.4)
RKL_B = 0.5 * log(0.5 / 0.7) + 0.1 * log(0.1 / 0.2) + 0.4 * log(0.4 / 0.1)

HAND = {  # (loss, options, p, q) -> value, each worked out on paper
    ("forward_kl", None, "A"): 0.5 * log(0.5 / 0.25) * 2,
    ("reverse_kl", None, "A"): math.inf,
    # m = [0.375, 0.375, 0.25]
    ("jsd", None, "A"): 0.5 * (2 * 0.5 * log(0.5 / 0.375))
                        + 0.5 * (2 * 0.25 * log(0.25 / 0.375) + 0.5 * log(0.5 / 0.25)),
    # m = 0.1 p + 0.9 q = [0.275, 0.275, 0.45]
    ("skew_forward_kl", None, "A"): 2 * 0.5 * log(0.5 / 0.275),
    # m = 0.1 q + 0.9 p = [0.475, 0.475, 0.05]
    ("skew_reverse_kl", None, "A"): 2 * 0.25 * log(0.25 / 0.475) + 0.5 * log(0.5 / 0.05),
    ("tv", None, "A"): 0.5 * (0.25 + 0.25 + 0.5),
    ("forward_kl", None, "B"): FKL_B,
    ("reverse_kl", None, "B"): RKL_B,
    # m = [0.6, 0.15, 0.25]
    ("jsd", None, "B"): 0.5 * (0.7 * log(0.7 / 0.6) + 0.2 * log(0.2 / 0.15) + 0.1 * log(0.1 / 0.25))
                        + 0.5 * (0.5 * log(0.5 / 0.6) + 0.1 * log(0.1 / 0.15) + 0.4 * log(0.4 / 0.25)),
    # beta 0.3: m = 0.3 p + 0.7 q = [0.56, 0.13, 0.31]
    ("jsd", (("beta", 0.3),), "B"): 0.3 * (0.7 * log(0.7 / 0.56) + 0.2 * log(0.2 / 0.13) + 0.1 * log(0.1 / 0.31))
                                    + 0.7 * (0.5 * log(0.5 / 0.56) + 0.1 * log(0.1 / 0.13) + 0.4 * log(0.4 / 0.31)),
    # m = 0.1 p + 0.9 q = [0.52, 0.11, 0.37]
    ("skew_forward_kl", None, "B"): 0.7 * log(0.7 / 0.52) + 0.2 * log(0.2 / 0.11) + 0.1 * log(0.1 / 0.37),
    # alpha 0.5: m = [0.6, 0.15, 0.25]
    ("skew_forward_kl", (("alpha", 0.5),), "B"):
        0.7 * log(0.7 / 0.6) + 0.2 * log(0.2 / 0.15) + 0.1 * log(0.1 / 0.25),
    # m = 0.1 q + 0.9 p = [0.68, 0.19, 0.13]
    ("skew_reverse_kl", None, "B"): 0.5 * log(0.5 / 0.68) + 0.1 * log(0.1 / 0.19) + 0.4 * log(0.4 / 0.13),
    # mu 0.5: head = {bin 0} (teacher mass 0.7 >= 0.5), g_head = 0.2; tail = {1, 2}, g_tail = 0.1 + 0.3 = 0.4
    ("akl", None, "B"): (0.2 / 0.6) * FKL_B + (0.4 / 0.6) * RKL_B,
    # mu 0.8: head = {0, 1} (0.7 < 0.8, then 0.9), g_head = 0.2 + 0.1 = 0.3 = g_tail -> equal weights
    ("akl", (("mu", 0.8),), "B"): 0.5 * FKL_B + 0.5 * RKL_B,
    # mu 0.95: the head takes every bin (mass before bin 2 is 0.9 < 0.95), g_tail = 0 -> forward KL
    ("akl", (("mu", 0.95),), "B"): FKL_B,
    ("tv", None, "B"): 0.5 * (0.2 + 0.1 + 0.3),
}
PAIRS = {"A": (P_A, Q_A), "B": (P_B, Q_B)}


def _logs(*dists: list[float]) -> list[torch.Tensor]:
    return [torch.tensor([d], dtype=torch.float64).log().float() for d in dists]


@pytest.mark.parametrize("key", list(HAND), ids=lambda k: f"{k[0]}-{k[2]}{'-' + str(k[1]) if k[1] else ''}")
def test_hand_values(key):
    name, options, pair = key
    log_p, log_q = _logs(*PAIRS[pair])
    got = get_loss(name, dict(options or ()))(log_p, log_q)
    assert got.shape == (1,)
    if math.isinf(HAND[key]):
        assert got.item() == math.inf
    else:
        assert got.item() == pytest.approx(HAND[key], abs=1e-6)


def test_every_loss_has_a_hand_value():
    assert {name for name, _, _ in HAND} == set(LOSSES)


@pytest.mark.parametrize("name", list(LOSSES))
def test_identical_distributions_give_zero_and_finite_grads(name):
    (log_p,) = _logs(P_A)
    log_q = log_p.clone().requires_grad_()
    out = get_loss(name)(log_p, log_q)
    assert out.item() == pytest.approx(0.0, abs=1e-7)
    out.sum().backward()  # the p = q = 0 bin must not poison the gradient (0 log 0 = 0)
    finite = torch.isfinite(log_q)
    assert torch.isfinite(log_q.grad[finite]).all()


def test_forward_kl_nonnegative_and_jsd_symmetric():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(64, 11, generator=g), -1)
    log_q = torch.log_softmax(3 * torch.randn(64, 11, generator=g), -1)
    assert (get_loss("forward_kl")(log_p, log_q) >= 0).all()
    jsd = get_loss("jsd")
    torch.testing.assert_close(jsd(log_p, log_q), jsd(log_q, log_p), atol=1e-6, rtol=0)
    assert (jsd(log_p, log_q) <= log(2) + 1e-6).all()  # JSD(0.5) is bounded by log 2


def test_gradient_is_finite_where_the_teacher_has_zeros():
    log_p, log_q = _logs(P_A, Q_A)
    log_q.requires_grad_()
    get_loss("forward_kl")(log_p, log_q).sum().backward()
    torch.testing.assert_close(log_q.grad, -torch.tensor([P_A]))  # d/d log q of -sum p log q


def test_temperature_scales_by_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for name in LOSSES:
        raw = get_loss(name)(torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1))
        torch.testing.assert_close(kd_loss(s, t, loss=name, temperature=2.0), 4 * raw)
    # T = 1: the plain loss on the softmaxes
    plain = get_loss("forward_kl")(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    torch.testing.assert_close(kd_loss(s, t), plain)


# --- sparse (top-N) targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOSSES))
def test_sparse_target_covering_the_vocabulary_is_exact(name):
    g = torch.Generator().manual_seed(2)
    T, V, temp = 6, 13, 1.7
    student, teacher = 2 * torch.randn(T, V, generator=g), 2 * torch.randn(T, V, generator=g)
    order = torch.stack([torch.randperm(V, generator=g) for _ in range(T)])  # any order of the support
    sparse = SparseTarget(order, torch.log_softmax(teacher / temp, -1).gather(-1, order))
    losses = []
    for target in (teacher, sparse):
        s = student.clone().requires_grad_()
        value = kd_loss(s, target, loss=name, temperature=temp)
        value.sum().backward()
        losses.append((value, s.grad))
    (dense, g_dense), (top, g_top) = losses
    torch.testing.assert_close(top, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_top, g_dense, atol=1e-6, rtol=0)


def test_sparse_target_accounts_for_the_rest_bin():
    # V = 4, student q = [0.1, 0.2, 0.3, 0.4]; teacher top-2 = {token 2: 0.4, token 0: 0.3}, rest r = 0.3.
    # Bins (token 2, token 0, rest): p = [0.4, 0.3, 0.3], q = [0.3, 0.1, 0.2 + 0.4].
    student = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    target = SparseTarget(torch.tensor([[2, 0]]), torch.tensor([[0.4, 0.3]]).log())
    expected = {
        "forward_kl": 0.4 * log(0.4 / 0.3) + 0.3 * log(0.3 / 0.1) + 0.3 * log(0.3 / 0.6),
        "reverse_kl": 0.3 * log(0.3 / 0.4) + 0.1 * log(0.1 / 0.3) + 0.6 * log(0.6 / 0.3),
        "tv": 0.5 * (0.1 + 0.2 + 0.3),
    }
    for name, value in expected.items():
        assert kd_loss(student, target, loss=name).item() == pytest.approx(value, abs=1e-6)


def test_sparse_target_whose_mass_rounds_to_one_keeps_reverse_kl_finite():
    # Top-2 log-probs summing to 1 (rest rounds to 0) while the student has mass outside the support.
    student = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    target = SparseTarget(torch.tensor([[0, 1]]), torch.tensor([[0.75, 0.25]]).log())
    for name in LOSSES:
        assert torch.isfinite(kd_loss(student, target, loss=name)).all(), name


# --- chunked == naive --------------------------------------------------------------------------------------------

T_TOK, HID, VOCAB, TEMP = 37, 16, 50, 1.5


def _problem(dtype, sparse_n):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(T_TOK, HID, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, HID, generator=g) / HID ** 0.5).to(dtype)
    bias = (0.1 * torch.randn(VOCAB, generator=g)).to(dtype)
    teacher_logits = 2 * torch.randn(T_TOK, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (T_TOK,), generator=g)
    labels[[0, 7, 8, 36]] = -100
    if sparse_n is None:
        return hidden, weight, bias, lambda s, e: teacher_logits[s:e], labels
    top = torch.log_softmax(teacher_logits / TEMP, -1).topk(sparse_n, -1)
    return hidden, weight, bias, lambda s, e: SparseTarget(top.indices[s:e], top.values[s:e]), labels


def _value_and_grads(fn, hidden, weight, bias, teacher_chunk, **kw):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    value = fn(leaves[0], leaves[1], teacher_chunk, head_bias=leaves[2], temperature=TEMP, **kw)
    value.backward()
    return value, [t.grad for t in leaves]


def _check_chunked(name, dtype, target, chunks, variants):
    hidden, weight, bias, teacher_chunk, labels = _problem(dtype, None if target == "dense" else 8)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for kw in variants(labels):
        ref, ref_grads = _value_and_grads(full_kd_loss, hidden, weight, bias, teacher_chunk, loss=name, **kw)
        for chunk in chunks:
            got, grads = _value_and_grads(chunked_kd_loss, hidden, weight, bias, teacher_chunk, loss=name,
                                          chunk_tokens=chunk, **kw)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, ref, **tol)
            for g, r, like in zip(grads, ref_grads, (hidden, weight, bias)):
                assert g.dtype == like.dtype
                torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("target", ["dense", "sparse"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_matches_full_for_every_loss(name, target):
    """fp32, labels with ignored tokens and a CE mix; chunk 8 does not divide 37 tokens."""
    _check_chunked(name, torch.float32, target, (8,), lambda labels: [dict(labels=labels, ce_weight=0.3)])


@pytest.mark.parametrize("target", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_full_for_any_chunk_size(dtype, target):
    _check_chunked("forward_kl", dtype, target, (1, 8, 37, 64),
                   lambda labels: [dict(), dict(labels=labels), dict(labels=labels, ce_weight=0.3)])


def test_chunked_mean_runs_over_kept_tokens_and_scales_by_grad_output():
    hidden, weight, _, teacher_chunk, labels = _problem(torch.float32, None)
    keep = labels != -100
    h = hidden.clone().requires_grad_()
    value = chunked_kd_loss(h, weight, teacher_chunk, labels=labels, chunk_tokens=8)
    (3 * value).backward()
    kept_teacher = teacher_chunk(0, T_TOK)[keep]
    h_kept = hidden[keep].clone().requires_grad_()
    ref = full_kd_loss(h_kept, weight, lambda s, e: kept_teacher[s:e])  # the naive loss on the kept rows only
    ref.backward()
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(h.grad[keep], 3 * h_kept.grad)
    assert (h.grad[~keep] == 0).all()


def test_logits_stay_fp32_under_autocast():
    hidden, weight, _, teacher_chunk, _ = _problem(torch.float32, None)
    ref = full_kd_loss(hidden, weight, teacher_chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_kd_loss(hidden, weight, teacher_chunk, chunk_tokens=8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_teacher_is_called_once_per_chunk_without_grad():
    hidden, weight, _, teacher_chunk, _ = _problem(torch.float32, None)
    calls = []

    def recording(start, end):
        calls.append((start, end, torch.is_grad_enabled()))
        return teacher_chunk(start, end)

    chunked_kd_loss(hidden.requires_grad_(), weight, recording, chunk_tokens=16).backward()
    assert calls == [(0, 16, False), (16, 32, False), (32, 37, False)]


def test_no_gradient_work_under_no_grad(monkeypatch):
    hidden, weight, _, teacher_chunk, _ = _problem(torch.float32, None)
    ref = full_kd_loss(hidden, weight, teacher_chunk)
    backward_calls = []
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: backward_calls.append(a))
    with torch.no_grad():
        got = chunked_kd_loss(hidden.requires_grad_(), weight.requires_grad_(), teacher_chunk, chunk_tokens=8)
    torch.testing.assert_close(got, ref)
    assert got.grad_fn is None and not backward_calls


# --- errors ------------------------------------------------------------------------------------------------------

def test_errors():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="forward_kl"):  # lists the registered losses
        kd_loss(s, t, loss="kl")
    with pytest.raises(ValueError, match=r"allowed: \['beta'\]"):
        kd_loss(s, t, loss="jsd", options={"alpha": 0.1})
    with pytest.raises(ValueError, match="allowed: \\[\\]"):
        kd_loss(s, t, options={"beta": 0.5})
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="jsd beta: Input should be (greater|less) than"):
            kd_loss(s, t, loss="jsd", options={"beta": beta})
    hidden, weight = torch.randn(2, 3, requires_grad=True), torch.randn(5, 3)
    for fn in (chunked_kd_loss, full_kd_loss):
        with pytest.raises(ValueError, match="labels is None"):
            fn(hidden, weight, lambda a, b: t[a:b], ce_weight=0.3)
        with pytest.raises(ValueError, match="'nope' is not a known loss method; choose one of forward_kl"):
            fn(hidden, weight, lambda a, b: t[a:b], loss="nope")
