"""Dense assembly on every family: the algebra of the paper's Eq. 2, checked on tiny models saved to disk.

(a) a teacher whose router weighs all E experts equally with top-k = E, converted with K = E and uniform scaling,
    gives the teacher's logits; (b) the dense MLP equals sum_g c_g E_g(x) with E_g the merged expert (GPT-OSS biases
    and clamp included); (c) K == k copies the selected experts bit for bit; (d) the student reloads (no missing or
    unexpected keys, no routed experts) and generates.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moe2dense.arch import expert_forward, get_adapter
from moe2dense.assemble import assemble, student_config, student_layout
from moe2dense.calibrate.capture import capture
from moe2dense.calibrate.store import read_meta
from moe2dense.checkpoint import CheckpointReader
from moe2dense.grouping import merge_experts
from moe2dense.plan import build_plan
from moe2dense.selection import score_frame, select_from_scores
from moe2dense.teacher_weights import read_experts
from tiny_models import FAMILIES, tiny_config, tiny_model

DENSE = {  # teacher model_type -> its dense student's
    "qwen3_moe": "qwen3",
    "qwen2_moe": "qwen2",
    "olmoe": "olmoe",
    "mixtral": "mistral",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "gpt_oss": "gpt_oss",
    "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite",
    "minimax_m2": "minimax_m2",
    "dots1": "dots1",
    "qwen3_next": "qwen3_next",
    "qwen3_5_moe_text": "qwen3_5_text",
    "hunyuan_v1_moe": "hunyuan_v1_dense",
    "granitemoe": "granite",
    "granitemoeshared": "granite",
    "ernie4_5_moe": "ernie4_5",
    "llama4_text": "llama4_text",
    "nemotron_h": "nemotron_h",
    "gemma4_text": "gemma4_text",
}


def _batches(vocab: int, n: int = 4, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [(ids[i:i + 2], ["a", "b"][: len(ids[i:i + 2])]) for i in range(0, n, 2)]


def _convert(model, tmp_path, *, method="sf", K=None, group="output", blocks=None, scaling="uniform",
             align=False, save=True):
    """Save the teacher, calibrate on random tokens, select, group and assemble: the stages' library calls."""
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    if save:
        model.save_pretrained(teacher_dir)
    adapter = get_adapter(model)
    calib = tmp_path / "calibration"
    stats = capture(model, _batches(model.config.vocab_size), calib, needs={"routing", "routed_outputs", "all_outputs"},
                    progress=False, writer_threads=0)
    K = K or adapter.top_k
    scores = score_frame(stats, [method])
    order = select_from_scores(scores, method, K, adapter.top_k)
    with CheckpointReader(teacher_dir) as reader:
        plan = build_plan(adapter, stats, order, scores=scores, score_method=method, group_method=group, blocks=blocks,
                          align=align, scaling=scaling, reader=reader, calibration=calib,
                          shared_gate_mean=read_meta(calib)["shared_gate_mean"])
    out.mkdir()
    summary = assemble(teacher_dir, plan, out, progress=False)
    return plan, summary, teacher_dir, out


def _load(out):
    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return student.eval()


