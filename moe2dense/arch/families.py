"""One spec per supported MoE family (transformers 5.x module names; each family's dense student:
docs/architecture.md, "Family spec")."""

from __future__ import annotations

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


def _moe_enabled(config: PreTrainedConfig, layer: int) -> bool:
    return bool(config.enable_moe_block)


def _block_type_is(kind: str):
    # Hybrids that list a block type per layer (nemotron_h's layers_block_type; its hybrid_override_pattern is
    # converted to that list by the config).
    def check(config: PreTrainedConfig, layer: int) -> bool:
        return config.layers_block_type[layer] == kind

    return check


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
    FamilySpec(
        model_type="deepseek_v3",
        dense_model_type="deepseek_v3",
        num_experts_attr="n_routed_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_after_first_k_dense,
        renorm="norm_topk_prob",
        scaling_attr="routed_scaling_factor",
        router=RouterSpec(
            score="sigmoid", group_score="top2_sum", bias_attr="e_score_correction_bias", fp32_logits=True
        ),
        shared_attr="shared_experts",
        first_dense_attr="first_k_dense_replace",
    ),
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
    FamilySpec(
        model_type="nemotron_h",
        dense_model_type="nemotron_h",
        num_experts_attr="n_routed_experts",
        intermediate_attr="moe_intermediate_size",
        is_moe_layer=_block_type_is("moe"),
        is_dense_layer=_block_type_is("mlp"),  # Mamba ("linear_attention") and attention layers have no MLP
        renorm="norm_topk_prob",
        scaling_attr="routed_scaling_factor",
        # deepseek_v3's router: fp32 sigmoid, correction bias for selection only, top-2-sum groups (always on)
        router=RouterSpec(
            score="sigmoid", group_score="top2_sum", bias_attr="e_score_correction_bias", fp32_logits=True
        ),
        layout=ExpertLayout(has_gate=False, act="relu2"),
        block_attr="mixer",
        disk_expert_prefix="mixer.experts",
        disk_proj_names=("up_proj", "down_proj"),
        shared_attr="shared_experts",  # ungated, relu^2 like the experts
        dense_mlp="up_mlp",
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
        student_width_attr="moe_intermediate_size",
        expert_input_norm="pre_feedforward_layernorm_2",
        config_allowed=(("enable_moe_block", (True,)), ("hidden_activation", ("gelu_pytorch_tanh",))),
    ),
)
