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
    bias_attr:     router buffer added to p_t for *selection only* (deepseek_v3's e_score_correction_bias); a dotted
                   path below the router where it lives deeper (ernie4_5_moe: moe_statics.e_score_correction_bias).
    bias_on_block: the bias buffer lives on the MoE block, which passes it to the router (minimax_m2).
    topk_on:       what the top-k ranks: the scores p_t (+ bias), or the raw logits (llama4_text: top-k, then sigmoid;
                   the same order except where sigmoid saturates to equal fp32 values).
    scales_input:  the weight g multiplies the expert's INPUT, f_e(g x) (llama4_text), not its output g f_e(x).
    output:        what the router module's forward returns: (logits, top-k weights, top-k index), or llama4_text's
                   (scores [T, E], zero off the top-k; logits).
    """

    score: Literal["softmax", "sigmoid"] = "softmax"
    group_score: Literal["max", "top2_sum"] | None = None
    group_methods: tuple[str, ...] | None = None
    bias_attr: str | None = None
    bias_on_block: bool = False
    # deepseek routers cast hidden states and weight to fp32 before the matmul; the others run in the model dtype.
    fp32_logits: bool = False
    topk_on: Literal["scores", "logits"] = "scores"
    scales_input: bool = False
    output: Literal["logits_weights_index", "scores_logits"] = "logits_weights_index"
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
    # Fused experts saved under other names (transformers' conversion_mapping renames them back on load), relative
    # to the block: granitemoe's (gate_up_proj, down_proj) as ("input_linear.weight", "output_linear.weight").
    disk_fused_names: tuple[str, str] | None = None
    # The router's rows on disk where the name differs, relative to the block (granitemoe: "router.layer.weight").
    disk_router_weight: str | None = None
    # The shared MLP's projections: (gate, up, down) Linears, or (gate_up, down) with gate rows then up rows in one
    # Linear (granitemoeshared's input_linear / output_linear).
    shared_proj_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # The shared MLP is a decoder-layer attribute beside the block, added to the block's output by the layer
    # (granitemoeshared), not inside the block.
    shared_in_layer: bool = False
    # Config field of the shared MLP's width where 0 means no shared MLP (granitemoeshared's shared_intermediate_size)
    shared_size_attr: str | None = None
    # The dense student (docs/architecture.md, "Family spec"): "mlp" = a plain SwiGLU MLP
    # (gate_proj/up_proj/down_proj);
    # "single_expert" = the same family with one always-on expert, for families without a dense twin;
    # "in_class" = the same family with one expert, in each layer whatever the class then builds (arch.generic);
    # "up_mlp" = an ungated MLP (up_proj/down_proj) in the block's place (nemotron_h's "mlp" layers).
    dense_mlp: Literal["mlp", "single_expert", "in_class", "up_mlp"] = "mlp"
    # Config field giving the number of leading dense layers; the student sets it to num_hidden_layers (deepseek).
    first_dense_attr: str | None = None
    # Config field listing "dense"/"sparse" per layer (glm4_moe_lite's mlp_layer_types); the student sets all "dense".
    mlp_types_attr: str | None = None
    # Config field listing the layers that keep a dense MLP; the student lists every layer (qwen3_next's
    # mlp_only_layers: its dense twin is the same class).
    mlp_only_attr: str | None = None
    # Config field of a lower bound on the renormalising denominator: weights / clamp(sum, min) (ernie4_5_moe).
    renorm_min_attr: str | None = None
    # The student config's field for its MLP width (llama4_text's dense layers use intermediate_size_mlp;
    # gemma4_text's one expert, beside the layer's own dense MLP, moe_intermediate_size).
    dense_width_attr: str = "intermediate_size"
    # The decoder-layer attribute of the student's plain MLP (granite: "mlp" where the teacher has
    # "block_sparse_moe"; llama4_text: "feed_forward").
    dense_mlp_attr: str = "mlp"
    # Further student-config fields, from the teacher config (e.g. llama4_text: moe_layers=[] makes every layer dense).
    dense_config: Callable[[PreTrainedConfig], dict] | None = None
    # (config field, allowed values): a teacher with any other value is refused (a variant moe2dense does not convert).
    config_allowed: tuple[tuple[str, tuple[object, ...]], ...] = ()
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
    top_k_attr: str = "num_experts_per_tok"  # config field holding k
    # Decoder-layer norm mapping the router's input to the experts' input (gemma4_text routes the pre-norm
    # residual, its experts see pre_feedforward_layernorm_2 of it); None: both see the same tensor.
    expert_input_norm: str | None = None