@torch.no_grad()
def _uniform_router_teacher(family: str):
    """top-k = E and every router logit 0: each expert gets the same weight on every token."""
    config = tiny_config(family)
    spec = get_adapter(config).spec
    E = getattr(config, spec.num_experts_attr)
    setattr(config, spec.top_k_attr, E)
    if get_adapter(config).router_params.n_group:  # group-limited routers: every group eligible
        config.topk_group = config.n_group
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    routers = {id(p) for i in adapter.moe_layers for p in adapter.router_module(model, i).parameters()}
    for name, p in model.named_parameters():
        if spec.router.expert_scale_attr and name.endswith(spec.router.expert_scale_attr):
            continue  # gemma4_text's per_expert_scale stays 1 (init), or no uniform c could reproduce it
        if id(p) in routers or "shared_expert_gate" in name:
            p.zero_()  # routers (and qwen2_moe's shared gate: sigmoid(0) = 0.5 on every token)
        elif name.endswith("_bias") and ".experts." in name:
            p.normal_(0.0, 0.1)
        elif name.endswith("experts.gate_up_proj") and family == "gpt_oss":
            p.mul_(100.0)  # past swiglu_limit: the clamp must survive concatenation
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_router_all_experts_reproduces_teacher_logits(family, tmp_path):
    teacher = _uniform_router_teacher(family)
    E = get_adapter(teacher).num_experts
    plan, summary, _, out = _convert(teacher, tmp_path, K=E)
    assert plan.pure_pruning and summary["model_type"] == DENSE[family]
    student = _load(out)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = teacher(ids).logits, student(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    _assert_no_routed_experts(student, teacher)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_adapter(tiny_config(f)).spec.router.expert_scale_attr])
def test_per_expert_scale_is_folded_into_c(family, tmp_path):
    """gemma4_text: uniform router, every expert kept, a random per_expert_scale: score scaling (c_g = the expert's
    mean applied weight) puts the scale into c, and the student reproduces the teacher's logits."""
    teacher = _uniform_router_teacher(family)
    adapter = get_adapter(teacher)
    with torch.no_grad():
        for layer in adapter.moe_layers:
            getattr(adapter.router_module(teacher, layer), adapter.spec.router.expert_scale_attr).uniform_(0.5, 1.5)
    plan, _, _, out = _convert(teacher, tmp_path, K=adapter.num_experts, scaling="score")
    scales = [g.scale for g in plan.layers[adapter.moe_layers[0]].groups]
    assert max(scales) - min(scales) > 0.01  # the scale is not uniform, so c must carry it
    student = _load(out)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-4, rtol=0)


