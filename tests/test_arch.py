"""Adapters agree with the transformers models they describe: routing, block output, weights on disk and in memory.

Each family: a tiny random model -> save_pretrained -> from_pretrained, one forward pass with hooks on every MoE
block and router, then every check below compares the adapter against what the model itself computed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch
from safetensors import safe_open
from tiny_models import CONFIGS, FAMILIES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, Mxfp4Config, Qwen3MoeConfig

from moe2dense.arch import (
    SUPPORTED_MODEL_TYPES,
    Adapter,
    ExpertWeights,
    QuantizedModelError,
    UnsupportedModelError,
    expert_forward,
    get_adapter,
)

TOL = dict(atol=1e-5, rtol=1e-5)


@dataclass
class Captured:
    name: str
    model: torch.nn.Module
    adapter: Adapter
    disk: dict[str, torch.Tensor]  # the safetensors file as save_pretrained wrote it
    router_in: dict[int, torch.Tensor]  # [T, H] per MoE layer
    router_out: dict[int, tuple]  # (logits, weights, index) as the model's router returned them
    router_logits: dict[int, torch.Tensor]  # from output_router_logits=True
    block_in: dict[int, torch.Tensor]  # [T, H] per layer (MoE and dense)
    block_out: dict[int, torch.Tensor]


@pytest.fixture(scope="module", params=list(CONFIGS))
def cap(request, tmp_path_factory) -> Captured:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    tiny_model(name).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        disk = {k: f.get_tensor(k) for k in f.keys()}
    adapter = get_adapter(model.config)
    hidden = model.config.hidden_size
    c = Captured(name, model, adapter, disk, {}, {}, {}, {}, {})

    def on_router(layer):
        def hook(module, args, out):
            c.router_in[layer] = args[0].reshape(-1, hidden).detach()
            c.router_out[layer] = tuple(t.detach() for t in adapter.router_output(out))

        return hook

    def on_block(layer):
        def hook(module, args, out):  # the block and a shared MLP beside it (granitemoeshared) see the same input
            c.block_in[layer] = args[0].reshape(-1, hidden).detach()
            out = (out[0] if isinstance(out, tuple) else out).reshape(-1, hidden).detach()
            c.block_out[layer] = c.block_out[layer] + out if layer in c.block_out else out

        return hook

    handles = [adapter.router_module(model, i).register_forward_hook(on_router(i)) for i in adapter.moe_layers]
    for i in adapter.moe_layers:  # the MoE output, plus a shared MLP beside the block (granitemoeshared)
        _, *beside = adapter.mlp_modules(model, i)
        handles += [m.register_forward_hook(on_block(i)) for m in (adapter.moe_output_module(model, i), *beside)]
    handles += [m.register_forward_hook(on_block(i))
                for i in adapter.dense_layers for m in adapter.mlp_modules(model, i)]
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randint(0, model.config.vocab_size, (2, 16)), output_router_logits=True)
    for h in handles:
        h.remove()
    c.router_logits = dict(zip(adapter.moe_layers, out.router_logits, strict=True))
    return c


def _sorted(index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's selection by expert id (deepseek's topk is unsorted)."""
    index, order = index.sort(-1)
    return index, weights.gather(-1, order)


def _same_weights(a: ExpertWeights, b: ExpertWeights) -> None:
    for f in fields(ExpertWeights):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            torch.testing.assert_close(x, y, atol=0, rtol=0, msg=f.name)
        else:
            assert x == y, f.name


def test_routing_matches_model(cap: Captured):
    ad, model = cap.adapter, cap.model
    assert ad.moe_layers and set(ad.moe_layers) == set(cap.router_in)
    for layer in ad.moe_layers:
        logits = ad.router_logits(model, layer, cap.router_in[layer])
        r = ad.route(model, layer, logits)
        first = r.probs if ad.spec.router.returns_probs else logits  # what the router returns first
        torch.testing.assert_close(first, cap.router_out[layer][0].float(), **TOL)
        torch.testing.assert_close(first, cap.router_logits[layer].float(), **TOL)
        assert r.probs.shape == (logits.shape[0], ad.num_experts) and r.index.shape == r.weights.shape
        expected = torch.sigmoid(logits) if ad.spec.router.score == "sigmoid" else logits.softmax(-1)
        torch.testing.assert_close(r.probs, expected, **TOL)
        got_i, got_w = _sorted(r.index, r.weights)
        want_i, want_w = _sorted(cap.router_out[layer][2], cap.router_out[layer][1].float())
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_w, want_w, **TOL)
        if ad.renormalizes:
            torch.testing.assert_close(r.weights.sum(-1), torch.full_like(r.weights[:, 0], ad.routed_scaling_factor))
        # Grouping / the correction bias must actually change the choice here, or the test proves nothing about them.
        if ad.router_params.n_group or ad.spec.router.bias_attr:
            greedy = r.probs.topk(ad.top_k, -1).indices.sort(-1).values
            assert not torch.equal(greedy, got_i)


