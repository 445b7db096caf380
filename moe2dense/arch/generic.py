"""The generic path: a `FamilySpec` discovered by duck typing for a model_type that has no written spec, and the
on-the-spot checks without which it converts nothing.

Discovery (config only, on the meta device): every decoder layer must hold a block with an `experts` child that
transformers' `use_experts_implementation` decorator marked (its flags give the `ExpertLayout`), one router child
with a weight [E, H], and optionally a SwiGLU shared expert (with a [1, H] sigmoid gate). The routing rule cannot be
read from code, so the common one is assumed: softmax over E, top-k, renormalised iff config.norm_topk_prob.
The dense student is the teacher's own class with one always-on expert; discovery checks that the class builds one.

Verification (`verify_teacher`, before calibration writes anything): on real tokens, every MoE block's output must
equal sum_e g_e f_e(x) + shared under the assumed rule, with the model's router and again with the router zeroed
(uniform probe). `verify_student`, before the student leaves its temp dir: the reloaded student's MLP equals the
concatenated dense MLP. Any mismatch is an UnsupportedModelError naming the model_type, what differed and the
supported families.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

from .errors import UnsupportedModelError
from .experts import FUSED
from .spec import ExpertLayout, FamilySpec

# Config fields that may hold E and the routed expert's I, tried in order; the tensor shapes decide which one.
_E_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_I_FIELDS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
VERIFY_TOKENS = 64  # tokens of the first calibration row that the teacher check runs on
_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # relative to max(1, |block output|); half precision: 5e-2
_HALF_RTOL = 5e-2


@dataclass(frozen=True)
class _Layers:
    """is_moe_layer for a discovered spec: the layer indices found to hold the MoE block."""

    layers: frozenset[int]

    def __call__(self, config: PreTrainedConfig, layer: int) -> bool:
        return layer in self.layers


def refuse(model_type: object, why: str) -> UnsupportedModelError:
    from .registry import SUPPORTED_MODEL_TYPES  # registry imports this module

    return UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family ({why}); supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


_CACHE: dict[str, FamilySpec] = {}


def discover_spec(config: PreTrainedConfig) -> FamilySpec:
    """The spec of an MoE model_type without a written one, from its config alone (no weights); refuses with the
    supported list where the model does not have the structure the generic path can read."""
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        spec = _discover(config)
        _check_student_class(config, spec)
        _CACHE[key] = spec
    return _CACHE[key]


def spec_for_raw(raw: dict, source: object) -> FamilySpec:
    """`discover_spec` for a parsed config.json (the error names `source`)."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        err = refuse(model_type, "transformers has no such model_type")
        raise UnsupportedModelError(f"{source}: {err}") from None
    try:
        return discover_spec(CONFIG_MAPPING[model_type].from_dict(raw))
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{source}: {err}") from None


