"""The generic path (moe2dense/arch/generic.py) on families without a written spec, tiny models built from configs.

Accepted (discovered, verified on the spot, converted; a uniform router with every expert kept reproduces the
teacher's logits): flex_olmo (softmax top-k, norm_topk_prob, every layer MoE; student: flex_olmo with one expert)
and jamba (unnormalised softmax top-k, MoE every other layer between Mamba mixers; student: jamba with one expert,
which the class builds as a plain MLP in every layer). Refused by the on-the-spot check, before any output: phimoe
(sparsemixer router) and flint (sigmoid router). Refused from the config alone: lfm2_moe (a selection bias buffer
on the block; w1/w3/w2 dense MLPs), a model_type transformers does not know; llama (no experts) in test_arch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, FlexOlmoConfig, FlintConfig, JambaConfig, Lfm2MoeConfig,
                          PhimoeConfig)

from moe2dense.__main__ import main
from moe2dense.arch import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from moe2dense.arch.generic import verify_teacher
from moe2dense.arch.registry import check_config_keys, is_generic
from moe2dense.calibrate.capture import capture
from moe2dense.data.tokenizer import train_bpe
from test_assemble import _convert, _load

ROOT = Path(__file__).resolve().parents[1]
_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "flex_olmo": lambda **kw: FlexOlmoConfig(**{**_COMMON, "intermediate_size": 16, "num_experts": 8, **kw}),
    # attn_layer_period=2: Mamba, attention, Mamba, attention; expert_layer_period=2: MoE in layers 1 and 3
    "jamba": lambda **kw: JambaConfig(**{**_COMMON, "num_hidden_layers": 4, "intermediate_size": 16,
                                         "num_experts": 8, "attn_layer_period": 2, "attn_layer_offset": 1, **kw}),
    "phimoe": lambda **kw: PhimoeConfig(**{**_COMMON, "intermediate_size": 16, "num_local_experts": 8, **kw}),
    "flint": lambda **kw: FlintConfig(**{**_COMMON, "intermediate_size": 48, "moe_intermediate_size": 16,
                                         "shared_expert_intermediate_size": 24, "num_experts": 8,
                                         "mlp_only_layers": [], **kw}),
}


def _model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name](**kw), dtype=torch.float32).eval()


def _ids(vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def _refusal(err: BaseException, model_type: str) -> str:
    msg = str(err)
    assert "\n" not in msg and repr(model_type) in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES), msg
    return msg


def test_flex_olmo_spec_is_discovered_from_the_config():
    adapter = get_adapter(CONFIGS["flex_olmo"](norm_topk_prob=True))
    spec = adapter.spec
    assert is_generic(adapter) and adapter.moe_layers == [0, 1] and adapter.renormalizes
    assert (spec.block_attr, spec.router_attr, spec.num_experts_attr, spec.intermediate_attr) == (
        "mlp", "gate", "num_experts", "intermediate_size")
    assert not spec.layout.transposed and not spec.layout.interleaved and not spec.layout.has_bias
    # on-disk names from transformers' own conversion mapping (flex_olmo is stored like qwen2_moe)
    assert spec.disk_expert_prefix == "mlp.experts" and spec.disk_proj_names == ("gate_proj", "up_proj", "down_proj")
    assert spec.dense_mlp == "in_class" and spec.shared_attr is None
    assert not get_adapter(CONFIGS["flex_olmo"](norm_topk_prob=False)).renormalizes


def test_phimoe_disk_names_come_from_the_conversion_mapping():
    spec = get_adapter(CONFIGS["phimoe"]()).spec  # discovery passes; its router is refused on the spot (below)
    assert (spec.router_attr, spec.disk_block_attr, spec.disk_expert_prefix, spec.disk_proj_names) == (
        "router", "block_sparse_moe", "block_sparse_moe.experts", ("w1", "w3", "w2"))


@pytest.mark.parametrize("renorm", [False, True])
def test_flex_olmo_routing_is_verified_and_equals_the_models_router(renorm):
    model = _model("flex_olmo", norm_topk_prob=renorm)
    adapter = get_adapter(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    verify_teacher(model, adapter, _ids())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()), "the probe must restore the router"
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(2))
    for layer in adapter.moe_layers:
        _, weights, index = adapter.router_module(model, layer)(x)
        routing = adapter.route(model, layer, adapter.router_logits(model, layer, x))
        assert torch.equal(routing.index, index)
        torch.testing.assert_close(routing.weights, weights.float(), atol=1e-6, rtol=0)


def test_a_wrong_routing_rule_is_caught():
    """The check can fail: the same flex_olmo model under the opposite renormalisation is refused."""
    model = _model("flex_olmo", norm_topk_prob=False)
    adapter = get_adapter(model)
    wrong = dataclasses.replace(adapter, router_params=dataclasses.replace(adapter.router_params, renorm=True))
    with pytest.raises(UnsupportedModelError, match="renormalised=True"):
        verify_teacher(model, wrong, _ids())


@pytest.mark.parametrize("name, dense", [("flex_olmo", False), ("jamba", True)])
@torch.no_grad()
def test_uniform_router_every_expert_kept_reproduces_teacher_logits(name, dense, tmp_path):
    config = CONFIGS[name](num_experts_per_tok=8)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    router = get_adapter(config).spec.router_attr
    for n, p in teacher.named_parameters():
        if n.endswith(f".{router}.weight"):
            p.zero_()
    plan, summary, _, out = _convert(teacher, tmp_path, K=8)
    assert plan.pure_pruning and summary["model_type"] == name and summary["intermediate_size"] == 8 * 16
    student = _load(out)
    assert student.config.num_experts == 1 and student.config.num_experts_per_tok == 1
    experts = [n for n in student.state_dict() if ".experts." in n]
    if dense:  # jamba builds a plain MLP in every layer when E is 1: no router, no experts left
        assert not experts and not any(f".{router}." in n for n in student.state_dict())
    else:
        assert student.model.layers[0].mlp.experts.gate_up_proj.shape == (1, 2 * 8 * 16, 32)
    ids = _ids(seed=3)
    want, got = teacher(ids, use_cache=False).logits, student(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_jamba_spec_has_its_dense_layers():
    adapter = get_adapter(CONFIGS["jamba"]())
    assert (adapter.moe_layers, adapter.dense_layers) == ([1, 3], [0, 2])
    assert (adapter.spec.block_attr, adapter.spec.router_attr, adapter.renormalizes) == ("feed_forward", "router",
                                                                                          False)


def test_merged_flex_olmo_student_reloads_and_generates(tmp_path):
    teacher = _model("flex_olmo", norm_topk_prob=True)
    _, summary, _, out = _convert(teacher, tmp_path, method="do_acp", K=4, group="dominant")
    student = _load(out)
    assert summary["num_parameters"] == sum(p.numel() for p in student.parameters())
    gen = student.generate(torch.tensor([[1, 5, 9, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 8)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    texts = [f"In the beginning {i} the word was {i * 7} and the light was good.\n" * 3 for i in range(200)]
    train_bpe(texts, vocab_size=300, min_frequency=2, out_dir=d)
    return d


def _saved(name: str, tokenizer_dir: Path, out: Path, **kw) -> Path:
    model = AutoModelForCausalLM.from_config(CONFIGS[name](vocab_size=320, max_position_embeddings=256, **kw))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_convert_cli_on_flex_olmo_from_another_cwd(tokenizer_dir, tmp_path):
    teacher = _saved("flex_olmo", tokenizer_dir, tmp_path / "teacher", norm_topk_prob=True)
    out, cwd = tmp_path / "dense", tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's moe2dense, whatever is installed
    proc = subprocess.run([sys.executable, "-m", "moe2dense", "convert", "--teacher", str(teacher), "--method", "sf",
                           "--experts", "4", "--calibration-tokens", "512", "--seq-len", "64", "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.model_type == "flex_olmo" and student.config.num_experts == 1
    assert student.config.intermediate_size == 2 * 16 and json.loads((out / "moe2dense_plan.json").read_text())


@pytest.mark.parametrize("name, kw, why", [
    ("phimoe", {}, "generic rule"),  # sparsemixer
    # sigmoid scores (and an ungated shared expert); renormalised, only the sharpened probe tells them apart
    ("flint", {"norm_topk_prob": False}, "generic rule"),
    ("flint", {"norm_topk_prob": True}, "generic rule"),
])
def test_other_routers_are_refused_before_any_output(name, kw, why, tokenizer_dir, tmp_path, capsys):
    model = _model(name, **kw)
    with pytest.raises(UnsupportedModelError) as err:
        capture(model, [(_ids(), ["a", "b"])], tmp_path / "calibration", needs={"routing"}, progress=False,
                writer_threads=0)
    assert why in _refusal(err.value, name) and not (tmp_path / "calibration").exists()
    teacher = _saved(name, tokenizer_dir, tmp_path / "teacher", **kw)
    out = tmp_path / "dense"
    assert main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "4", "--calibration-tokens",
                 "256", "--seq-len", "64", "--out", str(out)]) == 2
    assert why in _refusal(capsys.readouterr().err.strip().splitlines()[-1], name)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["teacher"]


def test_flint_shared_expert_is_discovered():
    spec = get_adapter(CONFIGS["flint"]()).spec
    assert (spec.shared_attr, spec.shared_gate_attr, spec.intermediate_attr) == (
        "shared_expert", None, "moe_intermediate_size")


def test_structures_the_generic_path_cannot_read_are_refused_from_the_config():
    lfm2 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                max_position_embeddings=64, layer_types=["conv", "full_attention"])
    for kw, why in (({"num_dense_layers": 0, "use_expert_bias": True}, "expert_bias"),
                    ({"num_dense_layers": 1, "use_expert_bias": False}, "neither its MoE block nor a SwiGLU MLP")):
        with pytest.raises(UnsupportedModelError) as err:
            get_adapter(Lfm2MoeConfig(**lfm2, **kw))
        assert why in _refusal(err.value, "lfm2_moe")
    raw = {"model_type": "no_such_family", "num_hidden_layers": 2}
    with pytest.raises(UnsupportedModelError) as err:
        check_config_keys(raw, "config.json")
    assert str(err.value).startswith("config.json: ") and "no_such_family" in str(err.value)


def test_a_student_that_does_not_compute_the_dense_mlp_is_refused(tmp_path, monkeypatch):
    """verify_student can fail: a writer that halves the down projection is caught before assemble returns."""
    import moe2dense.assemble as A

    real = A.MLP_WRITERS["in_class"]

    def halved(adapter, layer, block, keys):
        return {n: t / 2 if "down" in n else t for n, t in real(adapter, layer, block, keys).items()}

    monkeypatch.setitem(A.MLP_WRITERS, "in_class", halved)
    with pytest.raises(UnsupportedModelError) as err:
        _convert(_model("flex_olmo"), tmp_path, K=4)
    assert "differs from the dense MLP" in _refusal(err.value, "flex_olmo")


@torch.no_grad()
def test_checkpoint_experts_must_be_the_loaded_ones(tmp_path):
    """The on-disk read (names from the conversion mapping) is checked against the loaded teacher."""
    _model("flex_olmo").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    verify_teacher(model, adapter, _ids())
    model.model.layers[0].mlp.experts.down_proj[0].mul_(2)  # the blocks still agree with the rule; the disk does not
    with pytest.raises(UnsupportedModelError) as err:
        verify_teacher(model, adapter, _ids())
    assert "expert 0's down read from" in _refusal(err.value, "flex_olmo")
