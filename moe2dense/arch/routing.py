"""Pure routing: router logits -> (p_t, S_t, g_t), identical to what the transformers router applies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import RouterSpec


@dataclass(frozen=True)
class Routing:
    """probs: p_t over all E experts [T, E]; index: S_t [T, k]; weights: g_{t,e} applied to each selected expert's
    output (input where the RouterSpec says scales_input) [T, k], routed_scaling_factor included. Rows of
    index/weights are ordered by selection score."""

    probs: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class RouterParams:
    """The config-dependent numbers a `RouterSpec` needs; n_group None means plain (greedy) top-k."""

    top_k: int
    renorm: bool
    scale: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    renorm_min: float | None = None  # renormalise by clamp(sum, min=renorm_min) instead of sum + 1e-20 (ernie4_5_moe)


def route_logits(
    logits: torch.Tensor,
    spec: RouterSpec,
    params: RouterParams,
    bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
) -> Routing:
    """Route [T, E] logits. gpt_oss (top-k on logits, softmax over the k) is the softmax path with renorm: the
    softmax is monotonic and softmax over the k equals the renormalised top-k of the full softmax."""
    logits = logits.float()
    probs = logits.softmax(-1) if spec.score == "softmax" else logits.sigmoid()
    choice = logits if spec.topk_on == "logits" else probs
    if bias is not None:
        choice = choice + bias.float()
    if params.n_group:
        choice = _limit_to_groups(choice, spec.group_score, params.n_group, params.topk_group)
    index = choice.topk(params.top_k, dim=-1).indices
    weights = probs.gather(1, index)
    if params.renorm and params.renorm_min is not None:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=params.renorm_min)
    elif params.renorm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # deepseek_v3's epsilon; a no-op elsewhere
    if expert_scale is not None:  # gemma4_text's per_expert_scale, after renormalisation
        weights = weights * expert_scale.float()[index]
    return Routing(probs=probs, index=index, weights=weights * params.scale)


def _limit_to_groups(choice: torch.Tensor, group_score: str | None, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (to -inf) every expert outside the `topk_group` best of `n_group` contiguous expert groups."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_group, experts // n_group)
    if group_score == "max":
        scores = grouped.max(-1).values
    elif group_score == "top2_sum":
        scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        raise ValueError(f"router has no group scoring but n_group={n_group} was given")
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(topk_group, dim=-1).indices, True)
    return choice.masked_fill(~keep.repeat_interleave(experts // n_group, dim=1), float("-inf"))
