"""Grouping registry (K selected experts -> k groups) and merging (one expert per group).

Definitions: docs/architecture.md, "Methods". A grouping method is a similarity among the K selected experts plus a
clustering rule; what it reads and how it clusters are its entry in the method table (moe2dense/methods.py), so the
caller gathers only that input (the Gram matrix, for one, needs the expensive all-experts calibration pass).
Clustering is deterministic, so a rerun gives the same dense model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform
from torch import Tensor

from . import methods as M
from .arch.experts import ExpertWeights
from .scoring import cosine_from_gram

#: Where each input a grouping may read (fields of `GroupInputs`) comes from, for error messages.
INPUT_SOURCES = {
    "expert_weights": "the selected experts' weights, read from the teacher",
    "gram": "the all-experts calibration pass, which calibrate runs when group.method needs it or when you "
            "add acp or do_acp to score.methods",
    "router_weight": "the layer's router weight, read from the teacher",
    "coselect": "the routing capture (see `coselection_counts`)",
}
assert set(INPUT_SOURCES) == set(M.INPUT_CAPTURE)

#: Distances closer than this count as equal, so float rounding (e.g. of duplicate experts) cannot break ties.
TIE_TOL = 1e-12

_WEIGHT_FIELDS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")  # the tensors of an ExpertWeights


@dataclass(frozen=True)
class GroupInputs:
    """What a grouping method may read for one layer. experts: the K selected ids, best first."""

    experts: list[int]
    gram: Tensor | None = None  # (E, E) sum_t f_i . f_j over calibration tokens (float64)
    router_weight: Tensor | None = None  # (E, H) router rows
    coselect: Tensor | None = None  # (E, E) tokens where i and j are both selected; diagonal = selection counts
    expert_weights: Mapping[int, ExpertWeights] | None = None  # the selected experts' weights


@dataclass(frozen=True)
class Grouper:
    name: str
    needs: str  # one of INPUT_SOURCES
    clustering: str  # one of CLUSTERINGS
    similarity_fn: Callable[[GroupInputs], Tensor]  # -> (K, K) similarity among inputs.experts


# ---------------------------------------------------------------- clustering (on positions 0..K-1 = ranks)
def _first_min(values: np.ndarray) -> int:
    """Index of the first value within TIE_TOL of the minimum: row-major order makes it the best-ranked tie."""
    return int(np.flatnonzero(values <= values.min() + TIE_TOL)[0])


def average_linkage(sim: np.ndarray, k: int) -> list[list[int]]:
    """Agglomerative clustering, average linkage (UPGMA) on distance 1 - sim, stopped at k clusters: scipy's
    linkage, whose first K - k merges are replayed (a cut by height could leave fewer than k clusters on ties)."""
    K = len(sim)
    if k >= K:
        return [[i] for i in range(K)]
    tree = linkage(squareform(1.0 - np.asarray(sim, dtype=np.float64), checks=False), method="average")
    members = {i: [i] for i in range(K)}
    for step, (a, b) in enumerate(tree[:K - k, :2].astype(int)):
        members[K + step] = members.pop(a) + members.pop(b)
    return sorted(sorted(m) for m in members.values())


def centres(sim: np.ndarray, k: int) -> list[list[int]]:
    """The k best experts are centres; every other one joins its most similar centre (ties: the better one)."""
    groups = [[c] for c in range(k)]
    for j in range(k, len(sim)):
        groups[_first_min(-sim[j, :k])].append(j)
    return groups


CLUSTERINGS: dict[str, Callable[[np.ndarray, int], list[list[int]]]] = {
    "average_linkage": average_linkage,
    "centres": centres,
}


# ---------------------------------------------------------------- similarities
GROUPERS: dict[str, Grouper] = {}


def register_grouping(name: str):
    """Register `fn(inputs) -> Tensor[K, K]` (similarity among inputs.experts) as the table's grouping `name`."""
    entry = M.get("grouping", name)

    def deco(fn):
        if name in GROUPERS:
            raise ValueError(f"grouping method {name!r} is already registered")
        GROUPERS[name] = Grouper(name, entry.reads, entry.clustering, fn)
        return fn

    return deco


def _submatrix(m: Tensor, experts: list[int]) -> Tensor:
    idx = torch.as_tensor(experts, device=m.device)
    return m[idx][:, idx]


