"""One spec per supported MoE family (transformers 5.x module names; each family's dense student:
docs/architecture.md, "Family spec")."""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedConfig

from .spec import ExpertLayout, FamilySpec, RouterSpec


def _qwen_sparse_step(config: PreTrainedConfig, layer: int) -> bool:
    # Qwen MoE decoder layers: dense MLP for mlp_only_layers and off the decoder_sparse_step grid.
    return (
        layer not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (layer + 1) % config.decoder_sparse_step == 0
    )


def _after_first_k_dense(config: PreTrainedConfig, layer: int) -> bool:
    return layer >= (config.first_k_dense_replace or 0)


def _all_layers(config: PreTrainedConfig, layer: int) -> bool:
    return True


def _sparse_mlp_type(config: PreTrainedConfig, layer: int) -> bool:
    return config.mlp_layer_types[layer] == "sparse"


# DeepSeek-V3's router (transformers' *TopkRouter, copied as is by glm4_moe, glm4_moe_lite and dots1): sigmoid of
# fp32 logits, e_score_correction_bias for selection only, group limiting always on (no topk_method switch).
_DEEPSEEK_V3_ROUTER = RouterSpec(
    score="sigmoid", group_score="top2_sum", bias_attr="e_score_correction_bias", fp32_logits=True
)


# Multimodal wrapper model_type -> the supported text model inside it. Their checkpoints store the language model
# under "model.language_model." next to the vision tower; moe2dense reads "model.layers." (UNWRAP_RECIPE).
TEXT_MODEL_OF = {"qwen3_5_moe": "qwen3_5_moe_text"}
UNWRAP_RECIPE = (
    "save its text model first: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)"
    ".save_pretrained(text_dir, save_original_format=False), copy the tokenizer files into text_dir, and use "
    "text_dir as the teacher"
)


def _ernie_moe_layer(config: PreTrainedConfig, layer: int) -> bool:
    # Ernie4_5_MoeDecoderLayer: every moe_layer_interval-th layer within [moe_layer_start_index, moe_layer_end_index].
    return (
        (layer + 1) % config.moe_layer_interval == 0
        and config.moe_layer_start_index <= layer <= config.moe_layer_end_index
    )


def _ernie_dense_config(config: PreTrainedConfig) -> dict:
    # Ernie4_5_Moe falls back to hidden_size // num_attention_heads without a head_dim; ernie4_5 defaults it to 128.
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


def _in_moe_layers(config: PreTrainedConfig, layer: int) -> bool:
    return layer in config.moe_layers  # llama4_text resolves interleave_moe_layer_step into moe_layers


def _no_moe_layers(config: PreTrainedConfig) -> dict:
    return {"moe_layers": []}  # an explicit empty list: None would be re-derived from interleave_moe_layer_step


def _moe_enabled(config: PreTrainedConfig, layer: int) -> bool:
    return bool(config.enable_moe_block)


def _block_type_is(kind: str):
    # Hybrids that list a block type per layer (nemotron_h's layers_block_type; its hybrid_override_pattern is
    # converted to that list by the config).
    def check(config: PreTrainedConfig, layer: int) -> bool:
        return config.layers_block_type[layer] == kind

    return check


