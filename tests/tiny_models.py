"""Tiny random MoE configs/models for tests: one factory per family, no downloads.

Every family has 8 routed experts, top-k 2 and hidden size 32, so a forward pass takes milliseconds on CPU.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Dots1Config,
    Glm4MoeConfig,
    Glm4MoeLiteConfig,
    Gemma4TextConfig,
    GptOssConfig,
    MiniMaxM2Config,
    GraniteMoeConfig,
    GraniteMoeSharedConfig,
    HunYuanMoEV1Config,
    Ernie4_5_MoeConfig,
    Llama4TextConfig,
    MixtralConfig,
    NemotronHConfig,
    OlmoeConfig,
    PreTrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)
from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig

_COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Qwen3-Next / Qwen3.5 hybrid backbone as published: three Gated-DeltaNet (linear attention) layers, then one full
# attention layer (full_attention_interval 4), every layer MoE with a sigmoid-gated shared expert. The DeltaNet runs
# its torch fallback on CPU: keep its heads tiny.
_HYBRID = dict(
    _COMMON,
    num_hidden_layers=4,
    full_attention_interval=4,
    head_dim=8,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_experts=8,
)
# DeepSeek uses multi-head latent attention; keep its low-rank dims tiny as well.
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)

_GRANITE = dict(
    _COMMON,
    tie_word_embeddings=True,
    embedding_multiplier=12.0,
    logits_scaling=6.0,
    residual_multiplier=0.22,
    attention_multiplier=0.015625,
)


def _deepseek(cls, **kw) -> PreTrainedConfig:
    base = dict(
        _COMMON,
        **_MLA,
        num_hidden_layers=3,
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
    )
    return cls(**{**base, **kw})


CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=8, norm_topk_prob=True
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        norm_topk_prob=False,
    ),
    "olmoe": lambda: OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, norm_topk_prob=False),
    "mixtral": lambda: MixtralConfig(**_COMMON, head_dim=8, intermediate_size=16, num_local_experts=8),
    # topk_group=1 so group-limited selection differs from greedy (with k=2, two groups would always agree).
    "deepseek_v2": lambda: _deepseek(DeepseekV2Config, topk_method="group_limited_greedy", n_group=4, topk_group=1),
    "deepseek_v2_greedy": lambda: _deepseek(DeepseekV2Config, topk_method="greedy", routed_scaling_factor=1.0),
    "deepseek_v3": lambda: _deepseek(DeepseekV3Config, n_group=4, topk_group=2, norm_topk_prob=True),
    "gpt_oss": lambda: GptOssConfig(
        **_COMMON,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=8,
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # zai-org/GLM-4.5 (GLM-4.7 alike): leading dense layers, one ungated shared expert, qk-norm and attention biases,
    # partial RoPE (the config's default 0.5), a single expert group, routed_scaling_factor 2.5.
    "glm4_moe": lambda: Glm4MoeConfig(
        **{**_COMMON, "num_hidden_layers": 3},
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
    ),
    # zai-org/GLM-4.7-Flash: multi-head latent attention with a q LoRA, mlp_layer_types dense then sparse.
    "glm4_moe_lite": lambda: Glm4MoeLiteConfig(
        **{**_COMMON, **_MLA, "num_hidden_layers": 3, "num_key_value_heads": 4, "q_lora_rank": 16},
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.8,
    ),
    # MiniMaxAI/MiniMax-M2: every layer MoE, no shared expert, qk-norm over all heads, partial RoPE via rotary_dim.
    "minimax_m2": lambda: MiniMaxM2Config(
        **_COMMON, head_dim=8, rotary_dim=4, intermediate_size=16, num_local_experts=8
    ),
    # rednote-hilab/dots.llm1.inst: one leading dense layer, two shared experts, a single expert group.
    "dots1": lambda: Dots1Config(
        **{**_COMMON, "num_hidden_layers": 3},
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "qwen3_next": lambda: Qwen3NextConfig(**_HYBRID, intermediate_size=48, norm_topk_prob=True),
    "qwen3_5_moe_text": lambda: Qwen3_5MoeTextConfig(**_HYBRID),
    # Hunyuan-A13B: every layer MoE with one ungated shared MLP, per-layer moe_topk (one value), qk-norm, tied
    # embeddings, dynamic-alpha rope.
    "hunyuan_v1_moe": lambda: HunYuanMoEV1Config(
        **{k: v for k, v in _COMMON.items() if k not in ("num_experts_per_tok", "tie_word_embeddings")},
        head_dim=8,
        intermediate_size=16,
        num_experts=8,
        moe_topk=[2, 2],
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0},
    ),
    # granite-3.1-3b-a800m: every layer MoE, tied embeddings, and the four multipliers the dense twin must carry.
    "granitemoe": lambda: GraniteMoeConfig(**_GRANITE, intermediate_size=16, num_local_experts=8),
    "granitemoeshared": lambda: GraniteMoeSharedConfig(
        **_GRANITE, intermediate_size=16, num_local_experts=8, shared_intermediate_size=24
    ),
    # ERNIE-4.5-21B-A3B's structure: layer 0 dense, MoE from moe_layer_start_index 1 to the last layer, two ungated
    # shared experts, tied embeddings, no head_dim in the config (hidden_size // heads).
    "ernie4_5_moe": lambda: Ernie4_5_MoeConfig(
        **{**_COMMON, "tie_word_embeddings": True, "num_hidden_layers": 3},
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
    ),
    # Llama-4-Maverick's structure: dense and MoE layers alternate (interleave_moe_layer_step 2; the dense ones are
    # intermediate_size_mlp wide), one ungated shared expert, every 4th layer NoPE full attention, the others
    # chunked (attention_chunk_size below the test sequence length, so chunking is exercised).
    "llama4_text": lambda: Llama4TextConfig(
        **{**_COMMON, "num_hidden_layers": 4},
        head_dim=8,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_local_experts=8,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
    ),
}

# Nemotron-3-Nano-30B-A3B's structure (hybrid_override_pattern "MEMEM*EMEMEM*E..."): Mamba-2 layers ("M") alternate with
# MoE layers ("E"), full attention ("*") now and then, no dense MLP layers; one ungated relu^2 shared expert,
# routed_scaling_factor 2.5. n_group=2/topk_group=1 (the checkpoint has 1/1) so the group path is exercised.
# Mamba runs its slow torch path on CPU: keep its heads, state and chunks tiny.
CONFIGS["nemotron_h"] = lambda: NemotronHConfig(
    **{k: v for k, v in _COMMON.items() if k != "num_hidden_layers"},
    hybrid_override_pattern="ME*E",
    head_dim=8,
    intermediate_size=48,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    chunk_size=8,
    expand=1,
    n_routed_experts=8,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)

# Gemma-4-26B-A4B's text model: MoE in every layer beside a dense MLP (enable_moe_block), GeGLU-tanh, sliding layers
# with one full-attention layer last whose keys double as values (attention_k_eq_v) with their own head dim and KV
# heads, tied embeddings, final logit softcapping, no per-layer input embeddings.
CONFIGS["gemma4_text"] = lambda: Gemma4TextConfig(
    **{k: v for k, v in _COMMON.items() if k not in ("num_hidden_layers", "tie_word_embeddings")},
    num_hidden_layers=3,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=8,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    intermediate_size=24,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=16,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
)


# Every supported family, in registry order (deepseek_v2_greedy is a variant, not a family): the per-family tests
# parametrize over this list, and test_arch checks it covers the registry.
FAMILIES = [name for name in CONFIGS if name != "deepseek_v2_greedy"]


def tiny_config(name: str) -> PreTrainedConfig:
    """A tiny config by family name (`deepseek_v2_greedy` is the greedy top-k variant of deepseek_v2)."""
    return CONFIGS[name]()


@torch.no_grad()
def tiny_model(name: str, seed: int = 0):
    """A tiny fp32 *ForCausalLM with random weights, perturbed where the default init would hide a code path."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32).eval()
    for name_, p in model.named_parameters():
        if name_.endswith("_bias") and ".experts." in name_:
            p.normal_(0.0, 0.1)  # gpt_oss inits expert biases to zero
        if name_.endswith("experts.gate_up_proj") and model.config.model_type == "gpt_oss":
            p.mul_(100.0)  # push pre-activations past swiglu_limit so the clamp is exercised
        if name_.endswith("_proj.bias") and ".self_attn." in name_ and model.config.model_type == "glm4_moe":
            p.normal_(0.0, 0.1)  # zero-initialised: a student that dropped attention_bias would go unnoticed
        if name_.endswith("norm.weight") and not p.any():
            p.normal_(0.0, 0.1)  # zero-centred RMSNorms (weight 0 means scale 1, qwen3_next / qwen3_5)
        if name_.endswith(("router.per_expert_scale", "router.scale")):
            p.uniform_(0.5, 1.5)  # gemma4_text inits both to ones
    for name_, b in [*model.named_buffers(), *model.named_parameters()]:
        if name_.endswith("e_score_correction_bias"):  # a parameter in ernie4_5_moe's moe_statics
            b.normal_(0.0, 0.3)  # bias changes selection but not the applied weights
    return model