@register_grouping("weight")
def weight_similarity(inputs: GroupInputs) -> Tensor:
    """Cosine of the flattened, concatenated weights, from a Gram summed field by field: never holds all K
    experts as one float64 (K, 3IH) matrix."""
    ws = inputs.expert_weights
    if missing := [e for e in inputs.experts if e not in ws]:
        raise ValueError(f"grouping method 'weight': expert_weights lacks experts {missing}")
    for e in inputs.experts[1:]:
        _check_same_layout(ws[inputs.experts[0]], ws[e])
    gram = 0
    for name in _WEIGHT_FIELDS:
        parts = [getattr(ws[e], name) for e in inputs.experts]
        if parts[0] is not None:
            x = torch.stack([p.reshape(-1).to(torch.float64) for p in parts])
            gram = gram + x @ x.T
    return cosine_from_gram(gram)


@register_grouping("output")
def output_similarity(inputs: GroupInputs) -> Tensor:
    return cosine_from_gram(_submatrix(inputs.gram, inputs.experts))


@register_grouping("router")
def router_similarity(inputs: GroupInputs) -> Tensor:
    rows = inputs.router_weight[torch.as_tensor(inputs.experts, device=inputs.router_weight.device)]
    rows = rows.to(torch.float64)
    return cosine_from_gram(rows @ rows.T)


@register_grouping("dominant")
def dominant_similarity(inputs: GroupInputs) -> Tensor:
    return output_similarity(inputs)


@register_grouping("coactivation")
def coactivation_similarity(inputs: GroupInputs) -> Tensor:
    """Cosine of the experts' binary selection indicators over tokens."""
    return cosine_from_gram(_submatrix(inputs.coselect, inputs.experts))


GROUP_METHODS = M.names("grouping")
M.check_registry("grouping", GROUPERS)


def _grouper(method: str) -> Grouper:
    M.get("grouping", method)  # unknown name: the table's error, naming the allowed ones
    return GROUPERS[method]


def required_input(method: str) -> str:
    """The `GroupInputs` field `method` reads."""
    return _grouper(method).needs


def group_experts(method: str, inputs: GroupInputs, k: int) -> list[list[int]]:
    """Split inputs.experts (K ids, best first) into k groups of expert ids.

    Each group lists its members best first; groups are ordered by their best member. K == k is pure pruning:
    singletons, nothing computed, so no inputs are needed.
    """
    grouper = _grouper(method)
    experts = list(inputs.experts)
    K = len(experts)
    if len(set(experts)) != K:
        raise ValueError(f"grouping: selected experts must be distinct, got {experts}")
    if not 1 <= k <= K:
        raise ValueError(f"grouping: need 1 <= k <= K = {K} selected experts, got k = {k}")
    if k == K:
        return [[e] for e in experts]
    if getattr(inputs, grouper.needs) is None:
        raise ValueError(f"grouping method {method!r} needs {grouper.needs!r}, which was not provided; it comes "
                         f"from {INPUT_SOURCES[grouper.needs]}")
    sim = grouper.similarity_fn(inputs)
    if tuple(sim.shape) != (K, K):
        raise ValueError(f"grouping method {method!r}: similarity has shape {tuple(sim.shape)}, expected {(K, K)}")
    if nan := torch.isnan(sim).nonzero().tolist():
        pairs = [(experts[i], experts[j]) for i, j in nan[:5]]
        raise ValueError(f"grouping method {method!r}: NaN similarity between experts {pairs} (check {grouper.needs})")
    groups = CLUSTERINGS[grouper.clustering](sim.cpu().numpy(), k)
    return [[experts[i] for i in g] for g in sorted(groups)]


# ---------------------------------------------------------------- merging
def merge_weights(scores: Sequence[float]) -> list[float]:
    """Member weights of one group, proportional to their (non-negative) merge scores. All-zero scores carry no
    preference, so they give the uniform average rather than 0/0."""
    if not scores:
        raise ValueError("merge_weights: a group has at least one member")
    if not all(s >= 0 for s in scores):  # also rejects NaN
        raise ValueError(f"merge_weights: scores must be non-negative, got {list(scores)}")
    total = float(sum(scores))
    if total == 0:
        return [1.0 / len(scores)] * len(scores)
    return [float(s) / total for s in scores]


