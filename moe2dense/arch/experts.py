"""Expert weights in one canonical form, the expert function f_e, and the vectorised all-experts pass.

Canonical form (nn.Linear convention): gate, up [I, H]; down [H, I]; f(x) = down(act(gate(x), up(x))).
Up-only experts (nemotron_h, relu^2) have gate None: f(x) = down(act(up(x))).
Tensors taken from a model are detached views of its parameters: clone before modifying them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ExpertLayout

GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0
UP_ONLY_ACTS = ("relu2",)  # activations of MLPs without a gate projection


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    act: str = "swiglu"  # "swiglu": silu(gate) * up; "geglu_tanh", "relu2" (no gate), "gpt_oss_clamped": `activate`
    # gpt_oss_clamped parameters (config.swiglu_alpha / swiglu_limit), carried so f_e is self-contained.
    swiglu_alpha: float = GPT_OSS_ALPHA
    swiglu_limit: float = GPT_OSS_LIMIT


@dataclass(frozen=True)
class SharedExpert:
    weights: ExpertWeights
    gate_weight: torch.Tensor | None  # [H]: output scaled by sigmoid(x . gate_weight); None: ungated


def activate(act: str, gate: torch.Tensor | None, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    if act == "relu2":  # transformers' ReLUSquaredActivation
        return torch.square(F.relu(up))
    if act == "swiglu":
        return F.silu(gate) * up
    if act == "geglu_tanh":  # gemma's gelu_pytorch_tanh MLP
        return F.gelu(gate, approximate="tanh") * up
    if act == "gpt_oss_clamped":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    raise ValueError(f"unknown expert activation {act!r}")


def expert_forward(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) for x [T, H] -> [T, H], before the routing weight."""
    gate = None if w.gate is None else F.linear(x, w.gate, w.gate_bias)
    h = activate(w.act, gate, F.linear(x, w.up, w.up_bias), w.swiglu_alpha, w.swiglu_limit)
    return F.linear(h, w.down, w.down_bias)


MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def mlp_weights(mlp: nn.Module, proj_names: Sequence[str] = MLP_PROJ, act: str = "swiglu") -> ExpertWeights:
    """A dense MLP (gate_proj / up_proj / down_proj Linears, or `proj_names`; no gate_proj for the UP_ONLY_ACTS):
    shared experts and originally dense layers."""
    if act in UP_ONLY_ACTS:
        proj_names = [n for n in proj_names if n != "gate_proj"]
    projs = [getattr(mlp, n) for n in proj_names]
    return mlp_from_tensors([p.weight.detach() for p in projs], [_detach(p.bias) for p in projs], act)


def mlp_from_tensors(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                     act: str = "swiglu") -> ExpertWeights:
    """An MLP from its projections: (gate, up, down), (gate_up, down) with gate rows then up rows, or (up, down)
    for the UP_ONLY_ACTS."""
    if act in UP_ONLY_ACTS:
        return ExpertWeights(None, weights[0], weights[1], None, biases[0], biases[1], act=act)
    if len(weights) == 2:
        gate, up = weights[0].chunk(2, dim=0)
        gate_b, up_b = (None, None) if biases[0] is None else biases[0].chunk(2)
        weights, biases = (gate, up, weights[1]), (gate_b, up_b, biases[1])
    return ExpertWeights(*weights, *biases, act=act)


def split_gate_up(t: torch.Tensor, layout: ExpertLayout, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a fused gate/up tensor along `dim` (the 2I axis)."""
    if not layout.interleaved:
        return t.chunk(2, dim=dim)
    dim = dim % t.dim()
    lead = (slice(None),) * dim
    return t[(*lead, slice(0, None, 2))], t[(*lead, slice(1, None, 2))]


# Names of the fused expert tensors, identical as module attributes and as state-dict keys under "...experts.".
FUSED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
FUSED_UP_ONLY = ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias")  # layouts without gate


def fused_names(layout: ExpertLayout) -> tuple[str, ...]:
    names = FUSED if layout.has_gate else FUSED_UP_ONLY
    return names if layout.has_bias else names[:2]


def fused_expert(
    fused: dict[str, torch.Tensor], e: int, layout: ExpertLayout, act_params: tuple[float, float]
) -> ExpertWeights:
    """Expert e from the fused 3-D tensors (keyed by `fused_names(layout)`; biases only where the layout has
    them)."""
    gu_name, d_name, gu_bias, d_bias = (FUSED if layout.has_gate else FUSED_UP_ONLY)
    gu, d = fused[gu_name][e].detach(), fused[d_name][e].detach()
    if layout.transposed:
        gu, d = gu.T, d.T
    gate, up = split_gate_up(gu, layout, dim=0) if layout.has_gate else (None, gu)
    gate_b = up_b = down_b = None
    if layout.has_bias:
        b = fused[gu_bias][e].detach()
        gate_b, up_b = split_gate_up(b, layout, dim=0) if layout.has_gate else (None, b)
        down_b = fused[d_bias][e].detach()
    alpha, limit = act_params
    return ExpertWeights(gate, up, d, gate_b, up_b, down_b, act=layout.act, swiglu_alpha=alpha, swiglu_limit=limit)


def all_expert_outputs(
    fused: dict[str, torch.Tensor],
    x: torch.Tensor,
    layout: ExpertLayout,
    act_params: tuple[float, float],
    subset: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """f_e(x) for every expert (or `subset`) on every token x [T, H] -> [E', T, H].

    Two batched matmuls over the fused weights instead of E small ones; runs in the weights' dtype, as the model.
    """
    w = {n: t.detach() for n, t in fused.items()}
    if subset is not None:
        idx = torch.as_tensor(subset, dtype=torch.long, device=w["down_proj"].device)
        w = {n: t[idx] for n, t in w.items()}
    gu_name, d_name, gu_bias, d_bias = (FUSED if layout.has_gate else FUSED_UP_ONLY)
    gate_up, down = w[gu_name], w[d_name]
    h = torch.matmul(x.to(gate_up.dtype), gate_up if layout.transposed else gate_up.transpose(1, 2))  # [E', T, 2I]
    if layout.has_bias:
        h = h + w[gu_bias][:, None, :]
    h = activate(layout.act, *(split_gate_up(h, layout, dim=-1) if layout.has_gate else (None, h)), *act_params)
    out = torch.matmul(h, down if layout.transposed else down.transpose(1, 2))  # [E', T, H]
    return out + w[d_bias][:, None, :] if layout.has_bias else out


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


__all__ = [
    "FUSED",
    "FUSED_UP_ONLY",
    "UP_ONLY_ACTS",
    "ExpertWeights",
    "SharedExpert",
    "activate",
    "all_expert_outputs",
    "expert_forward",
    "fused_expert",
    "mlp_from_tensors",
    "fused_names",
    "mlp_weights",
    "split_gate_up",
]