def _assert_no_routed_experts(student, teacher):
    """Dense twins have no experts at all; single-expert students have exactly one, always on: every expert or
    router tensor with one row per expert in the teacher is absent from the student or has one row."""
    E = get_adapter(teacher).num_experts
    per_expert = [n for n, t in teacher.state_dict().items() if t.dim() and t.shape[0] == E
                  and (".experts." in n or ".gate." in n or ".router." in n)]
    state = student.state_dict()
    assert per_expert and all(n not in state or state[n].shape[0] == 1 for n in per_expert), \
        {n: tuple(state[n].shape) for n in per_expert if n in state}


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_mlp_is_the_scaled_sum_of_merged_experts(family, tmp_path):
    teacher = tiny_model(family)
    adapter = get_adapter(teacher)
    plan, _, teacher_dir, out = _convert(teacher, tmp_path, method="reap", K=6, group="output", scaling="score",
                                         align=True)
    assert not plan.pure_pruning and plan.blocks_per_layer == adapter.top_k
    student = _load(out)
    xr = torch.randn(5, teacher.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    with CheckpointReader(teacher_dir) as reader, torch.no_grad():
        for layer in adapter.moe_layers:
            x = adapter.expert_input(teacher, layer, xr)  # the experts' input for router input xr
            lp = plan.layers[layer]
            experts = read_experts(reader, adapter, layer, [e for g in lp.groups for e in g.experts])
            merged = [merge_experts([experts[e] for e in g.experts], list(g.weights), align=True) for g in lp.groups]
            want = sum(adapter.routed_output(w, x, torch.full((x.shape[0],), g.scale))
                       for w, g in zip(merged, lp.groups))  # g.scale on the input where the family scales it
            for s, shared in zip(lp.shared, adapter.shared_experts(teacher, layer)):
                want = want + s.scale * expert_forward(shared.weights, x)
            if adapter.spec.dense_mlp == "single_expert":  # its own router (weight 1) and its one expert
                got = get_adapter(student).block_forward(student, layer, xr)
            else:
                mlp = getattr(student.model.layers[layer], adapter.spec.dense_mlp_attr)
                with torch.no_grad():
                    got = mlp(x[None])
                    got = (got[0] if isinstance(got, tuple) else got)[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_pure_pruning_copies_selected_experts_bit_for_bit(family, tmp_path):
    teacher = tiny_model(family)
    adapter = get_adapter(teacher)
    plan, _, _, out = _convert(teacher, tmp_path, method="sf")
    assert plan.pure_pruning and plan.group_method is None
    student = _load(out)
    I = adapter.intermediate_size
    for layer in adapter.moe_layers:
        lp = plan.layers[layer]
        w = _student_mlp(student, adapter, layer)
        for b, g in enumerate(lp.groups):
            (e,) = g.experts
            src = adapter.expert_weights(teacher, layer, e)
            rows = slice(b * I, (b + 1) * I)
            if adapter.spec.router.scales_input:  # c_g folded into gate and up rows, down copied
                c = lambda t: (t.float() * g.scale).to(t.dtype)  # noqa: E731
                assert torch.equal(w.gate[rows], c(src.gate)) and torch.equal(w.up[rows], c(src.up))
                assert torch.equal(w.down[:, rows], src.down)
            else:
                assert torch.equal(w.up[rows], src.up)
                assert (w.gate is None) == (src.gate is None) and (src.gate is None
                                                                   or torch.equal(w.gate[rows], src.gate))
                assert torch.equal(w.down[:, rows], (src.down.float() * g.scale).to(src.down.dtype))
            if src.gate_bias is not None:
                assert torch.equal(w.gate_bias[rows], src.gate_bias) and torch.equal(w.up_bias[rows], src.up_bias)


def _student_mlp(student, adapter, layer):
    if adapter.spec.dense_mlp == "single_expert":
        return adapter.expert_weights(student, layer, 0)
    from moe2dense.arch.experts import mlp_weights
    return mlp_weights(getattr(student.model.layers[layer], adapter.spec.dense_mlp_attr), act=adapter.spec.layout.act)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_reloads_and_generates(family, tmp_path):
    teacher = tiny_model(family)
    _, summary, _, out = _convert(teacher, tmp_path, method="do_acp", K=4, group="dominant")
    student = _load(out)
    assert student.config.model_type == DENSE[family]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[get_adapter(teacher).spec.dense_width_attr] == summary["intermediate_size"]
    assert summary["num_parameters"] == sum(p.numel() for p in student.parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    gen = student.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # no early EOS
    assert gen.shape == (1, 10) and bool(np.isfinite(student(gen).logits.detach().numpy()).all())
    assert "moe2dense" in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
def test_hybrid_student_keeps_the_layer_pattern(family):
    """Qwen3-Next / Qwen3.5: the linear/full attention interleave and the DeltaNet shapes are the teacher's; every
    layer of the student has a plain MLP (qwen3_next: the same class with all layers in mlp_only_layers)."""
    teacher = tiny_config(family)
    config = student_config(teacher, get_adapter(teacher), 40, torch.float32)
    assert config.model_type == DENSE[family] and config.layer_types == teacher.layer_types
    assert all(getattr(config, k) == getattr(teacher, k) for k in ("linear_num_key_heads", "linear_num_value_heads",
                                                                   "linear_key_head_dim", "linear_conv_kernel_dim"))
    layout = student_layout(config)
    assert not [n for n in layout if ".experts." in n or ".gate." in n or "shared_expert" in n]
    for i, kind in enumerate(teacher.layer_types):
        assert layout[f"model.layers.{i}.mlp.gate_proj.weight"][0] == (40, teacher.hidden_size)
        assert (f"model.layers.{i}.linear_attn.out_proj.weight" in layout) == (kind == "linear_attention")
        assert (f"model.layers.{i}.self_attn.o_proj.weight" in layout) == (kind == "full_attention")