def test_block_output_is_weighted_sum_of_experts(cap: Captured):
    ad, model = cap.adapter, cap.model
    for layer in ad.moe_layers:
        xr, x, y = cap.router_in[layer], cap.block_in[layer], cap.block_out[layer]
        torch.testing.assert_close(ad.expert_input(model, layer, xr), x, atol=0, rtol=0)  # router vs experts input
        r = ad.route(model, layer, ad.router_logits(model, layer, xr))
        f = torch.stack([expert_forward(ad.expert_weights(model, layer, e), x) for e in range(ad.num_experts)])
        recon = sum(ad.routed_output(ad.expert_weights(model, layer, e), x, (r.weights * (r.index == e)).sum(1))
                    for e in range(ad.num_experts))  # g = 0 off the top-k: adds exactly 0 (no expert biases here)
        if not ad.spec.layout.has_bias:
            assert torch.allclose(
                recon, (r.weights[..., None] * f[r.index, torch.arange(x.shape[0])[:, None]]).sum(1), **TOL
            ) != ad.spec.router.scales_input  # input scaling really differs from output scaling
        for shared in ad.shared_experts(model, layer):
            recon = recon + ad.shared_gate(shared, x)[:, None] * ad.expert_forward(shared.weights, x)
        torch.testing.assert_close(recon, y, **TOL)
        with torch.no_grad():
            torch.testing.assert_close(ad.block_forward(model, layer, xr), y, **TOL)
        assert ad.dense_mlp_weights(model, layer) is None
    for layer in ad.dense_layers:
        dense = ad.dense_mlp_weights(model, layer)
        torch.testing.assert_close(expert_forward(dense, cap.block_in[layer]), cap.block_out[layer], **TOL)


SHARED_KIND = {  # families with shared experts: gated (a sigmoid gate per token) or ungated
    "qwen2_moe": "gated",
    "deepseek_v2": "ungated",
    "deepseek_v3": "ungated",
    "glm4_moe": "ungated",
    "glm4_moe_lite": "ungated",
    "dots1": "ungated",
    "qwen3_next": "gated",
    "qwen3_5_moe_text": "gated",
    "hunyuan_v1_moe": "ungated",
    "granitemoeshared": "ungated",
    "ernie4_5_moe": "ungated",
    "llama4_text": "ungated",
    "nemotron_h": "ungated",
}


def test_shared_experts_kind(cap: Captured):
    ad, model = cap.adapter, cap.model
    shared = ad.shared_experts(model, ad.moe_layers[0])
    kind = SHARED_KIND.get(ad.model_type)
    assert len(shared) == (kind is not None)
    if kind:
        assert (shared[0].gate_weight is not None) == (kind == "gated")


def test_expert_weights_from_disk_and_state_dict(cap: Captured):
    ad, model = cap.adapter, cap.model
    state = model.state_dict()
    for layer in ad.moe_layers:
        disk_names = ad.expert_tensor_names(layer, cap.disk.keys())
        assert disk_names and set(disk_names) <= set(ad.expert_tensor_names(layer))
        assert ad.expert_tensor_names(layer, state.keys()) == [n for n in ad.expert_tensor_names(layer) if n in state]
        for e in range(ad.num_experts):
            mem = ad.expert_weights(model, layer, e)
            assert mem.up.shape == (ad.intermediate_size, model.config.hidden_size)
            assert (mem.gate is not None) == ad.spec.layout.has_gate
            assert mem.gate is None or mem.gate.shape == mem.up.shape
            assert mem.down.shape == (model.config.hidden_size, ad.intermediate_size)
            _same_weights(ad.expert_weights_from_tensors(cap.disk, layer, e), mem)
            _same_weights(ad.expert_weights_from_tensors(state, layer, e), mem)
    with pytest.raises(KeyError):
        ad.expert_weights_from_tensors({}, ad.moe_layers[0], 0)