def _check_same_layout(reference: ExpertWeights, other: ExpertWeights) -> None:
    """Experts can only be aligned or averaged tensor by tensor: same shapes, same biases present."""
    for name in _WEIGHT_FIELDS:
        a, b = getattr(reference, name), getattr(other, name)
        if (a is None) != (b is None):
            raise ValueError(f"experts differ in {name}: one has it and the other is None")
        if a is not None and a.shape != b.shape:
            raise ValueError(f"experts differ in {name} shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def _neuron_features(w: ExpertWeights) -> Tensor:
    """[I, F] unit rows: each intermediate neuron's gate row, up row, down column (and gate/up biases)."""
    parts = [t for t in (w.gate, w.up, w.down.T) if t is not None]  # up-only experts have no gate
    parts += [b[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    feat = torch.cat([p.to(torch.float64) for p in parts], dim=1)
    return feat / feat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def align_to(reference: ExpertWeights, other: ExpertWeights) -> ExpertWeights:
    """`other` with its intermediate neurons permuted to best match `reference`'s (weight matching).

    Neurons of an SwiGLU expert are interchangeable, so averaging two experts neuron by neuron only makes sense
    after matching them: the assignment maximising the summed cosine of neuron features (Hungarian algorithm).
    Gate/up rows, down columns and gate/up biases move together, so f_other is unchanged up to float summation
    order.
    """
    _check_same_layout(reference, other)
    cost = -(_neuron_features(reference) @ _neuron_features(other).T)
    _, perm = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.as_tensor(perm, device=other.up.device)
    return replace(
        other,
        gate=None if other.gate is None else other.gate[perm],
        up=other.up[perm],
        down=other.down[:, perm],
        gate_bias=None if other.gate_bias is None else other.gate_bias[perm],
        up_bias=None if other.up_bias is None else other.up_bias[perm],
    )


def _weighted_average(tensors: list[Tensor | None], weights: list[float]) -> Tensor | None:
    if tensors[0] is None:
        return None
    dtype = tensors[0].dtype
    acc = torch.promote_types(dtype, torch.float32)  # bf16 sums lose bits: accumulate in at least float32
    return sum(w * t.to(acc) for w, t in zip(weights, tensors)).to(dtype)


def merge_experts(
    members: Sequence[ExpertWeights], weights: Sequence[float], align: bool = False
) -> ExpertWeights:
    """Weighted average of the members' gate, up, down and biases (weights normalised by `merge_weights`).

    members[0] is the group's best expert: with `align` every other member is first aligned to it, and its
    activation parameters are kept. One member is returned unchanged (same tensors), weights ignored.
    """
    if not members:
        raise ValueError("merge_experts: a group has at least one member")
    first = members[0]
    if len(members) == 1:
        return first
    if len(weights) != len(members):
        raise ValueError(f"merge_experts: {len(members)} members but {len(weights)} weights")
    w = merge_weights(weights)
    for m in members[1:]:
        _check_same_layout(first, m)
    if align:
        members = [first] + [align_to(first, m) for m in members[1:]]
    return replace(first, **{n: _weighted_average([getattr(m, n) for m in members], w) for n in _WEIGHT_FIELDS})


def coselection_counts(batches: Iterable[np.ndarray | Tensor], num_experts: int) -> Tensor:
    """(E, E) float64 co-selection counts from batches of selected ids [n, k]: A_ij = rows holding both i and j,
    A_ii = rows holding i. One one-hot matmul per batch (a row repeating an id still counts once)."""
    counts = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for batch in batches:
        # Arrow-backed arrays are read-only: copy as int64 (the cast copies anyway) instead of wrapping them.
        ids = torch.from_numpy(np.array(batch, dtype=np.int64)) if isinstance(batch, np.ndarray) \
            else torch.as_tensor(batch).to(device="cpu", dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError(f"coselection_counts: expected selected ids of shape [n, k], got {tuple(ids.shape)}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < num_experts):
            raise ValueError(f"coselection_counts: expert ids must lie in [0, {num_experts}), "
                             f"got {int(ids.min())}..{int(ids.max())}")
        onehot = torch.zeros(ids.shape[0], num_experts, dtype=torch.float64).scatter_(1, ids, 1.0)
        counts += onehot.T @ onehot
    return counts


__all__ = [
    "CLUSTERINGS",
    "GROUPERS",
    "GROUP_METHODS",
    "INPUT_SOURCES",
    "GroupInputs",
    "Grouper",
    "align_to",
    "average_linkage",
    "centres",
    "coselection_counts",
    "cosine_from_gram",
    "group_experts",
    "merge_experts",
    "merge_weights",
    "register_grouping",
    "required_input",
]
