"""Distillation losses between a teacher and a student next-token distribution (docs/architecture.md,
"Distillation losses").

Every loss is a divergence on *bins*: per token, a teacher distribution p and a student distribution q over the same
B bins, given as fp32 log-probs `log_p, log_q` of shape [T, B]; a loss returns the per-token value [T] (summed over
bins). Bins are the vocabulary for a dense teacher (logits [T, V]), or, for a `SparseTarget` (the teacher's top-N
log-probs, as a cached teacher stores them), the N support tokens plus one "rest" bin; see `bins`.

`chunked_kd_loss` computes the loss from the student's final hidden states and LM head in token chunks, so the
[T, V] fp32 logits never exist at once, neither in forward nor in backward (the approach of fused linear
cross-entropy kernels); `full_kd_loss` is the naive reference that materialises them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from moe2dense import methods as M

#: Floor on the teacher's rest-bin mass when the top-N support does not cover the vocabulary. Top-N log-probs of a
#: peaked distribution can sum to 1 after rounding (rest mass 0), which would make reverse-type losses infinite as
#: soon as the student puts any mass outside the support; 1e-6 is above the rounding error of fp32 log-probs (~1e-7)
#: and far below any rest mass that matters for the loss value.
REST_FLOOR = 1e-6


@dataclass(frozen=True)
class SparseTarget:
    """The teacher's top-N next-token log-probs at the distillation temperature: indices [T, N] (long, distinct per
    row), logprobs [T, N] (float32)."""

    indices: Tensor
    logprobs: Tensor

    def __post_init__(self):
        if self.indices.shape != self.logprobs.shape or self.indices.dim() != 2:
            raise ValueError(f"SparseTarget: indices {tuple(self.indices.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must both be [T, N]")


#: A teacher target: dense logits [T, V] or a sparse top-N target.
Target = Union[Tensor, SparseTarget]


@dataclass(frozen=True)
class Loss:
    """A registered divergence on bins; its options model (names, defaults, ranges) is its method-table entry."""

    name: str
    fn: Callable[..., Tensor]  # fn(log_p, log_q, **options) -> Tensor[T]
    options: type[M.Options]

    def bind(self, options: dict[str, float] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """`fn` with its options resolved (defaults overridden by `options`); unknown names or values out of range
        raise ValueError."""
        merged = M.options("loss", self.name, options).model_dump()
        return lambda log_p, log_q: self.fn(log_p, log_q, **merged)


LOSSES: dict[str, Loss] = {}


def register_loss(name: str):
    """Register `fn(log_p, log_q, **options) -> Tensor[T]` as the table's loss `name`."""
    entry = M.get("loss", name)

    def deco(fn):
        if name in LOSSES:
            raise ValueError(f"distillation loss {name!r} is already registered")
        LOSSES[name] = Loss(name, fn, entry.options)
        return fn

    return deco


def get_loss(name: str, options: dict[str, float] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The registered loss `name` with `options` bound: a function (log_p, log_q) -> Tensor[T]."""
    M.get("loss", name)
    return LOSSES[name].bind(options)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per token, with 0 log 0 = 0: a bin with a = 0 contributes 0 and gets a zero (not NaN) gradient."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b), computed in log space (two-term logsumexp) so small probabilities keep precision."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


@register_loss("forward_kl")
def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q): mass-covering; the paper's choice."""
    return _kl(log_p, log_q)


@register_loss("reverse_kl")
def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q || p): mode-seeking."""
    return _kl(log_q, log_p)


@register_loss("jsd")
def jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; finite for any p, q."""
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


@register_loss("skew_forward_kl")
def skew_forward_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM): bounded by log(1/alpha), so low-q bins cannot blow up."""
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


@register_loss("skew_reverse_kl")
def skew_reverse_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """KL(q || alpha q + (1 - alpha) p) (DistiLLM)."""
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


@register_loss("akl")
def akl(log_p: Tensor, log_q: Tensor, mu: float) -> Tensor:
    """Adaptive KL (Wu et al. 2024): forward and reverse KL weighted by the student's gap on the teacher's head
    (the fewest most-probable bins reaching teacher mass mu) vs its tail. The weights carry no gradient."""
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
        gap = (p - q).abs().gather(-1, order)
        head = p_sorted.cumsum(-1) - p_sorted < mu  # the mass before the bin is short of mu (true for the first)
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total, 0.5)
    return w_head * _kl(log_p, log_q) + (1 - w_head) * _kl(log_q, log_p)


@register_loss("tv")
def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """0.5 sum |p - q|: bounded in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