def test_all_expert_outputs_matches_loop(cap: Captured):
    ad, model = cap.adapter, cap.model
    layer = ad.moe_layers[-1]
    x = cap.block_in[layer]
    loop = torch.stack([expert_forward(ad.expert_weights(model, layer, e), x) for e in range(ad.num_experts)])
    with torch.no_grad():
        torch.testing.assert_close(ad.all_expert_outputs(model, layer, x), loop, **TOL)
        torch.testing.assert_close(ad.all_expert_outputs(model, layer, x, experts=[5, 2]), loop[[5, 2]], **TOL)


def test_layout_matches_transformers_flags(cap: Captured):
    """The spec's layout flags agree with those transformers' @use_experts_implementation sets on the module."""
    ad = cap.adapter
    experts = ad.mlp(cap.model, ad.moe_layers[0]).experts
    layout = ad.spec.layout
    E, H, I = ad.num_experts, cap.model.config.hidden_size, ad.intermediate_size
    fused, width = ("gate_up_proj", 2 * I) if layout.has_gate else ("up_proj", I)  # nemotron_h: up-only
    assert tuple(getattr(experts, fused).shape) == ((E, H, width) if layout.transposed else (E, width, H))
    if not hasattr(experts, "is_transposed"):  # not decorated (llama4_text): the shapes above are the check
        return
    assert (experts.is_transposed, experts.is_concatenated, experts.has_bias, experts.has_gate) == (
        layout.transposed,
        not layout.interleaved,
        layout.has_bias,
        layout.has_gate,
    )


def test_gpt_oss_clamp_is_exercised():
    """The tiny gpt_oss model pushes gate pre-activations past swiglu_limit, so the block test covers the clamp."""
    model = tiny_model("gpt_oss")
    ad = get_adapter(model.config)
    w = ad.expert_weights(model, 0, 0)
    x = torch.randn(64, model.config.hidden_size)
    assert w.act == "gpt_oss_clamped" and (x @ w.gate.T + w.gate_bias).abs().max() > ad.act_params[1]


