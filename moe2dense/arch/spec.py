"""Declarative description of an MoE family: what differs between families is data, not code.

A `FamilySpec` names where the router, experts and shared experts live (in memory and on disk), how the router turns
logits into a top-k choice, how the fused expert tensors are laid out, and which config fields hold the sizes.
The generic code in `routing`, `experts` and `adapter` reads nothing family-specific outside these fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class RouterSpec:
    """How logits become p_t and S_t.

    score:         p_t = softmax(logits) or sigmoid(logits).
    group_score:   only experts of the `topk_group` best of `n_group` groups are eligible; a group scores its best
                   expert ("max", deepseek_v2) or the sum of its two best ("top2_sum", deepseek_v3).
    group_methods: config.topk_method values that turn group limiting on, "greedy" being the only other one
                   allowed (deepseek_v2); None: always on (deepseek_v3's router has no topk_method switch).
    bias_attr:     router buffer added to p_t for *selection only* (deepseek_v3's e_score_correction_bias).
    """

    score: Literal["softmax", "sigmoid"] = "softmax"
    group_score: Literal["max", "top2_sum"] | None = None
    group_methods: tuple[str, ...] | None = None
    bias_attr: str | None = None
    # deepseek routers cast hidden states and weight to fp32 before the matmul; the others run in the model dtype.
    fp32_logits: bool = False
    # Router submodule holding the logits Linear (gemma4_text: "proj"); None: the router module is that Linear.
    proj_attr: str | None = None
    # What the router does to its input before the Linear (adapter.ROUTER_INPUTS): "rms_scaled" = gemma4_text's
    # unweighted RMSNorm * router.scale * hidden_size**-0.5.
    input_transform: Literal["rms_scaled"] | None = None
    # Router parameter [E] multiplying each selected expert's applied weight after renormalisation (gemma4_text's
    # per_expert_scale); it is folded into the blocks' c like any routing weight.
    expert_scale_attr: str | None = None
    # The router returns (probs, weights, index), not (logits, ...) (gemma4_text).
    returns_probs: bool = False


@dataclass(frozen=True)
class ExpertLayout:
    """The fused 3-D expert tensors in memory (the flags mirror transformers' `use_experts_implementation`).

    Default: gate_up_proj (E, 2I, H) with gate rows then up rows, down_proj (E, H, I), no biases.
    gpt_oss: gate_up_proj (E, H, 2I) with gate/up interleaved along 2I, down_proj (E, I, H), plus biases.
    has_gate=False (nemotron_h): up_proj (E, I, H) and down_proj (E, H, I), f(x) = down(act(up(x))).
    """

    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    has_gate: bool = True
    act: Literal["swiglu", "gpt_oss_clamped", "relu2", "geglu_tanh"] = "swiglu"


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    dense_model_type: str
    num_experts_attr: str  # config field holding E
    intermediate_attr: str  # config field holding the routed expert's I
    is_moe_layer: Callable[[PreTrainedConfig, int], bool]
    # True/False, or the config field that decides whether applied top-k weights are renormalised to sum to 1.
    renorm: bool | str
    scaling_attr: str | None = None  # config field multiplying the applied weights (routed_scaling_factor)
    router: RouterSpec = RouterSpec()
    layout: ExpertLayout = ExpertLayout()
    # Decoder-layer attribute holding the MoE block; None: the decoder layer holds the router and `experts` itself
    # (gemma4_text, where the MoE runs beside the layer's dense MLP, each with its own norms).
    block_attr: str | None = "mlp"
    router_attr: str = "gate"  # MoE-block attribute holding the router
    block_returns_tuple: bool = False  # gpt_oss's block returns (hidden, router_scores)
    # Per-expert layout that save_pretrained writes: "{prefix}.{e}.{proj}.weight" for (gate, up, down) projections;
    # None where the family is stored fused on disk too.
    disk_expert_prefix: str | None = "mlp.experts"
    # (gate, up, down), or (up, down) for a layout without gate.
    disk_proj_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # Shared experts: the block attribute holding a SwiGLU MLP, and its sigmoid gate (None: ungated).
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    # On-disk name of the MoE block where it differs from `block_attr` (mixtral: "block_sparse_moe").
    disk_block_attr: str | None = None
    # The dense student (docs/architecture.md, "Family spec"): "mlp" = a plain SwiGLU MLP
    # (gate_proj/up_proj/down_proj);
    # "single_expert" = the same family with one always-on expert, for families without a dense twin;
    # "up_mlp" = an ungated MLP (up_proj/down_proj) in the block's place (nemotron_h's "mlp" layers).
    dense_mlp: Literal["mlp", "single_expert", "up_mlp"] = "mlp"
    # Config field giving the number of leading dense layers; the student sets it to num_hidden_layers (deepseek).
    first_dense_attr: str | None = None
    # Layers with a dense MLP; None: every layer that is not MoE (hybrids also have layers with no MLP at all).
    is_dense_layer: Callable[[PreTrainedConfig, int], bool] | None = None
    # Per-layer block-type list in the config and the (MoE, dense MLP) values the student swaps (nemotron_h:
    # layers_block_type, "moe" -> "mlp").
    layer_types_attr: str | None = None
    layer_type_swap: tuple[str, str] | None = None
    # Name of the base model in the safetensors files where it differs from the in-memory "model" (nemotron_h
    # checkpoints say "backbone."; transformers' conversion_mapping renames on load and back on save).
    disk_prefix: str = "model"
    # Config keys that fix the layer count, the first present one checked (registry.check_config_keys).
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    # Config fields whose other values change the algebra: (field, allowed values); others are refused.
    config_allowed: tuple[tuple[str, tuple[object, ...]], ...] = ()
    top_k_attr: str = "num_experts_per_tok"  # config field holding k
    # Config field the student's MLP width goes to ("moe_intermediate_size" where a single-expert student keeps
    # the layer's own dense MLP beside its one expert: gemma4_text).
    student_width_attr: str = "intermediate_size"
    # Decoder-layer norm mapping the router's input to the experts' input (gemma4_text routes the pre-norm
    # residual, its experts see pre_feedforward_layernorm_2 of it); None: both see the same tensor.
    expert_input_norm: str | None = None