M.check_registry("loss", LOSSES)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """fp32 log_softmax(logits / temperature), without a [T, V] copy for the division at temperature 1."""
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


def bins(student_logits: Tensor, teacher: Target, temperature: float) -> tuple[Tensor, Tensor]:
    """(log_p, log_q), fp32 [T, B], at `temperature`.

    Dense teacher logits [T, V]: B = V, both sides log_softmax(logits / temperature).
    `SparseTarget` (already at the temperature): the N support tokens, plus, when N < V, one rest bin holding the
    teacher's remaining mass r = 1 - sum exp(logprobs) (floored at REST_FLOOR) and the student's mass outside the
    support (a logsumexp over the non-support logits, exact even when the support holds almost all the mass). With
    N = V the loss is exactly the dense one; otherwise it is the divergence between both distributions coarsened
    to (support tokens, rest), which for the f-divergences (every loss here but akl, whose weights depend on the
    binning) is a lower bound on the dense value (data-processing inequality).
    """
    log_q = _log_softmax(student_logits, temperature)
    if isinstance(teacher, Tensor):
        return _log_softmax(teacher, temperature), log_q
    log_p = teacher.logprobs.float()
    q_support = log_q.gather(-1, teacher.indices)
    if teacher.indices.shape[-1] == log_q.shape[-1]:
        return log_p, q_support
    rest = (1.0 - teacher.logprobs.double().exp().sum(-1)).clamp_min(REST_FLOOR).log().float()
    outside = log_q.scatter(-1, teacher.indices, -math.inf)
    return (torch.cat([log_p, rest[:, None]], dim=-1),
            torch.cat([q_support, torch.logsumexp(outside, dim=-1, keepdim=True)], dim=-1))


def _kd(loss: str, temperature: float, options: dict[str, float] | None) -> Callable[[Tensor, Target], Tensor]:
    """Validated (student_logits, teacher) -> per-token loss [T] x temperature**2."""
    fn = get_loss(loss, options)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return lambda logits, teacher: fn(*bins(logits, teacher, temperature)) * temperature ** 2


def kd_loss(student_logits: Tensor, teacher: Target, *, loss: str = "forward_kl", temperature: float = 1.0,
            options: dict[str, float] | None = None) -> Tensor:
    """Per-token distillation loss [T], times temperature**2 (Hinton) so gradients keep their magnitude as the
    temperature softens both distributions."""
    return _kd(loss, temperature, options)(student_logits, teacher)


TokenObjective = Callable[[Tensor, Target, Union[Tensor, None]], Tensor]


def _objective(loss: str, temperature: float, options: dict[str, float] | None, labels: Tensor | None,
               ce_weight: float, ignore_index: int) -> TokenObjective:
    """Validate the arguments once and return objective(logits, target, labels) -> Tensor[c]: the per-token
    (1 - ce_weight) kd + ce_weight CE, 0 on ignored tokens. CE is on the raw logits (temperature 1)."""
    kd = _kd(loss, temperature, options)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 mixes in cross-entropy on the labels, but labels is None")

    def objective(logits: Tensor, target: Target, chunk_labels: Tensor | None) -> Tensor:
        out = kd(logits, target)
        if ce_weight > 0:
            ce = F.cross_entropy(logits, chunk_labels, ignore_index=ignore_index, reduction="none")
            out = (1 - ce_weight) * out + ce_weight * ce
        return out if chunk_labels is None else torch.where(chunk_labels != ignore_index, out, 0.0)

    return objective


def _n_tokens(hidden: Tensor, labels: Tensor | None, ignore_index: int) -> Tensor:
    return torch.tensor(hidden.shape[0], device=hidden.device) if labels is None else (labels != ignore_index).sum()


HeadTransform = Union[Callable[[Tensor], Tensor], None]