EXPECTED = {  # name: (model_type, dense_model_type, E, k, I, renormalizes, scaling, moe_layers)
    "qwen3_moe": ("qwen3_moe", "qwen3", 8, 2, 16, True, 1.0, [0, 1]),
    "qwen2_moe": ("qwen2_moe", "qwen2", 8, 2, 16, False, 1.0, [0, 1]),
    "olmoe": ("olmoe", "olmoe", 8, 2, 16, False, 1.0, [0, 1]),
    "mixtral": ("mixtral", "mistral", 8, 2, 16, True, 1.0, [0, 1]),
    "deepseek_v2": ("deepseek_v2", "deepseek_v2", 8, 2, 16, False, 1.5, [1, 2]),
    "deepseek_v2_greedy": ("deepseek_v2", "deepseek_v2", 8, 2, 16, False, 1.0, [1, 2]),
    "deepseek_v3": ("deepseek_v3", "deepseek_v3", 8, 2, 16, True, 1.5, [1, 2]),
    "gpt_oss": ("gpt_oss", "gpt_oss", 8, 2, 16, True, 1.0, [0, 1]),
    "glm4_moe": ("glm4_moe", "glm4_moe", 8, 2, 16, True, 2.5, [1, 2]),
    "glm4_moe_lite": ("glm4_moe_lite", "glm4_moe_lite", 8, 2, 16, True, 1.8, [1, 2]),
    "minimax_m2": ("minimax_m2", "minimax_m2", 8, 2, 16, True, 1.0, [0, 1]),
    "dots1": ("dots1", "dots1", 8, 2, 16, True, 2.5, [1, 2]),
    "qwen3_next": ("qwen3_next", "qwen3_next", 8, 2, 16, True, 1.0, [0, 1, 2, 3]),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", "qwen3_5_text", 8, 2, 16, True, 1.0, [0, 1, 2, 3]),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", "hunyuan_v1_dense", 8, 2, 16, True, 1.0, [0, 1]),
    "granitemoe": ("granitemoe", "granite", 8, 2, 16, True, 1.0, [0, 1]),
    "granitemoeshared": ("granitemoeshared", "granite", 8, 2, 16, True, 1.0, [0, 1]),
    "ernie4_5_moe": ("ernie4_5_moe", "ernie4_5", 8, 2, 16, True, 1.0, [1, 2]),
    "llama4_text": ("llama4_text", "llama4_text", 8, 2, 16, False, 1.0, [1, 3]),
    "nemotron_h": ("nemotron_h", "nemotron_h", 8, 2, 16, True, 2.5, [1, 3]),
    # renormalised, but per_expert_scale makes the applied weights' sum vary: routed mass measured, not 1
    "gemma4_text": ("gemma4_text", "gemma4_text", 8, 2, 16, False, 1.0, [0, 1, 2]),
}
# Families whose router runs group-limited top-k (always on in the DeepSeek-V3 router, a single group in the
# published GLM and dots1 checkpoints).
GROUPED = {"deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "nemotron_h"}


NO_MLP_LAYERS = {"nemotron_h": [0, 2]}  # hybrid layers that are neither MoE nor dense MLP (Mamba, attention)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_adapter_facts(name):
    ad = get_adapter(tiny_config(name))
    got = (
        ad.model_type,
        ad.dense_model_type,
        ad.num_experts,
        ad.top_k,
        ad.intermediate_size,
        ad.renormalizes,
        ad.routed_scaling_factor,
        ad.moe_layers,
    )
    assert got == EXPECTED[name]
    no_mlp = NO_MLP_LAYERS.get(name, [])
    assert ad.dense_layers == [i for i in range(ad.num_layers) if i not in ad.moe_layers + no_mlp]
    assert (ad.router_params.n_group is not None) == (name in GROUPED)


def test_every_family_has_a_tiny_model():
    # The per-family tests (here, test_assemble, test_select_families) parametrize over tiny_models.FAMILIES.
    assert sorted(tiny_config(name).model_type for name in FAMILIES) == sorted(SUPPORTED_MODEL_TYPES)


def test_qwen_sparse_step_and_mlp_only_layers():
    config = tiny_config("qwen3_moe")
    config.num_hidden_layers, config.decoder_sparse_step, config.mlp_only_layers = 6, 2, [3]
    ad = get_adapter(config)
    assert (ad.moe_layers, ad.dense_layers) == ([1, 5], [0, 2, 3, 4])


def test_qwen3_next_hybrid_pattern_and_mlp_only_layers():
    config = tiny_config("qwen3_next")
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]  # the published interval of 4
    config.mlp_only_layers = [2]
    assert (get_adapter(config).moe_layers, get_adapter(config).dense_layers) == ([0, 1, 3], [2])


def test_qwen3_5_moe_router_renormalises_without_a_config_switch():
    config = tiny_config("qwen3_5_moe_text")
    assert not hasattr(config, "norm_topk_prob") and get_adapter(config).renormalizes


def test_multimodal_wrapper_names_its_text_model():
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig

    from moe2dense.arch.registry import check_config_keys

    with pytest.raises(UnsupportedModelError, match="qwen3_5_moe_text.*save_original_format=False"):
        get_adapter(Qwen3_5MoeConfig(text_config=tiny_config("qwen3_5_moe_text").to_dict()))
    with pytest.raises(UnsupportedModelError, match="config.json: .*multimodal wrapper"):
        check_config_keys({"model_type": "qwen3_5_moe", "text_config": {}}, "config.json")


def test_glm4_moe_lite_mlp_layer_types_and_its_dense_twin():
    from moe2dense.assemble import student_config

    config = tiny_config("glm4_moe_lite")
    config.num_hidden_layers, config.mlp_layer_types = 4, ["dense", "sparse", "dense", "sparse"]
    ad = get_adapter(config)
    assert (ad.moe_layers, ad.dense_layers) == ([1, 3], [0, 2])
    student = student_config(config, ad, 64, torch.float32)
    assert (student.model_type, student.mlp_layer_types, student.intermediate_size) == (
        "glm4_moe_lite", ["dense"] * 4, 64)
    assert (student.q_lora_rank, student.kv_lora_rank) == (config.q_lora_rank, config.kv_lora_rank)  # MLA kept


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
    assert "llama" in str(err.value) and all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)