def _meta_model(config: PreTrainedConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - any failure to build means the generic path cannot read it
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise refuse(config.model_type, f"no causal LM builds from its config: {type(err).__name__}: {first}") from None


def _find_block(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in layer.named_children():
        if hasattr(getattr(child, "experts", None), "is_concatenated"):  # set by use_experts_implementation
            return name, child
    return None


def _discover(config: PreTrainedConfig) -> FamilySpec:
    from transformers.integrations.moe import _default_apply_gate

    mt = config.model_type
    model = _meta_model(config)
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise refuse(mt, "its base model has no `layers` list")
    found = {i: _find_block(layer) for i, layer in enumerate(layers)}
    moe = sorted(i for i, f in found.items() if f is not None)
    if not moe:
        raise refuse(mt, "no decoder layer holds an experts module marked by transformers' use_experts_implementation")
    names = {found[i][0] for i in moe}
    if len(names) != 1:
        raise refuse(mt, f"MoE blocks under different names {sorted(names)}")
    block_attr, block = found[moe[0]]
    # The other layers must hold a plain SwiGLU MLP under the same name (read and written as the dense layers).
    if odd := [i for i in found if found[i] is None and not _is_silu_mlp(getattr(layers[i], block_attr, None))]:
        raise refuse(mt, f"layers {odd} hold neither its MoE block nor a SwiGLU MLP as `{block_attr}`")
    experts = block.experts
    if not experts.has_gate or experts.has_post_expert_norm or type(experts)._apply_gate is not _default_apply_gate:
        raise refuse(mt, "its experts are not plain SwiGLU (no gate, a post-expert norm or a custom activation)")
    if not _is_silu(experts.act_fn):
        raise refuse(mt, f"its experts' activation {type(experts.act_fn).__name__} is not SiLU")
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise refuse(mt, "its experts have no 3-D gate_up_proj / down_proj")
    E, H = gate_up.shape[0], config.hidden_size
    I2 = gate_up.shape[2] if experts.is_transposed else gate_up.shape[1]
    layout = ExpertLayout(transposed=experts.is_transposed, interleaved=not experts.is_concatenated,
                          has_bias=experts.has_bias)
    if odd := sorted({n for n, _ in experts.named_parameters()} - set(FUSED if experts.has_bias else FUSED[:2])):
        raise refuse(mt, f"its experts hold tensors the generic path does not model: {odd}")
    shared_attr = next((n for n in _SHARED_NAMES if _is_silu_mlp(getattr(block, n, None))), None)
    shared_gate = f"{shared_attr}_gate" if shared_attr else None
    if shared_gate and not _weight_shaped(getattr(block, shared_gate, None), (1, H)):
        shared_gate = None
    known = {"experts", shared_attr, shared_gate}
    routers = [n for n, c in block.named_children() if n not in known and _weight_shaped(c, (E, H))]
    if len(routers) != 1:
        raise refuse(mt, f"its MoE block has {len(routers)} router candidates with a weight [{E}, {H}]")
    router_attr = routers[0]
    router_params = {n for n, _ in getattr(block, router_attr).named_parameters()} | {
        n for n, _ in getattr(block, router_attr).named_buffers()}
    extra = [n for n, _ in block.named_children() if n not in known | {router_attr}
             and any(True for _ in _tensors(getattr(block, n)))]
    extra += [n for n, _ in (*block.named_parameters(recurse=False), *block.named_buffers(recurse=False))]
    if extra or not router_params <= {"weight", "bias"}:
        raise refuse(mt, f"its MoE block holds what the generic path does not model: {extra or sorted(router_params)}")
    e_attr = next((f for f in _E_FIELDS if getattr(config, f, None) == E), None)
    i_attr = next((f for f in _I_FIELDS if getattr(config, f, None) == I2 // 2), None)
    if e_attr is None or i_attr is None or not isinstance(getattr(config, "num_experts_per_tok", None), int):
        raise refuse(mt, f"no config field gives its E={E} / I={I2 // 2} / num_experts_per_tok")
    prefix, projs, disk_block = _disk_expert_names(mt, block_attr)
    return FamilySpec(
        model_type=mt,
        dense_model_type=mt,
        num_experts_attr=e_attr,
        intermediate_attr=i_attr,
        is_moe_layer=_Layers(frozenset(moe)),
        renorm="norm_topk_prob" if hasattr(config, "norm_topk_prob") else False,  # assumed; verify_teacher checks
        layout=layout,
        block_attr=block_attr,
        router_attr=router_attr,
        disk_expert_prefix=prefix,
        disk_proj_names=projs,
        shared_attr=shared_attr,
        shared_gate_attr=shared_gate,
        disk_block_attr=disk_block,
        dense_mlp="in_class",
    )


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _weight_shaped(module: object, shape: tuple[int, ...]) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and tuple(w.shape) == shape


def _is_swiglu_mlp(module: object) -> bool:
    return isinstance(module, nn.Module) and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))


def _is_silu(act: object) -> bool:
    probe = torch.linspace(-3, 3, 7)
    return callable(act) and torch.allclose(act(probe), F.silu(probe))


def _is_silu_mlp(module: object) -> bool:
    """A dense SwiGLU MLP without biases (the shape the dense layers are read and written in)."""
    return _is_swiglu_mlp(module) and _is_silu(getattr(module, "act_fn", None)) and all(
        getattr(module, p).bias is None for p in ("gate_proj", "up_proj", "down_proj"))


def _disk_expert_names(model_type: str, block_attr: str) -> tuple[str | None, tuple[str, str, str], str | None]:
    """Per-expert on-disk names from transformers' own checkpoint conversion for the family (the converters that
    merge `experts.*.<gate>/<up>.weight` into gate_up_proj and `experts.*.<down>.weight` into down_proj); without
    such converters the family is stored fused. verify_teacher checks what is read against the loaded model."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    gate_up = down = disk_block = None
    per_expert = re.compile(r"experts\.\*\.(\w+)\.weight$")
    for t in get_checkpoint_conversion_mapping(model_type) or []:
        src = [s.replace("\\", "") for s in t.source_patterns]
        tgt = [s.replace("\\", "") for s in t.target_patterns]
        projs = [m.group(1) for s in src if (m := per_expert.search(s))]
        if len(tgt) == 1 and tgt[0].endswith("experts.gate_up_proj") and len(projs) == 2:
            gate_up = projs
        elif len(tgt) == 1 and tgt[0].endswith("experts.down_proj") and len(projs) == 1:
            down = projs[0]
        elif len(src) == len(tgt) == 1 and tgt[0].strip(".") == block_attr and re.fullmatch(r"\w+", src[0].strip(".")):
            disk_block = src[0].strip(".")  # mixtral-style ".block_sparse_moe." -> ".mlp."
    if gate_up is None or down is None:
        return None, ("gate_proj", "up_proj", "down_proj"), None
    return f"{disk_block or block_attr}.experts", (gate_up[0], gate_up[1], down), disk_block


def _check_student_class(config: PreTrainedConfig, spec: FamilySpec) -> None:
    """The dense student is this class with one expert (`dense_mlp="in_class"`): refuse unless the class then
    builds, in every layer, either the MoE block with a single expert or a plain SwiGLU MLP (jamba-like classes
    build the MLP when E is 1), so that every layer's dense MLP has a place to go."""
    from moe2dense.assemble import student_config  # assemble imports arch

    from .adapter import Adapter

    adapter = Adapter.from_config(spec, config)
    student = student_config(config, adapter, adapter.intermediate_size, torch.float32)
    teacher_block = type(getattr(_meta_model(config).base_model.layers[adapter.moe_layers[0]], spec.block_attr))
    for i, layer in enumerate(_meta_model(student).base_model.layers):
        block = getattr(layer, spec.block_attr, None)
        gate_up = getattr(getattr(block, "experts", None), "gate_up_proj", None)
        one_expert = type(block) is teacher_block and gate_up is not None and gate_up.shape[0] == 1
        if not (one_expert or _is_silu_mlp(block)):
            raise refuse(spec.model_type, f"its class with {spec.num_experts_attr}=1 builds neither a one-expert "
                                          f"{teacher_block.__name__} nor a SwiGLU MLP in layer {i}, so it has no "
                                          "dense student")


# ------------------------------------------------------------------------------------------------ verification
def _rtol(dtype: torch.dtype) -> float:
    return _RTOL.get(dtype, _HALF_RTOL)


def _reconstruct(model: nn.Module, adapter, layer: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_j g_{t,j} f_{S_t,j}(x_t) + shared, under the adapter's routing rule, in fp32."""
    from .experts import expert_forward

    routing = adapter.route(model, layer, logits)
    used = routing.index.unique()
    outputs = adapter.all_expert_outputs(model, layer, x, used).float()  # [U, T, H]
    pos = torch.searchsorted(used, routing.index)  # [T, k] rows of `outputs`
    tokens = torch.arange(x.shape[0], device=x.device)[:, None]
    y = (outputs[pos, tokens] * routing.weights[..., None]).sum(1)
    for shared in adapter.shared_experts(model, layer):
        y = y + (adapter.shared_gate(shared, x)[:, None] * expert_forward(shared.weights, x)).float()
    return y


def _differs(want: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> tuple[float, float] | None:
    """(max abs diff, tolerance) where they differ by more than the dtype's rtol of the output's scale (not of 1:
    a tiny model's outputs are ~1e-2, and a wrong rule must not hide under an absolute floor)."""
    diff = (want.float() - got.float()).abs().max().item()
    tol = _rtol(dtype) * max(want.float().abs().max().item(), torch.finfo(torch.float32).tiny)
    return None if diff <= tol else (diff, tol)


# Router probes run on the captured block inputs with the router's parameters set to factor * themselves
# (restored after): None = the real router; 0 = uniform (every expert scores the same); SHARPEN = logits with a
# standard deviation of SHARPEN_STD, where softmax, sigmoid and renormalised variants differ by O(1).
SHARPEN, SHARPEN_STD = "sharpened", 3.0


@torch.no_grad()
def verify_teacher(model: nn.Module, adapter, ids: torch.Tensor) -> None:
    """Refuse (UnsupportedModelError) unless every MoE block of the loaded teacher equals the adapter's
    reconstruction sum_e g_e f_e(x) + shared on the first `VERIFY_TOKENS` tokens of `ids` [B, S], with its real
    router, with the router zeroed (uniform probe) and with it sharpened; and the experts read from its checkpoint
    dir, if it has one, equal the loaded ones. Tokens whose k-th and (k+1)-th router probabilities are within
    rounding of each other are left out where the router is not uniform: there the model's dtype decides a tie."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids)[:1, :VERIFY_TOKENS].to(device)
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, kwargs, output):
            if len(args) != 1 or kwargs:  # the probes call the block on the hidden states alone
                raise refuse(adapter.model_type, f"its MoE block takes more than the hidden states ({len(args)} "
                                                 f"arguments, keywords {sorted(kwargs)})")
            seen[layer] = args[0].detach()
        return hook

    handles = [adapter.mlp(model, i).register_forward_hook(keep(i), with_kwargs=True) for i in adapter.moe_layers]
    was_training = model.training
    try:
        model.eval()
        model.base_model(input_ids=ids, use_cache=False)
        for layer in adapter.moe_layers:
            x = seen[layer].reshape(-1, seen[layer].shape[-1])
            for probe in (None, 0.0, SHARPEN):
                _probe(model, adapter, layer, x, probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    _verify_disk_experts(model, adapter)


def _probe(model: nn.Module, adapter, layer: int, x: torch.Tensor, probe: float | str | None) -> None:
    mt = adapter.model_type
    router = adapter.router_module(model, layer)
    saved = {n: p.detach().clone() for n, p in router.named_parameters(recurse=False)}
    try:
        if probe is not None:
            factor = probe
            if probe == SHARPEN:
                factor = SHARPEN_STD / max(adapter.router_logits(model, layer, x).std().item(), 1e-6)
            for p in router.parameters(recurse=False):
                p.data.mul_(factor)
        out = adapter.mlp(model, layer)(x[None])
        if isinstance(out, tuple):
            raise refuse(mt, f"its MoE block returns a tuple ({len(out)} items)")
        y = out.reshape(-1, x.shape[-1])
        logits = adapter.router_logits(model, layer, x)
        got = _reconstruct(model, adapter, layer, x, logits)
    finally:
        for n, p in router.named_parameters(recurse=False):
            p.data.copy_(saved[n])
    dtype = adapter.mlp(model, layer).experts.gate_up_proj.dtype
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if probe != 0.0 and adapter.top_k < adapter.num_experts:
        top = adapter.route(model, layer, logits).probs.topk(adapter.top_k + 1, dim=-1).values
        keep = (top[:, -2] - top[:, -1]) > 4 * torch.finfo(dtype).eps
    if bad := _differs(y[keep], got[keep], dtype):
        named = {None: "its own router", 0.0: "a uniform router (weights zeroed)"}.get(probe, "a sharpened router")
        raise refuse(mt, f"with {named}, the generic rule (softmax over {adapter.num_experts}, top-"
                         f"{adapter.top_k}, renormalised={adapter.renormalizes}) does not reproduce layer {layer}'s "
                         f"MoE block: max abs diff {bad[0]:.3g} > {bad[1]:.3g}")


def _verify_disk_experts(model: nn.Module, adapter) -> None:
    """The experts the pipeline will read from the checkpoint (names from the conversion mapping) are the loaded
    ones: otherwise assembly would merge the wrong tensors."""
    path = Path(getattr(model, "name_or_path", "") or "")
    if not (path.is_dir() and any(path.glob("*.safetensors"))):
        return
    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.teacher_weights import read_experts, read_router_weight

    layer, last = adapter.moe_layers[0], adapter.num_experts - 1
    with CheckpointReader(path) as reader:
        try:
            on_disk = read_experts(reader, adapter, layer, [0, last])
            router = read_router_weight(reader, adapter, layer)
        except KeyError as err:
            raise refuse(adapter.model_type, f"its experts or router are not where the generic path looks on disk: "
                                             f"{err}") from None
    loaded = adapter.router_module(model, layer).weight
    if router.shape != loaded.shape or not torch.equal(router.to(loaded.device, loaded.dtype), loaded):
        raise refuse(adapter.model_type, f"layer {layer}'s router read from {path} differs from the loaded model's")
    for e in (0, last):
        mem, disk = adapter.expert_weights(model, layer, e), on_disk[e]
        for name in ("gate", "up", "down"):
            a, b = getattr(mem, name), getattr(disk, name)
            if a.shape != b.shape or not torch.equal(b.to(a.device, a.dtype), a):
                raise refuse(adapter.model_type, f"expert {e}'s {name} read from {path} differs from the loaded "
                                                 "model's")


def with_verified_teacher(model: nn.Module, adapter, batches: Iterable) -> Iterable:
    """`batches` unchanged after `verify_teacher` ran on the first one (peeked, then put back)."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return []
    verify_teacher(model, adapter, first[0])

    def chained():
        yield first
        yield from it
    return chained()


@torch.no_grad()
def verify_student(out: Path, adapter, references: dict) -> None:
    """The student saved in `out` (its temp dir) loads in stock transformers with no missing or unexpected keys,
    and its MLP in each layer of `references` (layer -> the dense MLP assembled there, ExpertWeights) computes that
    MLP on random tokens."""
    from transformers import AutoModelForCausalLM

    from .experts import expert_forward

    mt = adapter.model_type
    dtype = next(iter(references.values())).gate.dtype
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        problems = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
        raise refuse(mt, f"its one-expert student does not reload cleanly: {problems}")
    student.eval()
    for layer, reference in references.items():
        x = torch.randn(16, reference.gate.shape[1], generator=torch.Generator().manual_seed(layer)).to(dtype)
        got = getattr(student.base_model.layers[layer], adapter.spec.block_attr)(x[None])
        got = (got[0] if isinstance(got, tuple) else got)[0]
        if bad := _differs(expert_forward(reference, x), got, dtype):
            raise refuse(mt, f"its reloaded one-expert student's layer {layer} differs from the dense MLP assembled "
                             f"there: max abs diff {bad[0]:.3g} > {bad[1]:.3g}")
