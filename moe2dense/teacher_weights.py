"""Read one MoE layer's router, experts, shared experts or dense MLP from a teacher checkpoint on disk.

Grouping and assembly go through here so that a teacher is never loaded whole: each call reads only the tensors it
names (for fused expert tensors, only the selected experts' rows) with `CheckpointReader`. Both on-disk layouts are
handled: per-expert keys as `save_pretrained` writes them, and fused 3-D tensors (gpt_oss, state-dict dumps). A
quantized teacher reads the same way: the reader dequantizes what it reads (moe2dense/quantized.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from moe2dense.arch import Adapter, ExpertWeights
from moe2dense.arch.experts import MLP_PROJ, UP_ONLY_ACTS, mlp_from_tensors
from moe2dense.checkpoint import CheckpointReader


def _block_prefixes(adapter: Adapter, layer: int) -> list[str]:
    spec = adapter.spec
    alias = [f"{adapter.disk_layer_prefix(layer)}.{spec.disk_block_attr}"] if spec.disk_block_attr else []
    return [adapter.block_path(layer, disk=True), *alias]


def _first_present(reader: CheckpointReader, candidates: Sequence[str], what: str) -> str:
    for name in candidates:
        if name in reader:
            return name
    raise KeyError(f"{what}: none of {list(candidates)} is in the checkpoint {reader.path}")


def read_router_weight(reader: CheckpointReader, adapter: Adapter, layer: int) -> torch.Tensor:
    """The router's rows (E, H)."""
    spec = adapter.spec
    proj = spec.router.proj_attr
    router = spec.router_attr + (f".{proj}" if proj else "")
    candidates = [f"{p}.{router}.weight" for p in _block_prefixes(adapter, layer)]
    if spec.disk_router_weight:
        candidates.append(f"{adapter.block_path(layer, disk=True)}.{spec.disk_router_weight}")
    return reader.read(_first_present(reader, candidates, f"router of layer {layer}"))


def read_experts(reader: CheckpointReader, adapter: Adapter, layer: int, experts: Sequence[int]
                 ) -> dict[int, ExpertWeights]:
    """The routed experts `experts` of `layer` in canonical form, reading nothing else of the layer."""
    ids = sorted(set(int(e) for e in experts))
    names = adapter.expert_tensor_names(layer, reader.keys())
    if names in adapter.fused_name_sets(layer):  # fused: read the selected rows and renumber them 0..len(ids)-1
        subset = {name: reader.read_rows(name, ids) for name in names}
        return {e: adapter.expert_weights_from_tensors(subset, layer, j) for j, e in enumerate(ids)}
    out = {}
    for e in ids:
        mapping = {name: reader.read(name) for name in adapter.per_expert_names(layer, e)}
        out[e] = adapter.expert_weights_from_tensors(mapping, layer, e)
    return out


def read_mlp(reader: CheckpointReader, prefix: str, proj_names: Sequence[str] = MLP_PROJ,
             act: str = "swiglu") -> ExpertWeights:
    """An MLP stored as `{prefix}.gate_proj/up_proj/down_proj.weight` (+ optional biases), or under `proj_names`
    (experts.mlp_from_tensors); up-only activations (relu2) have no gate_proj."""
    if act in UP_ONLY_ACTS:
        proj_names = [n for n in proj_names if n != "gate_proj"]
    weights, biases = [], []
    for proj in proj_names:
        weights.append(reader.read(_first_present(reader, [f"{prefix}.{proj}.weight"], f"MLP {prefix}")))
        bias = f"{prefix}.{proj}.bias"
        biases.append(reader.read(bias) if bias in reader else None)
    return mlp_from_tensors(weights, biases, act)


def _shared_prefix(adapter: Adapter, layer: int) -> str:
    spec = adapter.spec
    parent = adapter.disk_layer_prefix(layer) if spec.shared_in_layer else adapter.block_path(layer, disk=True)
    return f"{parent}.{spec.shared_attr}"


def read_shared_experts(reader: CheckpointReader, adapter: Adapter, layer: int) -> list[ExpertWeights]:
    """The layer's shared expert MLP (one module, however many shared experts it stands for), or []."""
    if adapter.spec.shared_attr is None:
        return []
    return [read_mlp(reader, _shared_prefix(adapter, layer), adapter.spec.shared_proj_names, adapter.spec.layout.act)]


def read_dense_mlp(reader: CheckpointReader, adapter: Adapter, layer: int) -> ExpertWeights:
    """The MLP of an originally dense layer (deepseek's first_k_dense_replace, qwen's mlp_only_layers)."""
    return read_mlp(reader, adapter.block_path(layer, disk=True), act=adapter.spec.layout.act)


def dense_mlp_width(reader: CheckpointReader, adapter: Adapter, layer: int) -> int:
    return reader.shape(f"{adapter.block_path(layer, disk=True)}.up_proj.weight")[0]


def shared_width(reader: CheckpointReader, adapter: Adapter, layer: int) -> int:
    if adapter.spec.shared_attr is None:
        return 0
    down = adapter.spec.shared_proj_names[-1]  # (H, width) in every shared layout
    return reader.shape(f"{_shared_prefix(adapter, layer)}.{down}.weight")[1]