def test_unsupported_variants():
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        get_adapter(Qwen3MoeConfig(hidden_act="gelu"))
    config = tiny_config("deepseek_v2")
    config.topk_method = "noaux_tc"  # transformers' DeepseekV2TopkRouter has no such branch
    with pytest.raises(UnsupportedModelError, match="topk_method"):
        get_adapter(config)


@pytest.mark.parametrize(
    "quantization_config", [{"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}, Mxfp4Config()]
)
def test_published_quantization_is_accepted(quantization_config):
    """GPT-OSS's MXFP4 (a dict or transformers' config object) and DeepSeek-V3's block FP8 are read dequantized."""
    config = GptOssConfig(num_hidden_layers=1)
    config.quantization_config = quantization_config
    assert get_adapter(config).model_type == "gpt_oss"
    config = tiny_config("deepseek_v3")
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert get_adapter(config).model_type == "deepseek_v3"


def test_other_quantization_is_rejected_with_the_way_out():
    config = tiny_config("qwen3_moe")
    config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(QuantizedModelError, match=r"'compressed-tensors'.*CompressedTensorsConfig"):
        get_adapter(config)


def test_hunyuan_per_layer_top_k():
    """moe_topk may be a per-layer list: one repeated value is that k; differing values cannot be converted."""
    config = tiny_config("hunyuan_v1_moe")
    assert isinstance(config.moe_topk, list) and get_adapter(config).router_params.top_k == 2
    config.moe_topk = [2, 3]
    with pytest.raises(UnsupportedModelError, match=r"moe_topk=\[2, 3\]"):
        get_adapter(config)


def test_granitemoeshared_without_shared_mlp():
    """shared_intermediate_size=0 builds no shared MLP: the adapter then has none either."""
    config = tiny_config("granitemoeshared")
    config.shared_intermediate_size = 0
    model = AutoModelForCausalLM.from_config(config)
    ad = get_adapter(model)
    assert ad.spec.shared_attr is None and ad.shared_experts(model, 0) == []
    assert len(ad.mlp_modules(model, 0)) == 1


def test_config_keys_accept_a_per_layer_top_k_list():
    from moe2dense.arch.registry import check_config_keys

    raw = tiny_config("hunyuan_v1_moe").to_dict()
    assert raw["moe_topk"] == [2, 2]
    check_config_keys(raw, "config.json")
    raw["moe_topk"] = [2, 0]
    with pytest.raises(ValueError, match=r"num_experts_per_tok=\[2, 0\] must be a positive integer"):
        check_config_keys(raw, "config.json")
def _moe_layers_in_model(model, ad: Adapter) -> list[int]:
    """The layers whose block transformers built as an MoE block (it has the family's router)."""
    return [i for i, layer in enumerate(ad.decoder(model).layers)
            if hasattr(getattr(layer, ad.spec.block_attr), ad.spec.router_attr)]


@pytest.mark.parametrize("name, changes, moe", [
    ("ernie4_5_moe", dict(num_hidden_layers=6, moe_layer_start_index=1, moe_layer_end_index=4, moe_layer_interval=2),
     [1, 3]),
    ("ernie4_5_moe", dict(num_hidden_layers=5, moe_layer_start_index=2, moe_layer_end_index=-1), [2, 3, 4]),
    ("llama4_text", dict(num_hidden_layers=6, interleave_moe_layer_step=3, moe_layers=None), [2, 5]),
    ("llama4_text", dict(num_hidden_layers=5, moe_layers=[0, 2, 3]), [0, 2, 3]),
])
def test_moe_layer_patterns_match_transformers(name, changes, moe):
    derived = dict(layer_types=None, no_rope_layers=None) if name == "llama4_text" else {}  # re-derived per length
    config = type(tiny_config(name))(**{**tiny_config(name).to_dict(), **derived, **changes})
    ad = get_adapter(config)
    assert ad.moe_layers == moe == _moe_layers_in_model(AutoModelForCausalLM.from_config(config), ad)


def test_ernie_renorm_clamp_is_the_models():
    """moe_norm_min above k / E binds on tokens whose top-k mass is below it: weights then sum to less than 1."""
    config = tiny_config("ernie4_5_moe")
    config.moe_norm_min = 0.45  # k / E = 0.25
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ad = get_adapter(model)
    assert ad.router_params.renorm_min == 0.45 and not ad.renormalizes
    router = ad.router_module(model, 1)
    router.weight.data.normal_(0.0, 0.3)
    x = torch.randn(64, config.hidden_size)
    with torch.no_grad():
        logits, weights, index = router(x)
    r = ad.route(model, 1, ad.router_logits(model, 1, x))
    assert torch.equal(r.index, index)
    torch.testing.assert_close(r.weights, weights, atol=0, rtol=0)
    sums = r.weights.sum(-1)
    assert (sums < 0.999).any() and torch.allclose(sums[sums < 0.999], r.probs.gather(1, r.index).sum(-1)[sums < 0.999]
                                                    / 0.45)
    assert get_adapter(tiny_config("ernie4_5_moe")).renormalizes  # the default 1e-12 never binds


def test_llama4_topk_on_logits_where_sigmoid_saturates():
    """Logits far enough apart to order but whose sigmoids are all 1.0 in fp32: the model ranks the logits."""
    model = tiny_model("llama4_text")
    ad = get_adapter(model)
    router = ad.router_module(model, 1)
    x = torch.zeros(1, model.config.hidden_size)
    x[0, 0] = 1.0
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([17.0, 0.0, 30.0, 25.0, 18.0, -3.0, 19.0, 1.0])
        scores, logits = router(x)
    r = ad.route(model, 1, ad.router_logits(model, 1, x))
    assert r.probs[0, [0, 2, 3, 4, 6]].eq(1.0).all()  # saturated: ranking by p_t would be arbitrary
    assert sorted(r.index[0].tolist()) == [2, 3] == sorted(ad.router_output((scores, logits))[2][0].tolist())


def test_ernie_use_bias_is_refused():
    config = tiny_config("ernie4_5_moe")
    config.use_bias = True
    with pytest.raises(UnsupportedModelError, match=r"use_bias=True.*supported: \(False, None\)"):
        get_adapter(config)


def test_nemotron_h_hybrid_layers_and_refusals():
    """Mamba and attention layers have no MLP; a latent MoE or a non-relu^2 MLP is refused before any load."""
    config = tiny_config("nemotron_h")
    config.layers_block_type = ["linear_attention", "moe", "mlp", "full_attention", "moe"]
    ad = get_adapter(config)
    assert (ad.moe_layers, ad.dense_layers, ad.mlp_layers) == ([1, 4], [2], [1, 2, 4])
    for field, value in (("moe_latent_size", 16), ("mlp_hidden_act", "silu")):
        config = tiny_config("nemotron_h")
        setattr(config, field, value)
        with pytest.raises(UnsupportedModelError, match=field):
            get_adapter(config)


def test_gemma4_text_refusals():
    """A dense gemma4_text (no MoE block) or another MLP activation is refused, naming the field."""
    for field, value in (("enable_moe_block", False), ("hidden_activation", "silu")):
        config = tiny_config("gemma4_text")
        setattr(config, field, value)
        with pytest.raises(UnsupportedModelError, match=field):
            get_adapter(config)


@pytest.mark.parametrize("name, layers_key",
                         [("nemotron_h", "layers_block_type"), ("gemma4_text", "num_hidden_layers")])
def test_config_keys_of_hybrid_and_renamed_families(name, layers_key, tmp_path):
    """config.json as save_pretrained writes it passes; without the layer list (nemotron_h has no num_hidden_layers
    on disk) or the family's top-k field it is refused, naming the key."""
    import json

    from moe2dense.arch.registry import check_config_keys

    tiny_config(name).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    check_config_keys(raw, "config.json")
    for key in (layers_key, get_adapter(tiny_config(name)).spec.top_k_attr):
        with pytest.raises(ValueError, match=f"no '{key}'"):
            check_config_keys({k: v for k, v in raw.items() if k != key}, "config.json")
    if name == "nemotron_h":  # older checkpoints give the pattern string instead
        check_config_keys({**{k: v for k, v in raw.items() if k != layers_key}, "hybrid_override_pattern": "ME*E"},
                          "config.json")