# The DeepSeek-V3 family spec; glm4_moe, glm4_moe_lite and dots1 differ only where `replace` says.
_DEEPSEEK_V3 = FamilySpec(
    model_type="deepseek_v3",
    dense_model_type="deepseek_v3",
    num_experts_attr="n_routed_experts",
    intermediate_attr="moe_intermediate_size",
    is_moe_layer=_after_first_k_dense,
    renorm="norm_topk_prob",
    scaling_attr="routed_scaling_factor",
    router=_DEEPSEEK_V3_ROUTER,
    shared_attr="shared_experts",
    first_dense_attr="first_k_dense_replace",
)


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        model_type="qwen3_moe",
        dense_model_type="qwen3",
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_qwen_sparse_step,
        renorm="norm_topk_prob",
    ),
    FamilySpec(
        model_type="qwen2_moe",
        dense_model_type="qwen2",
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_qwen_sparse_step,
        renorm="norm_topk_prob",
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
    ),
    FamilySpec(
        model_type="olmoe",
        dense_model_type="olmoe",
        num_experts_attr="num_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm="norm_topk_prob",
        dense_mlp="single_expert",
    ),
    FamilySpec(
        model_type="mixtral",
        dense_model_type="mistral",
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,
        # Mixtral checkpoints keep the original names; from_pretrained renames block_sparse_moe -> mlp.
        disk_expert_prefix="block_sparse_moe.experts",
        disk_proj_names=("w1", "w3", "w2"),
        disk_block_attr="block_sparse_moe",
    ),
    FamilySpec(
        model_type="deepseek_v2",
        dense_model_type="deepseek_v2",
        num_experts_attr="n_routed_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_after_first_k_dense,
        renorm=False,  # transformers' DeepseekV2TopkRouter ignores norm_topk_prob
        scaling_attr="routed_scaling_factor",
        router=RouterSpec(group_score="max", group_methods=("group_limited_greedy",), fp32_logits=True),
        shared_attr="shared_experts",
        first_dense_attr="first_k_dense_replace",
    ),
    _DEEPSEEK_V3,
    FamilySpec(
        model_type="gpt_oss",
        dense_model_type="gpt_oss",
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,  # softmax over the top-k logits
        layout=ExpertLayout(transposed=True, interleaved=True, has_bias=True, act="gpt_oss_clamped"),
        router_attr="router",
        block_returns_tuple=True,
        disk_expert_prefix=None,  # saved fused, exactly as in memory
        dense_mlp="single_expert",
    ),
    # GLM-4.5 / 4.7 and dots.llm1 copy DeepSeek-V3's MoE (router, shared experts, leading dense layers) as is.
    replace(_DEEPSEEK_V3, model_type="glm4_moe", dense_model_type="glm4_moe"),
    # GLM-4.7-Flash: the same MoE, its MoE layers listed in mlp_layer_types; the student sets every entry "dense".
    replace(_DEEPSEEK_V3, model_type="glm4_moe_lite", dense_model_type="glm4_moe_lite", is_moe_layer=_sparse_mlp_type,
            first_dense_attr=None, mlp_types_attr="mlp_layer_types"),
    FamilySpec(
        model_type="minimax_m2",
        dense_model_type="minimax_m2",
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,  # MiniMaxM2TopKRouter always renormalises, no scaling factor
        # Logits in the model dtype, then sigmoid in fp32; the block owns the correction bias, no groups.
        router=RouterSpec(score="sigmoid", bias_attr="e_score_correction_bias", bias_on_block=True),
        # Stored with Mixtral's names; from_pretrained renames block_sparse_moe -> mlp and fuses w1/w3/w2.
        disk_expert_prefix="block_sparse_moe.experts",
        disk_proj_names=("w1", "w3", "w2"),
        disk_block_attr="block_sparse_moe",
        dense_mlp="single_expert",  # every decoder layer is MoE: no dense MLP in the class
    ),
    replace(_DEEPSEEK_V3, model_type="dots1", dense_model_type="dots1"),
    # Hybrid Gated-DeltaNet / full-attention backbone (config.layer_types), copied to the student unchanged.
    FamilySpec(
        model_type="qwen3_next",
        dense_model_type="qwen3_next",  # the same class with every layer in mlp_only_layers
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_qwen_sparse_step,
        renorm="norm_topk_prob",
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
        mlp_only_attr="mlp_only_layers",
    ),
    # The text causal LM that AutoModelForCausalLM builds from a Qwen3.5-MoE checkpoint (see TEXT_MODEL_OF).
    FamilySpec(
        model_type="qwen3_5_moe_text",
        dense_model_type="qwen3_5_text",
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,  # Qwen3_5MoeTopKRouter always renormalises (its config has no norm_topk_prob)
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
    ),
    FamilySpec(
        model_type="hunyuan_v1_moe",
        dense_model_type="hunyuan_v1_dense",
        num_experts_attr="num_experts",
        intermediate_attr="intermediate_size",  # experts and shared MLP both use it
        is_moe_layer=_all_layers,
        renorm=True,
        # the router's Linear is gate.wg, kept in fp32 by the model: router_logits computes in the weight's dtype
        router=RouterSpec(proj_attr="wg"),
        shared_attr="shared_mlp",  # ungated
    ),
    FamilySpec(
        model_type="granitemoe",
        dense_model_type="granite",  # carries embedding / residual / attention multipliers and logits_scaling
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,  # softmax over the top-k logits
        block_attr="block_sparse_moe",
        router_attr="router",
        disk_expert_prefix=None,  # saved fused under the original ParallelExperts names
        disk_fused_names=("input_linear.weight", "output_linear.weight"),
        disk_router_weight="router.layer.weight",
    ),
    FamilySpec(
        model_type="granitemoeshared",
        dense_model_type="granite",
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_all_layers,
        renorm=True,
        block_attr="block_sparse_moe",
        router_attr="router",
        disk_expert_prefix=None,
        disk_fused_names=("input_linear.weight", "output_linear.weight"),
        disk_router_weight="router.layer.weight",
        shared_attr="shared_mlp",  # ungated, beside the block in the decoder layer
        shared_proj_names=("input_linear", "output_linear"),
        shared_in_layer=True,
        shared_size_attr="shared_intermediate_size",
    ),
    FamilySpec(
        model_type="ernie4_5_moe",
        dense_model_type="ernie4_5",
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_ernie_moe_layer,
        renorm=True,
        renorm_min_attr="moe_norm_min",  # weights / clamp(sum, min=moe_norm_min)
        # softmax in fp32 (fp32 router weight); moe_statics' bias ranks the experts, the weights come without it
        router=RouterSpec(bias_attr="moe_statics.e_score_correction_bias", fp32_logits=True),
        shared_attr="shared_experts",  # ungated, moe_num_shared_experts * moe_intermediate_size wide
        dense_config=_ernie_dense_config,
        # use_bias puts biases on attention and on dense / shared MLPs, which the dense writer does not carry;
        # every published ERNIE-4.5 MoE checkpoint has use_bias false.
        config_allowed=(("use_bias", (False, None)),),
    ),
    FamilySpec(
        model_type="llama4_text",
        dense_model_type="llama4_text",  # moe_layers=[]: every layer a Llama4TextMLP of intermediate_size_mlp
        num_experts_attr="num_local_experts",
        intermediate_attr="intermediate_size",
        is_moe_layer=_in_moe_layers,
        renorm=False,
        # top-k on the logits, sigmoid of those k; the score multiplies each expert's input (assembly folds c_g
        # into the block's gate and up rows)
        router=RouterSpec(score="sigmoid", topk_on="logits", scales_input=True, output="scores_logits"),
        layout=ExpertLayout(transposed=True),  # gate_up_proj (E, H, 2I), down_proj (E, I, H); saved fused
        block_attr="feed_forward",
        router_attr="router",
        block_returns_tuple=True,  # (hidden, router_logits)
        disk_expert_prefix=None,
        shared_attr="shared_expert",  # ungated, intermediate_size wide
        dense_width_attr="intermediate_size_mlp",
        dense_mlp_attr="feed_forward",
        dense_config=_no_moe_layers,
    ),
    FamilySpec(
        model_type="nemotron_h",
        dense_model_type="nemotron_h",
        num_experts_attr="n_routed_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_block_type_is("moe"),
        is_dense_layer=_block_type_is("mlp"),  # Mamba ("linear_attention") and attention layers have no MLP
        renorm="norm_topk_prob",
        scaling_attr="routed_scaling_factor",
        router=_DEEPSEEK_V3_ROUTER,
        layout=ExpertLayout(has_gate=False, act="relu2"),
        block_attr="mixer",
        disk_expert_prefix="mixer.experts",
        disk_proj_names=("up_proj", "down_proj"),
        shared_attr="shared_experts",  # ungated, relu^2 like the experts
        dense_mlp="up_mlp",
        dense_mlp_attr="mixer",
        layer_types_attr="layers_block_type",
        layer_type_swap=("moe", "mlp"),
        disk_prefix="backbone",
        num_layers_keys=("layers_block_type", "hybrid_override_pattern"),
        # moe_latent_size: experts run in a projected latent space (fc1/fc2_latent_proj), not supported yet.
        config_allowed=(("mlp_hidden_act", ("relu2",)), ("moe_latent_size", (None,))),
    ),
    FamilySpec(
        # Every layer runs its dense MLP and the MoE in parallel, each between its own norms:
        #   out = post_ff(post_ff_1(mlp(pre_ff(h))) + post_ff_2(experts(pre_ff_2(h), router(h))))
        # The norms after each branch are nonlinear, so no single MLP reproduces the sum: the student keeps the
        # dense MLP and replaces only the MoE, by one always-on expert (gemma4_text with num_experts=1).
        model_type="gemma4_text",
        dense_model_type="gemma4_text",
        num_experts_attr="num_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_moe_enabled,
        renorm=True,
        router=RouterSpec(
            proj_attr="proj", input_transform="rms_scaled", expert_scale_attr="per_expert_scale", returns_probs=True
        ),
        layout=ExpertLayout(act="geglu_tanh"),
        block_attr=None,
        router_attr="router",
        disk_expert_prefix=None,  # saved fused, exactly as in memory
        dense_mlp="single_expert",
        top_k_attr="top_k_experts",
        dense_width_attr="moe_intermediate_size",
        expert_input_norm="pre_feedforward_layernorm_2",
        config_allowed=(("enable_moe_block", (True,)), ("hidden_activation", ("gelu_pytorch_tanh",))),
    ),
)
