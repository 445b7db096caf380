"""`Adapter`: a `FamilySpec` bound to one config. The only class; every family goes through the same methods.

`model` arguments are the *ForCausalLM (or its base model); tensor-mapping key names are the *ForCausalLM ones
("model.layers.{i}...."), as in its state_dict() and in its safetensors files.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

from moe2dense import lm_head

from . import experts as X
from .errors import UnsupportedModelError
from .experts import ExpertWeights, SharedExpert
from .routing import RouterParams, Routing, route_logits
from .spec import FamilySpec


# RouterSpec.input_transform: what a router does to its input before its Linear, by the router module itself.
ROUTER_INPUTS = {
    # gemma4_text: unweighted RMSNorm, then a learnt per-channel scale and hidden_size**-0.5, in the model dtype
    "rms_scaled": lambda router, h: router.norm(h) * router.scale * router.scalar_root_size,
}


@dataclass(frozen=True)
class Adapter:
    spec: FamilySpec
    num_experts: int
    top_k: int
    num_layers: int
    intermediate_size: int
    moe_layers: list[int]
    dense_layers: list[int]
    router_params: RouterParams
    act_params: tuple[float, float]  # (swiglu_alpha, swiglu_limit), used by gpt_oss_clamped only

    @classmethod
    def from_config(cls, spec: FamilySpec, config: PreTrainedConfig) -> Adapter:
        if spec.layout.act == "swiglu" and getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"{spec.model_type} with hidden_act={config.hidden_act!r}: only SwiGLU experts")
        if spec.shared_size_attr and not getattr(config, spec.shared_size_attr):
            spec = replace(spec, shared_attr=None, shared_in_layer=False)  # this config builds no shared MLP
        for attr, allowed in spec.config_allowed:
            if (value := getattr(config, attr, None)) not in allowed:
                raise UnsupportedModelError(f"{spec.model_type} with {attr}={value!r}: supported: {allowed}")
        router = spec.router
        grouped = router.group_score is not None
        if router.group_methods is not None:
            method = getattr(config, "topk_method", None)
            if method != "greedy" and method not in router.group_methods:
                allowed = ("greedy", *router.group_methods)
                raise UnsupportedModelError(f"{spec.model_type} topk_method={method!r}; supported: {allowed}")
            grouped = method != "greedy"  # under greedy transformers ignores n_group
        n_layers = config.num_hidden_layers
        moe = [i for i in range(n_layers) if spec.is_moe_layer(config, i)]
        top_k = _one_top_k(spec, config)
        return cls(
            spec=spec,
            num_experts=getattr(config, spec.num_experts_attr),
            top_k=top_k,
            num_layers=n_layers,
            intermediate_size=getattr(config, spec.intermediate_attr),
            moe_layers=moe,
            dense_layers=[i for i in range(n_layers) if i not in moe
                          and (spec.is_dense_layer is None or spec.is_dense_layer(config, i))],
            router_params=RouterParams(
                top_k=top_k,
                renorm=spec.renorm if isinstance(spec.renorm, bool) else bool(getattr(config, spec.renorm)),
                scale=float(getattr(config, spec.scaling_attr)) if spec.scaling_attr else 1.0,
                n_group=config.n_group if grouped else None,
                topk_group=config.topk_group if grouped else None,
                renorm_min=float(getattr(config, spec.renorm_min_attr)) if spec.renorm_min_attr else None,
            ),
            act_params=(
                float(getattr(config, "swiglu_alpha", X.GPT_OSS_ALPHA)),
                float(getattr(config, "swiglu_limit", X.GPT_OSS_LIMIT)),
            ),
        )

    # -- facts ------------------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @property
    def dense_model_type(self) -> str:
        return self.spec.dense_model_type

    @property
    def renormalizes(self) -> bool:
        """The applied top-k weights always sum to routed_scaling_factor: not with a per-expert scale (gemma4_text),
        nor where a clamped denominator (ernie4_5_moe) can bind: renorm_min > k / E (the k largest softmax
        probabilities sum to at least k / E)."""
        p = self.router_params
        return (p.renorm and self.spec.router.expert_scale_attr is None
                and (p.renorm_min is None or p.renorm_min <= self.top_k / self.num_experts))

    @property
    def routed_scaling_factor(self) -> float:
        return self.router_params.scale

    @property
    def mlp_layers(self) -> list[int]:
        """Layers with an MLP, MoE or dense (the others, e.g. a hybrid's Mamba layers, have none)."""
        return sorted(self.moe_layers + self.dense_layers)

    # -- modules ----------------------------------------------------------------------------------------------------
    decoder = staticmethod(lm_head.decoder)  # the module holding `.layers`

    def _block(self, model: nn.Module, layer: int) -> nn.Module:
        decoder_layer = self.decoder(model).layers[layer]
        return decoder_layer if self.spec.block_attr is None else getattr(decoder_layer, self.spec.block_attr)

    def _shared_parent(self, model: nn.Module, layer: int) -> nn.Module:
        return self.decoder(model).layers[layer] if self.spec.shared_in_layer else self.mlp(model, layer)

    def mlp_modules(self, model: nn.Module, layer: int) -> list[nn.Module]:
        """The modules whose outputs sum to what the dense student's MLP replaces in `layer`: the block, plus a
        shared MLP that sits beside it (granitemoeshared)."""
        block = self._block(model, layer)
        if self.spec.shared_in_layer and layer in self.moe_layers:
            return [block, getattr(self._shared_parent(model, layer), self.spec.shared_attr)]
        return [block]

    def block_path(self, layer: int, disk: bool = False) -> str:
        """Key prefix of the MoE block (or dense MLP) of `layer`, in memory or in the safetensors files."""
        base = self.disk_layer_prefix(layer) if disk else f"model.layers.{layer}"
        return base if self.spec.block_attr is None else f"{base}.{self.spec.block_attr}"

    def replaced_prefixes(self, layer: int) -> list[str]:
        """In-memory key prefixes of `layer` that the student's MLP writer replaces (the rest is copied)."""
        if self.spec.block_attr is None:  # router and experts beside the layer's own dense MLP, which is kept
            return [f"model.layers.{layer}.{self.spec.router_attr}.", f"model.layers.{layer}.experts."]
        return [f"{self.block_path(layer)}."]

    def moe_output_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is the routed experts' weighted sum (plus shared experts): the MoE block, or the
        experts module where the decoder layer holds the MoE parts itself."""
        block = self.mlp(model, layer)
        return block.experts if self.spec.block_attr is None else block

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} of this {self.model_type} model is dense; MoE layers: {self.moe_layers}")
        return self._block(model, layer)

    def router_module(self, model: nn.Module, layer: int) -> nn.Module:
        """Its forward hook sees the routing input as args[0] ([T, H] or [B, S, H]: reshape to [-1, H])."""
        return getattr(self.mlp(model, layer), self.spec.router_attr)

    def block_forward(self, model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE output (that of `moe_output_module`) for router input x [T, H] (gpt_oss's extra router-scores
        output dropped), run by the model's own modules, plus a shared MLP beside the block (granitemoeshared)."""
        block, *beside = self.mlp_modules(model, layer)
        if self.spec.block_attr is None:  # no block module: the layer's own router, then its experts
            _, weights, index = self.router_module(model, layer)(x)
            return block.experts(self.expert_input(model, layer, x), index, weights)
        out = block(x[None])
        out = (out[0] if self.spec.block_returns_tuple else out).reshape(x.shape)  # llama4_text returns [T, H]
        return out + sum(m(x) for m in beside) if beside else out

    def expert_input(self, model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' input for router input x (the same tensor unless the spec names a norm between)."""
        norm = self.spec.expert_input_norm
        return x if norm is None else getattr(self.decoder(model).layers[layer], norm)(x)

    # -- routing ----------------------------------------------------------------------------------------------------
    def router_linear(self, model: nn.Module, layer: int) -> nn.Module:
        """The module holding the router's logits weight [E, H] (and gpt_oss's bias)."""
        router = self.router_module(model, layer)
        return router if self.spec.router.proj_attr is None else getattr(router, self.spec.router.proj_attr)

    def router_logits(self, model: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits [T, E] in fp32, computed in the dtype the model's router uses (so selection matches it)."""
        linear = self.router_linear(model, layer)
        weight, bias = linear.weight, getattr(linear, "bias", None)  # only gpt_oss's router has a bias
        hidden = hidden.reshape(-1, weight.shape[1])
        if self.spec.router.input_transform is not None:
            hidden = ROUTER_INPUTS[self.spec.router.input_transform](self.router_module(model, layer), hidden)
        if self.spec.router.fp32_logits:
            return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        return F.linear(hidden.to(weight.dtype), weight, bias).float()

    def route(self, model: nn.Module, layer: int, logits: torch.Tensor) -> Routing:
        router, spec = self.router_module(model, layer), self.spec.router
        owner = self.mlp(model, layer) if spec.bias_on_block else router
        bias = attrgetter(spec.bias_attr)(owner) if spec.bias_attr else None
        scale = getattr(router, spec.expert_scale_attr).detach() if spec.expert_scale_attr else None
        return route_logits(logits, spec, self.router_params, bias, scale)

    def router_output(self, output: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], weights [T, k], index [T, k]) from what the router module's forward returned."""
        if self.spec.router.output == "logits_weights_index":
            return output[0], output[1], output[2]
        scores, logits = output[0].reshape(-1, self.num_experts), output[1].reshape(-1, self.num_experts)
        index = logits.topk(self.top_k, dim=-1).indices  # the router's own top-k call on the same tensor
        return logits, scores.gather(1, index), index

    def routed_output(self, w: ExpertWeights, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """What one routed expert adds to the block for tokens x [T, H] at applied weights g [T]: g f_e(x), or
        f_e(g x) where the weight scales the expert's input (llama4_text)."""
        if self.spec.router.scales_input:
            return X.expert_forward(w, g[:, None].to(x.dtype) * x)
        return g[:, None].to(x.dtype) * X.expert_forward(w, x)

    # -- routed experts ---------------------------------------------------------------------------------------------
    def expert_weights(self, model: nn.Module, layer: int, e: int) -> ExpertWeights:
        return X.fused_expert(self._fused_params(model, layer), e, self.spec.layout, self.act_params)

    def expert_weights_from_tensors(self, tensors: Mapping[str, torch.Tensor], layer: int, e: int) -> ExpertWeights:
        """Expert e from a state dict / safetensors mapping, fused (in-memory) or per-expert (on-disk) keys."""
        for fused in self.fused_name_sets(layer):
            if fused[0] in tensors:
                return X.fused_expert(
                    {n: tensors[key] for n, key in zip(self._fused, fused)}, e, self.spec.layout, self.act_params
                )
        fused = self._fused_names(layer)
        names = self.per_expert_names(layer, e)
        if names and names[0] in tensors:
            *gate, up, down = (tensors[n] for n in names)  # no gate in up-only layouts
            return ExpertWeights(gate=gate[0] if gate else None, up=up, down=down, act=self.spec.layout.act)
        raise KeyError(f"no experts of layer {layer} in the mapping: looked for {fused[0]!r} and {names[:1]}")

    def expert_tensor_names(self, layer: int, available: Collection[str] | None = None) -> list[str]:
        """Key names holding layer `layer`'s routed experts. Without `available`: every candidate of both layouts;
        with it (e.g. a safetensors index's keys): the complete layout found there."""
        fused = self.fused_name_sets(layer)
        per = [n for e in range(self.num_experts) for n in self.per_expert_names(layer, e)]
        if available is None:
            return [n for names in fused for n in names] + per
        available = set(available)
        for names in (*fused, per):
            if names and available.issuperset(names):
                return names
        raise KeyError(f"layer {layer}'s experts are in neither layout; expected e.g. {fused[0][0]!r} or {per[:1]}")

    def all_expert_outputs(
        self, model: nn.Module, layer: int, x: torch.Tensor, experts: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """f_e(x) for every expert (or `experts`) on x [T, H] -> [E', T, H], in the weights' dtype."""
        return X.all_expert_outputs(self._fused_params(model, layer), x, self.spec.layout, self.act_params, experts)

    @staticmethod
    def expert_forward(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        return X.expert_forward(w, x)

    # -- shared experts and dense layers ----------------------------------------------------------------------------
    def shared_experts(self, model: nn.Module, layer: int) -> list[SharedExpert]:
        if self.spec.shared_attr is None:
            return []
        parent = self._shared_parent(model, layer)
        gate = getattr(parent, self.spec.shared_gate_attr).weight.detach()[0] if self.spec.shared_gate_attr else None
        shared = getattr(parent, self.spec.shared_attr)
        return [SharedExpert(X.mlp_weights(shared, self.spec.shared_proj_names, self.spec.layout.act), gate)]

    @staticmethod
    def shared_gate(shared: SharedExpert, x: torch.Tensor) -> torch.Tensor:
        """The factor [T] the block multiplies the shared expert's output by."""
        if shared.gate_weight is None:
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return torch.sigmoid(x @ shared.gate_weight.to(x.dtype))

    def dense_mlp_weights(self, model: nn.Module, layer: int) -> ExpertWeights | None:
        """The MLP of an originally dense layer (deepseek's first_k_dense_replace); None for MoE layers and for
        layers without an MLP (hybrids' Mamba/attention layers)."""
        if layer not in self.dense_layers:
            return None
        return X.mlp_weights(self._block(model, layer), act=self.spec.layout.act)

    # -- helpers ----------------------------------------------------------------------------------------------------
    @property
    def _fused(self) -> tuple[str, ...]:
        return X.fused_names(self.spec.layout)

    def disk_name(self, name: str) -> str:
        """The safetensors key of in-memory tensor `name` ("model.x" -> "backbone.x" for nemotron_h)."""
        head, sep, rest = name.partition(".")
        return f"{self.spec.disk_prefix}.{rest}" if head == "model" and sep else name

    def disk_layer_prefix(self, layer: int) -> str:
        return f"{self.spec.disk_prefix}.layers.{layer}"

    def _fused_params(self, model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
        experts = self.mlp(model, layer).experts
        return {n: getattr(experts, n) for n in self._fused}

    def _fused_names(self, layer: int) -> list[str]:
        return [f"{self.block_path(layer)}.experts.{n}" for n in self._fused]

    def fused_name_sets(self, layer: int) -> list[list[str]]:
        """The fused experts' key names: in memory, then on disk where save_pretrained renames them."""
        sets = [self._fused_names(layer)]
        if self.spec.disk_fused_names:
            sets.append([f"{self.block_path(layer, disk=True)}.{n}" for n in self.spec.disk_fused_names])
        return sets

    def per_expert_names(self, layer: int, e: int) -> list[str]:
        if self.spec.disk_expert_prefix is None:
            return []
        prefix = f"{self.disk_layer_prefix(layer)}.{self.spec.disk_expert_prefix}.{e}."
        return [f"{prefix}{proj}.weight" for proj in self.spec.disk_proj_names]


def _one_top_k(spec: FamilySpec, config: PreTrainedConfig) -> int:
    """config.num_experts_per_tok, which hunyuan_v1_moe (as moe_topk) may give per layer. Selection and assembly
    keep K experts and k blocks in every layer, so a per-layer list converts exactly only when it repeats one value
    (as in every published Hunyuan checkpoint)."""
    k = getattr(config, spec.top_k_attr)
    if isinstance(k, (list, tuple)):
        name = type(config).attribute_map.get(spec.top_k_attr, spec.top_k_attr)
        if len(set(k)) != 1:
            raise UnsupportedModelError(f"{spec.model_type} with {name}={list(k)!r}: top-k must be the same in "
                                        "every layer")
        k = k[0]
    return k