def _student_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: HeadTransform = None) -> Tensor:
    """fp32 logits, also inside an autocast region (which would otherwise run the matmul in half precision), then the
    family's post-head map (moe2dense.lm_head.transform: Granite's scaling, Gemma's soft-cap), if any."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        return logits if transform is None else transform(logits)


def full_kd_loss(hidden: Tensor, head_weight: Tensor, teacher_chunk: Callable[[int, int], Target], *,
                 loss: str = "forward_kl", temperature: float = 1.0, options: dict[str, float] | None = None,
                 labels: Tensor | None = None, ce_weight: float = 0.0, chunk_tokens: int = 1024,
                 ignore_index: int = -100, head_bias: Tensor | None = None,
                 head_transform: HeadTransform = None) -> Tensor:
    """`chunked_kd_loss` computed naively with all [T, V] logits at once (plain autograd): the reference for tests
    and the memory benchmark. `chunk_tokens` is accepted for signature parity and unused."""
    objective = _objective(loss, temperature, options, labels, ce_weight, ignore_index)
    with torch.no_grad():
        target = teacher_chunk(0, hidden.shape[0])
    per_token = objective(_student_logits(hidden, head_weight, head_bias, head_transform), target, labels)
    return per_token.sum() / _n_tokens(hidden, labels, ignore_index)


class _ChunkedKD(torch.autograd.Function):
    """Loss and all its input gradients computed chunk by chunk in forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_chunk, objective, labels, chunk_tokens, n_tokens, grad_enabled,
                transform):
        need_h, need_w, need_b = (need and grad_enabled for need in ctx.needs_input_grad[:3])
        w = weight.detach().float().requires_grad_(need_w)  # one fp32 leaf: its .grad accumulates over chunks
        b = None if bias is None else bias.detach().float().requires_grad_(need_b)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            target = teacher_chunk(start, end)  # Function.forward runs under no_grad
            h = hidden[start:end].detach().float().requires_grad_(need_h)
            with torch.enable_grad():
                chunk_loss = objective(_student_logits(h, w, b, transform), target,
                                       None if labels is None else labels[start:end]).sum()
            if chunk_loss.requires_grad:
                chunk_loss.backward()  # frees this chunk's [c, V] buffers before the next chunk
            if need_h:
                grad_h[start:end] = h.grad
            total += chunk_loss.detach()
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grads = (grad_h, w.grad, None if b is None else b.grad)
        ctx.save_for_backward(*(None if g is None else g / n_tokens for g in grads))
        return (total / n_tokens).float()

    @staticmethod
    def backward(ctx, grad_output):
        grads = (None if g is None else (g * grad_output).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


def chunked_kd_loss(hidden: Tensor, head_weight: Tensor, teacher_chunk: Callable[[int, int], Target], *,
                    loss: str = "forward_kl", temperature: float = 1.0, options: dict[str, float] | None = None,
                    labels: Tensor | None = None, ce_weight: float = 0.0, chunk_tokens: int = 1024,
                    ignore_index: int = -100, head_bias: Tensor | None = None,
                    head_transform: HeadTransform = None) -> Tensor:
    """Scalar mean over tokens with label != ignore_index (all when labels is None) of
    (1 - ce_weight) * kd_loss + ce_weight * cross_entropy, from the student's final hidden states [T, H] and LM head
    [V, H] (+ bias [V]), then `head_transform` (the family's post-head map, moe2dense.lm_head).
    `teacher_chunk(start, end)` gives the teacher target for tokens [start, end), dense logits
    or `SparseTarget`; it is called once per chunk, under no_grad (an online teacher can run its head there).

    Memory: only [chunk_tokens, V] logits exist at a time, in forward and backward alike; the gradients w.r.t.
    hidden, head_weight and head_bias are computed in forward (fp32, returned in the input dtypes), so the backward
    pass is a multiply by grad_output. Under no_grad (evaluation) no gradient is computed.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    objective = _objective(loss, temperature, options, labels, ce_weight, ignore_index)
    return _ChunkedKD.apply(hidden, head_weight, head_bias, teacher_chunk, objective, labels, chunk_tokens,
                            _n_tokens(hidden, labels, ignore_index), torch.is_grad_enabled(), head_transform)
