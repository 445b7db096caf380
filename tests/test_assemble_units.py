"""Assembly's pieces pinned by hand (moe2dense/assemble.py), without a teacher model where none is needed:
`concat_blocks` on 2-wide blocks with known numbers, the model card's exact text, the small helpers (layer of a
tensor name, dtype cast, plan check, tokenizer and generation-config copies) and the per-family MLP writers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe2dense import assemble as A
from moe2dense.arch import ExpertWeights, get_adapter
from tiny_models import tiny_config


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ concat_blocks
# H = 2 hidden, block a: 1 neuron, c = 2; block b: 2 neurons, c = 0.5; width 4 (one zero-padded neuron).
BA = ExpertWeights(t([[1, 2]]), t([[3, 4]]), t([[1], [2]]))
BB = ExpertWeights(t([[5, 6], [7, 8]]), t([[9, 10], [11, 12]]), t([[1, 2], [3, 4]]))


def test_concat_stacks_rows_scales_down_columns_and_zero_pads():
    w = A.concat_blocks([(BA, 2.0), (BB, 0.5)], 4)
    assert torch.equal(w.gate, t([[1, 2], [5, 6], [7, 8], [0, 0]]))
    assert torch.equal(w.up, t([[3, 4], [9, 10], [11, 12], [0, 0]]))
    # down columns: block a's column times 2, block b's columns times 0.5, then the zero column
    assert torch.equal(w.down, t([[2, 0.5, 1, 0], [4, 1.5, 2, 0]]))
    assert w.gate_bias is None and w.up_bias is None and w.down_bias is None
    assert w.act == "swiglu" and w.gate.dtype == w.down.dtype == torch.float32
    # exactly full: no padding
    assert A.concat_blocks([(BB, 1.0), (BA, 1.0)], 3).gate.shape == (3, 2)


def test_concat_biases_stack_and_the_down_bias_is_the_scaled_sum():
    a = ExpertWeights(BA.gate, BA.up, BA.down, t([1]), t([2]), t([1, -1]))
    b = ExpertWeights(BB.gate, BB.up, BB.down, None, None, t([0.5, 0.5]))  # a down bias only
    w = A.concat_blocks([(a, 2.0), (b, 0.5)], 4)
    assert torch.equal(w.gate_bias, t([1, 0, 0, 0]))
    assert torch.equal(w.up_bias, t([2, 0, 0, 0]))
    assert torch.equal(w.down_bias, t([2 * 1 + 0.5 * 0.5, 2 * -1 + 0.5 * 0.5]))
    # down biases only: the gate/up biases are zero vectors, not None (any bias makes all three exist)
    only_down = A.concat_blocks([(b, 2.0)], 3)
    assert torch.equal(only_down.gate_bias, t([0, 0, 0])) and torch.equal(only_down.up_bias, t([0, 0, 0]))
    assert torch.equal(only_down.down_bias, t([1, 1]))
    # gate/up biases only: the down bias is a zero vector
    only_gate = ExpertWeights(BA.gate, BA.up, BA.down, t([3]), t([4]), None)
    w = A.concat_blocks([(only_gate, 2.0), (BB, 1.0)], 3)
    assert torch.equal(w.gate_bias, t([3, 0, 0])) and torch.equal(w.up_bias, t([4, 0, 0]))
    assert torch.equal(w.down_bias, t([0, 0]))


def test_concat_keeps_the_first_blocks_activation_parameters_and_casts_at_the_end():
    a = ExpertWeights(BA.gate, BA.up, BA.down, t([1]), t([2]), t([1.0, 0]), act="gpt_oss_clamped",
                      swiglu_alpha=1.5, swiglu_limit=3.0)
    # 1 + 3 * 2^-9 accumulates in float32 and only then rounds to bfloat16 (1 + 2^-7); summed in bfloat16 every
    # 2^-9 would be rounded away
    tiny = ExpertWeights(BA.gate, BA.up, BA.down, t([0]), t([0]), t([2.0 ** -9, 0]), act="gpt_oss_clamped")
    w = A.concat_blocks([(a, 1.0), (tiny, 1.0), (tiny, 1.0), (tiny, 1.0)], 4, torch.bfloat16)
    assert (w.act, w.swiglu_alpha, w.swiglu_limit) == ("gpt_oss_clamped", 1.5, 3.0)
    assert {x.dtype for x in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)} == {torch.bfloat16}
    assert w.down_bias.tolist() == [1 + 2.0 ** -7, 0.0]
    # c applied in float32 before the cast: 3 * (1/3) is 1.0 exactly in float32 rounding, then bfloat16
    third = ExpertWeights(BA.gate, BA.up, t([[3], [6]]))
    assert A.concat_blocks([(third, 1 / 3)], 1, torch.bfloat16).down.tolist() == [[1.0], [2.0]]


def test_concat_scales_a_bfloat16_block_in_float32():
    # (1 + 2^-7) * (1 + 2^-8) is exact in float32; a bfloat16 product would round it to 1 + 2^-7 or 1 + 2^-6
    x = torch.tensor([[1 + 2 ** -7]], dtype=torch.bfloat16)
    block = ExpertWeights(x, x, x, None, None, torch.tensor([1 + 2 ** -7], dtype=torch.bfloat16))
    w = A.concat_blocks([(block, 1 + 2 ** -8)], 1)
    want = (1 + 2 ** -7) * (1 + 2 ** -8)
    assert w.down.tolist() == [[want]] and w.down_bias.tolist() == [want] and w.down.dtype == torch.float32


def test_concat_errors_name_the_problem():
    clamped = ExpertWeights(BA.gate, BA.up, BA.down, act="gpt_oss_clamped")
    with pytest.raises(ValueError, match="^blocks with different activations cannot be concatenated$"):
        A.concat_blocks([(BA, 1.0), (clamped, 1.0)], 4)
    with pytest.raises(ValueError, match="^blocks have 3 neurons, more than the dense width 2$"):
        A.concat_blocks([(BA, 1.0), (BB, 1.0)], 2)


# -------------------------------------------------------------------------------------------------- small helpers
def test_layer_of_a_tensor_name():
    assert A._layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert A._layer_of("model.layers.0.input_layernorm.weight") == 0
    assert A._layer_of("model.embed_tokens.weight") is None
    assert A._layer_of("model.norm.weight") is None
    assert A._layer_of("lm_head.weight") is None
    assert A._layer_of("model.layers.x.mlp") is None  # not a number
    assert A._layer_of("other.layers.3.mlp") is None  # not under model.layers


def test_cast_changes_floats_only():
    assert A._cast(torch.float32, torch.bfloat16) == torch.bfloat16
    assert A._cast(torch.int64, torch.bfloat16) == torch.int64
    assert A._cast(torch.bool, torch.float16) == torch.bool


def _plan_json(**teacher):
    t = {"model_type": "qwen2_moe", "num_experts": 8, "top_k": 2, "num_layers": 2, "moe_layers": [0, 1],
         "dense_layers": []} | teacher
    groups = [{"experts": [0, 1], "weights": [0.5, 0.5], "scale": 0.5}, {"experts": [2], "weights": [1.0],
                                                                            "scale": 0.5}]
    return {"teacher": t, "score_method": "sf", "merge_scores": "sf", "experts_per_layer": 3, "blocks_per_layer": 2,
            "pure_pruning": False, "group_method": "output", "align": False, "scaling": "uniform",
            "layers": {"0": {"routed_mass": 1.0, "groups": groups}, "1": {"routed_mass": 1.0, "groups": groups}}}


def test_check_plan_refuses_another_teacher_naming_both():
    from moe2dense.plan import ConversionPlan

    adapter = get_adapter(tiny_config("qwen2_moe"))
    A.check_plan(ConversionPlan.model_validate(_plan_json()), adapter)  # the same teacher: no error
    for other in ({"model_type": "olmoe"}, {"num_experts": 16}, {"moe_layers": [0, 2], "num_layers": 3}):
        data = _plan_json(**other)
        data["layers"] = {str(i): data["layers"]["0"] for i in data["teacher"]["moe_layers"]}
        plan = ConversionPlan.model_validate(data)
        t = data["teacher"]
        with pytest.raises(ValueError) as err:
            A.check_plan(plan, adapter)
        assert str(err.value) == (
            f"the plan was made for a {t['model_type']} with {t['num_experts']} experts on layers "
            f"{t['moe_layers']}; this teacher is a qwen2_moe with 8 on [0, 1]: rerun grouping for this teacher")


def test_copy_tokenizer_copies_the_files_present_and_fails_naming_the_dir(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "merges.txt").write_text("a b")
    (src / "model.safetensors").write_text("not a tokenizer file")
    A.copy_tokenizer(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "tokenizer.json"]
    assert (out / "merges.txt").read_text() == "a b"
    with pytest.raises(FileNotFoundError) as err:
        A.copy_tokenizer(out / "none", out)
    assert str(err.value) == f"{out / 'none'}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)"


def test_generation_config_is_the_teachers_file_or_made_from_the_config(tmp_path):
    teacher, out = tmp_path / "teacher", tmp_path / "out"
    teacher.mkdir(), out.mkdir()
    config = tiny_config("qwen3_moe")
    A._generation_config(teacher, config, out)  # none in the teacher: from the config's token ids
    made = json.loads((out / "generation_config.json").read_text())
    assert (made["bos_token_id"], made["eos_token_id"], made["pad_token_id"]) == (1, 2, 0)
    (teacher / "generation_config.json").write_text('{"temperature": 0.25}')
    A._generation_config(teacher, config, out)
    assert (out / "generation_config.json").read_text() == '{"temperature": 0.25}'  # copied byte for byte


# ----------------------------------------------------------------------------------------------------- the card
PLAN = {
    "teacher": {"model_type": "qwen2_moe", "num_experts": 8, "top_k": 2, "num_layers": 2, "moe_layers": [0, 1]},
    "score_method": "do_acp", "merge_scores": "acp", "experts_per_layer": 3, "blocks_per_layer": 2,
    "pure_pruning": False, "group_method": "output", "align": True, "scaling": "score",
    "layers": {"0": {"groups": [{"experts": [3, 1], "scale": 0.123456}, {"experts": [5], "scale": 0.5}]}},
}
SUMMARY = {"model_type": "qwen2", "num_parameters": 1234567, "dtype": "bfloat16", "intermediate_size": 56}


def test_model_card_text():
    card = A.model_card(PLAN, SUMMARY, Path("/t/teacher"), False)
    assert card == f"""---
library_name: transformers
tags: [moe2dense, dense, pruned, moe-to-dense]
---

# Dense qwen2 converted from a qwen2_moe MoE

Made by moe2dense {A.VERSION} from the teacher at `/t/teacher` (qwen2_moe, 8 experts per layer, top-2, 2 MoE layers).

| | |
|---|---|
| parameters | 1,234,567 |
| dtype | bfloat16 |
| MLP width | 56 |
| expert scoring | do_acp (merge weights by acp) |
| experts kept per layer (K) | 3 |
| dense blocks per layer (k) | 2 |
| grouping | output + neuron alignment |
| magnitude scaling | score |

## How it was made

Routing statistics of the teacher over calibration text scored every expert; K experts per layer were kept, \
grouped into k blocks and merged (score-weighted average), and the blocks concatenated into one SwiGLU MLP per layer \
whose down projection carries each block's constant c_g in place of the routing weight, so the MLP computes \
sum_g c_g E_g(x). Attention, embeddings and norms are the teacher's, unchanged. This checkpoint is the assembled \
model before distillation.

## Per-layer plan

```json
{{
 "0": [
  [
   [
    3,
    1
   ],
   0.1235
  ],
  [
   [
    5
   ],
   0.5
  ]
 ]
}}
```
"""


def test_model_card_of_a_pruned_single_expert_student():
    plan = PLAN | {"pure_pruning": True, "align": False, "group_method": None}
    card = A.model_card(plan, SUMMARY | {"model_type": "gpt_oss"}, Path("t"), True)
    lines = card.split("\n")
    assert "| grouping | none (pure pruning, K == k) |" in lines
    i = lines.index("## Per-layer plan")
    assert lines[i - 3: i] == [
        "",
        "gpt_oss has no dense counterpart in transformers, so the student is a gpt_oss model with a single expert "
        "that every token uses with weight 1 (a softmax over one logit). It computes exactly a dense SwiGLU MLP of "
        "width 56 and loads with `AutoModelForCausalLM.from_pretrained` like any gpt_oss checkpoint.",
        ""]
    assert "no dense counterpart" not in A.model_card(plan, SUMMARY, Path("t"), False)
    assert "| grouping | output |" in A.model_card(PLAN | {"align": False}, SUMMARY, Path("t"), False).split("\n")


# ---------------------------------------------------------------------------------------------- the MLP writers
def test_plain_mlp_writer_names_and_refusals():
    adapter = get_adapter(tiny_config("qwen3_moe"))
    out = A.MLP_WRITERS["mlp"](adapter, 3, BB, set())
    assert list(out) == ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight",
                         "model.layers.3.mlp.down_proj.weight"]
    assert out["model.layers.3.mlp.gate_proj.weight"] is BB.gate and out["model.layers.3.mlp.up_proj.weight"] is BB.up
    assert out["model.layers.3.mlp.down_proj.weight"] is BB.down
    msg = "^a qwen3 MLP has no biases and a plain SwiGLU$"
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["mlp"](adapter, 0, ExpertWeights(BB.gate, BB.up, BB.down, None, None, t([0, 0])), set())
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["mlp"](adapter, 0, ExpertWeights(BB.gate, BB.up, BB.down, act="gpt_oss_clamped"), set())


def test_single_expert_writer_gpt_oss_interleaves_transposes_and_keeps_biases():
    adapter = get_adapter(tiny_config("gpt_oss"))
    spec = adapter.spec
    block = ExpertWeights(BB.gate, BB.up, BB.down, t([1, 2]), t([3, 4]), t([5, 6]), act="gpt_oss_clamped")
    p = f"model.layers.1.{spec.block_attr}"
    out = A.MLP_WRITERS["single_expert"](adapter, 1, block, {f"{p}.{spec.router_attr}.bias"})
    assert sorted(out) == sorted([f"{p}.{spec.router_attr}.weight", f"{p}.{spec.router_attr}.bias",
                                  f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj",
                                  f"{p}.experts.gate_up_proj_bias", f"{p}.experts.down_proj_bias"])
    assert torch.equal(out[f"{p}.{spec.router_attr}.weight"], torch.zeros(1, 2))
    assert torch.equal(out[f"{p}.{spec.router_attr}.bias"], torch.zeros(1))
    # gate/up alternate along the 2W axis, stored [1, H, 2W]: columns gate0, up0, gate1, up1
    assert torch.equal(out[f"{p}.experts.gate_up_proj"], t([[[5, 9, 7, 11], [6, 10, 8, 12]]]))
    assert torch.equal(out[f"{p}.experts.down_proj"], t([[[1, 3], [2, 4]]]))  # down.T: [1, W, H]
    assert torch.equal(out[f"{p}.experts.gate_up_proj_bias"], t([[1, 3, 2, 4]]))
    assert torch.equal(out[f"{p}.experts.down_proj_bias"], t([[5, 6]]))
    # no router bias in the student: none written
    assert f"{p}.{spec.router_attr}.bias" not in A.MLP_WRITERS["single_expert"](adapter, 1, block, set())


# ------------------------------------------------------------------------------------- assembly on a tiny teacher
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("teachers")
    for family in ("qwen3_moe", "qwen2_moe", "gpt_oss"):
        tiny_model(family).save_pretrained(root / family)
    return root


def _pruning_plan(family: str, experts=(3, 5)):
    """K = k = 2 on both MoE layers, c = (0.25, 0.75), no shared blocks unless the family has one."""
    from moe2dense.plan import ConversionPlan

    adapter = get_adapter(tiny_config(family))
    shared = [{"scale": 0.5, "gate": "mean sigmoid over calibration"}] if adapter.spec.shared_attr else []
    layer = {"routed_mass": 1.0, "shared": shared,
             "groups": [{"experts": [experts[0]], "weights": [1.0], "scale": 0.25},
                        {"experts": [experts[1]], "weights": [1.0], "scale": 0.75}]}
    return ConversionPlan.model_validate({
        "teacher": {"model_type": family, "num_experts": 8, "top_k": 2, "num_layers": 2, "moe_layers": [0, 1],
                    "dense_layers": []},
        "score_method": "sf", "merge_scores": "sf", "experts_per_layer": 2, "blocks_per_layer": 2,
        "pure_pruning": True, "group_method": None, "align": False, "scaling": "uniform",
        "layers": {"0": layer, "1": layer}})


def test_assemble_writes_the_student_and_its_summary(teachers, tmp_path, capfd):
    from safetensors import safe_open

    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.teacher_weights import read_experts

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    summary = A.assemble(teachers / "qwen3_moe", _pruning_plan("qwen3_moe"), out, dtype="bfloat16",
                         tokenizer_dir=tok, card="my card", progress=True)
    err = capfd.readouterr().err
    assert "assemble: 100%" in err and "2/2" in err and "layer/s" in err  # the progress bar, per layer
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["intermediate_size"], config["dtype"]) == ("qwen3", 32, "bfloat16")
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    tensors = {}
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    n = sum(t.numel() for t in tensors.values())
    assert summary == {"model_type": "qwen3", "teacher_model_type": "qwen3_moe", "intermediate_size": 32,
                       "num_parameters": n, "dtype": "bfloat16", "bytes": 2 * n}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # the MLP of layer 1: experts 3 and 5 stacked, down columns times 0.25 and 0.75
    with CheckpointReader(teachers / "qwen3_moe") as reader:
        e = read_experts(reader, get_adapter(tiny_config("qwen3_moe")), 1, [3, 5])
        emb = reader.read("model.embed_tokens.weight")
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], torch.cat([e[3].gate, e[5].gate]).bfloat16())
    want = torch.cat([e[3].down * 0.25, e[5].down * 0.75], 1).bfloat16()
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], want)
    assert torch.equal(tensors["model.embed_tokens.weight"], emb.bfloat16())
    assert (out / "README.md").read_text() == "my card" and (out / "tokenizer.json").read_text() == "{}"
    assert (out / "generation_config.json").is_file()
    # quiet, the teacher's own dtype (auto), the generated card, no tokenizer
    out2 = tmp_path / "out2"
    out2.mkdir()
    s2 = A.assemble(teachers / "qwen3_moe", _pruning_plan("qwen3_moe"), out2, progress=False)
    assert capfd.readouterr().err == ""
    assert (s2["dtype"], s2["bytes"], s2["num_parameters"]) == ("float32", 4 * n, n)
    plan = _pruning_plan("qwen3_moe")
    assert (out2 / "README.md").read_text() == A.model_card(plan.to_json(), s2, teachers / "qwen3_moe", False)
    assert not (out2 / "tokenizer.json").exists()


def test_assemble_defaults():
    import inspect

    p = inspect.signature(A.assemble).parameters
    assert (p["dtype"].default, p["max_shard_bytes"].default, p["tokenizer_dir"].default, p["card"].default,
            p["progress"].default) == ("auto", 5 * 2 ** 30, None, "", True)


def test_assemble_refusals_are_one_line(teachers, tmp_path):
    with pytest.raises(TypeError, match="^assemble takes a ConversionPlan \\(moe2dense.plan.build_plan or "
                                        "read_plan\\), got dict$"):
        A.assemble(teachers / "qwen3_moe", _pruning_plan("qwen3_moe").to_json(), tmp_path)
    with pytest.raises(ValueError, match="^the plan was made for a qwen3_moe"):
        A.assemble(teachers / "qwen2_moe", _pruning_plan("qwen3_moe"), tmp_path)


def _teacher_dtype(reader, adapter) -> torch.dtype:
    """`_teacher_dtype` before and after it took the adapter (for families whose embedding has another name)."""
    import inspect

    return A._teacher_dtype(*(reader, adapter)[:len(inspect.signature(A._teacher_dtype).parameters)])


def _teacher_without(src: Path, dst: Path, drop) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not drop(k)}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_assemble_names_the_tensors_the_teacher_lacks(teachers, tmp_path):
    t = _teacher_without(teachers / "qwen3_moe", tmp_path / "t1",
                         lambda k: k in ("model.norm.weight", "lm_head.weight"))
    with pytest.raises(ValueError) as err:
        A.assemble(t, _pruning_plan("qwen3_moe"), tmp_path, progress=False)
    assert str(err.value) == ("the teacher checkpoint lacks tensors the qwen3 student needs: "
                              "['model.norm.weight', 'lm_head.weight']")
    t = _teacher_without(teachers / "qwen3_moe", tmp_path / "t5",
                         lambda k: "layernorm" in k or k == "model.norm.weight")
    with pytest.raises(ValueError) as err:
        A.assemble(t, _pruning_plan("qwen3_moe"), tmp_path, progress=False)
    assert str(err.value) == (  # exactly five: all shown, no " ..."
        "the teacher checkpoint lacks tensors the qwen3 student needs: ['model.layers.0.input_layernorm.weight', "
        "'model.layers.0.post_attention_layernorm.weight', 'model.layers.1.input_layernorm.weight', "
        "'model.layers.1.post_attention_layernorm.weight', 'model.norm.weight']")
    t = _teacher_without(teachers / "qwen3_moe", tmp_path / "t2",
                         lambda k: "layernorm" in k or k in ("model.norm.weight", "lm_head.weight"))
    with pytest.raises(ValueError) as err:
        A.assemble(t, _pruning_plan("qwen3_moe"), tmp_path, progress=False)
    assert str(err.value) == (
        "the teacher checkpoint lacks tensors the qwen3 student needs: ['model.layers.0.input_layernorm.weight', "
        "'model.layers.0.post_attention_layernorm.weight', 'model.layers.1.input_layernorm.weight', "
        "'model.layers.1.post_attention_layernorm.weight', 'model.norm.weight'] ...")


def test_layer_blocks_and_width_with_a_shared_expert(teachers):
    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.plan import LayerPlan

    adapter = get_adapter(tiny_config("qwen2_moe"))
    plan = _pruning_plan("qwen2_moe")
    with CheckpointReader(teachers / "qwen2_moe") as reader:
        blocks = A.layer_blocks(reader, adapter, 1, plan.layers[1], False)
        assert [c for _, c in blocks] == [0.25, 0.75, 0.5] and [w.gate.shape[0] for w, _ in blocks] == [16, 16, 24]
        assert A.layer_width(reader, adapter, 1, plan.layers[1]) == 2 * 16 + 24
        unshared = LayerPlan.model_validate(plan.layers[1].model_dump() | {"shared": []})
        with pytest.raises(ValueError, match="^layer 1: the plan has 0 shared experts, the teacher 1$"):
            A.layer_blocks(reader, adapter, 1, unshared, False)
        assert _teacher_dtype(reader, adapter) == torch.float32


def test_layer_blocks_of_a_dense_layer_and_the_teacher_dtype(tmp_path):
    from moe2dense.checkpoint import CheckpointReader
    from tiny_models import tiny_model

    model = tiny_model("deepseek_v3").to(torch.bfloat16)  # layer 0 is dense (first_k_dense_replace = 1)
    model.save_pretrained(tmp_path)
    adapter = get_adapter(model.config)
    with CheckpointReader(tmp_path) as reader:
        (w, c), = A.layer_blocks(reader, adapter, 0, None, False)
        assert c == 1.0 and torch.equal(w.gate, model.model.layers[0].mlp.gate_proj.weight)
        assert A.layer_width(reader, adapter, 0, None) == 48
        assert _teacher_dtype(reader, adapter) == torch.bfloat16


def test_student_config_per_family():
    qwen = A.student_config(tiny_config("qwen3_moe"), get_adapter(tiny_config("qwen3_moe")), 40, torch.bfloat16)
    assert (qwen.model_type, qwen.intermediate_size, qwen.dtype, qwen.architectures) == (
        "qwen3", 40, "bfloat16", ["Qwen3ForCausalLM"])
    assert (qwen.hidden_size, qwen.num_attention_heads, qwen.head_dim, qwen.vocab_size) == (32, 4, 8, 64)
    gpt = A.student_config(tiny_config("gpt_oss"), get_adapter(tiny_config("gpt_oss")), 24, torch.float32)
    assert (gpt.model_type, gpt.num_local_experts, gpt.num_experts_per_tok, gpt.intermediate_size, gpt.dtype) == (
        "gpt_oss", 1, 1, 24, "float32")
    ds = A.student_config(tiny_config("deepseek_v3"), get_adapter(tiny_config("deepseek_v3")), 56, torch.float32)
    assert (ds.model_type, ds.first_k_dense_replace, ds.intermediate_size) == ("deepseek_v3", 3, 56)


def test_student_layout_leaves_out_a_tied_head():
    config = A.student_config(tiny_config("qwen3_moe"), get_adapter(tiny_config("qwen3_moe")), 40, torch.bfloat16)
    layout = A.student_layout(config)
    assert layout["model.layers.1.mlp.down_proj.weight"] == ((32, 40), torch.bfloat16)
    assert layout["lm_head.weight"] == ((64, 32), torch.bfloat16)
    config.tie_word_embeddings = True
    assert "lm_head.weight" not in A.student_layout(config)


def test_meta_block_shapes():
    gpt = A._meta_block(6, 4, get_adapter(tiny_config("gpt_oss")))
    assert (gpt.gate.shape, gpt.up.shape, gpt.down.shape) == ((6, 4), (6, 4), (4, 6))
    assert (gpt.gate_bias.shape, gpt.up_bias.shape, gpt.down_bias.shape) == ((6,), (6,), (4,))
    assert gpt.act == "gpt_oss_clamped" and gpt.gate.device.type == "meta"
    qwen = A._meta_block(6, 4, get_adapter(tiny_config("qwen3_moe")))
    assert (qwen.gate_bias, qwen.up_bias, qwen.down_bias, qwen.act) == (None, None, None, "swiglu")


def test_assemble_a_single_expert_student_explains_itself_in_the_card(teachers, tmp_path):
    plan = _pruning_plan("gpt_oss")
    summary = A.assemble(teachers / "gpt_oss", plan, tmp_path, progress=False)
    card = (tmp_path / "README.md").read_text()
    assert card == A.model_card(plan.to_json(), summary, teachers / "gpt_oss", True)
    assert "gpt_oss has no dense counterpart in transformers" in card and summary["model_type"] == "gpt_oss"


def test_assemble_shards_by_size_and_makes_a_generation_config(teachers, tmp_path, capfd):
    t = _teacher_without(teachers / "qwen3_moe", tmp_path / "bare", lambda k: False)  # no generation_config.json
    out = tmp_path / "out"
    out.mkdir()
    A.assemble(t, _pruning_plan("qwen3_moe"), out, max_shard_bytes=40_000)
    assert "assemble: 100%" in capfd.readouterr().err  # a progress bar by default
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    made = json.loads((out / "generation_config.json").read_text())
    assert (made["bos_token_id"], made["eos_token_id"]) == (1, 2)


def test_teacher_dtype_without_embeddings_is_float32(teachers, tmp_path):
    from moe2dense.checkpoint import CheckpointReader

    t = _teacher_without(teachers / "qwen3_moe", tmp_path / "noemb", lambda k: k == "model.embed_tokens.weight")
    with CheckpointReader(t) as reader:
        assert _teacher_dtype(reader, get_adapter(tiny_config("qwen3_moe"))) == torch.float32


# ------------------------------------------------------------------------------------------ the newer families
UA = ExpertWeights(None, t([[3, 4]]), t([[1], [2]]), act="relu2")
UB = ExpertWeights(None, t([[9, 10], [11, 12]]), t([[1, 2], [3, 4]]), act="relu2")


def test_concat_up_only_blocks_has_no_gate():
    w = A.concat_blocks([(UA, 2.0), (UB, 0.5)], 4)
    assert w.gate is None and w.gate_bias is None and w.act == "relu2"
    assert torch.equal(w.up, t([[3, 4], [9, 10], [11, 12], [0, 0]]))
    assert torch.equal(w.down, t([[2, 0.5, 1, 0], [4, 1.5, 2, 0]]))
    assert w.up_bias is None and w.down_bias is None
    # an up bias alone makes the up and down biases exist (no gate bias without a gate)
    biased = ExpertWeights(None, UA.up, UA.down, None, t([5]), None, act="relu2")
    w = A.concat_blocks([(UB, 1.0), (biased, 2.0)], 4)
    assert w.gate is None and w.gate_bias is None
    assert torch.equal(w.up_bias, t([0, 0, 5, 0])) and torch.equal(w.down_bias, t([0, 0]))
    assert torch.equal(w.up, t([[9, 10], [11, 12], [3, 4], [0, 0]]))
    with pytest.raises(ValueError, match="^blocks have 3 neurons, more than the dense width 2$"):
        A.concat_blocks([(UA, 1.0), (UB, 1.0)], 2)
    # a gated block with an up bias only: gate and down biases are zero vectors
    up_biased = ExpertWeights(BA.gate, BA.up, BA.down, None, t([4]), None)
    w = A.concat_blocks([(up_biased, 2.0), (BB, 1.0)], 3)
    assert torch.equal(w.gate_bias, t([0, 0, 0])) and torch.equal(w.up_bias, t([4, 0, 0]))
    assert torch.equal(w.down_bias, t([0, 0]))


def test_scale_input_multiplies_gate_and_up_rows_in_float32():
    x = torch.tensor([[1 + 2 ** -7, 2.0]], dtype=torch.bfloat16)
    w = ExpertWeights(x, 2 * x, t([[1], [2]]), t([1]), t([2]), t([3, 4]))
    got = A.scale_input(w, 1 + 2 ** -8)
    assert got.gate.dtype == got.up.dtype == torch.float32
    assert got.gate.tolist() == [[(1 + 2 ** -7) * (1 + 2 ** -8), 2 + 2 ** -7]]  # exact in float32, not in bfloat16
    assert got.up.tolist() == [[2 * (1 + 2 ** -7) * (1 + 2 ** -8), 4 + 2 ** -6]]
    assert got.down is w.down and got.gate_bias is w.gate_bias and got.up_bias is w.up_bias
    assert got.down_bias is w.down_bias and got.act == "swiglu"


def test_up_mlp_writer_names_biases_and_refusals():
    adapter = get_adapter(tiny_config("nemotron_h"))
    p = "model.layers.3.mixer"
    out = A.MLP_WRITERS["up_mlp"](adapter, 3, UB, {})
    assert list(out) == [f"{p}.up_proj.weight", f"{p}.down_proj.weight"]
    assert out[f"{p}.up_proj.weight"] is UB.up and out[f"{p}.down_proj.weight"] is UB.down
    # mlp_bias=True: zeros where the block has no bias, its own where it has one
    keys = {f"{p}.up_proj.bias": ((2,), torch.float32), f"{p}.down_proj.bias": ((2,), torch.float32)}
    out = A.MLP_WRITERS["up_mlp"](adapter, 3, UB, keys)
    assert list(out)[2:] == [f"{p}.up_proj.bias", f"{p}.down_proj.bias"]
    assert torch.equal(out[f"{p}.up_proj.bias"], t([0, 0])) and torch.equal(out[f"{p}.down_proj.bias"], t([0, 0]))
    wide = ExpertWeights(None, t([[1, 2], [3, 4], [5, 6]]), t([[1, 2, 3], [4, 5, 6]]), None, t([7, 8, 9]),
                         t([1, 2]), act="relu2")
    out = A.MLP_WRITERS["up_mlp"](adapter, 3, wide, keys)
    assert out[f"{p}.up_proj.bias"] is wide.up_bias and out[f"{p}.down_proj.bias"] is wide.down_bias
    only_down = ExpertWeights(None, wide.up, wide.down, None, None, t([1, 2]), act="relu2")
    out = A.MLP_WRITERS["up_mlp"](adapter, 3, only_down, keys)
    assert torch.equal(out[f"{p}.up_proj.bias"], t([0, 0, 0])) and out[f"{p}.down_proj.bias"] is only_down.down_bias
    with pytest.raises(ValueError, match=r"^the nemotron_h student has no up_proj bias \(mlp_bias=False\)$"):
        A.MLP_WRITERS["up_mlp"](adapter, 3, wide, {})
    with pytest.raises(ValueError, match=r"^the nemotron_h student has no down_proj bias \(mlp_bias=False\)$"):
        A.MLP_WRITERS["up_mlp"](adapter, 3, only_down, {})
    msg = "^a nemotron_h MLP is relu2 without gate$"
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["up_mlp"](adapter, 3, ExpertWeights(BB.gate, BB.up, BB.down, act="relu2"), {})
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["up_mlp"](adapter, 3, ExpertWeights(None, BB.up, BB.down), {})


def test_plain_mlp_writer_uses_the_dense_mlp_attribute():
    # llama4_text's dense MLP is feed_forward, granite's is mlp where the teacher has block_sparse_moe
    out = A.MLP_WRITERS["mlp"](get_adapter(tiny_config("llama4_text")), 2, BB, {})
    assert list(out) == ["model.layers.2.feed_forward.gate_proj.weight", "model.layers.2.feed_forward.up_proj.weight",
                         "model.layers.2.feed_forward.down_proj.weight"]
    assert list(A.MLP_WRITERS["mlp"](get_adapter(tiny_config("granitemoe")), 0, BB, {}))[0] == (
        "model.layers.0.mlp.gate_proj.weight")


def _student_keys(family: str, width: int = 2):
    config = tiny_config(family)
    adapter = get_adapter(config)
    return adapter, A.student_layout(A.student_config(config, adapter, width, torch.float32))


def test_single_expert_writer_minimax_m2_bias_on_the_block_and_disk_names():
    adapter, keys = _student_keys("minimax_m2")
    block = ExpertWeights(BB.gate, BB.up, BB.down)
    out = A.MLP_WRITERS["single_expert"](adapter, 1, block, keys)
    # saved under Mixtral's names: block_sparse_moe, the correction bias on the block, experts per index
    d = "model.layers.1.block_sparse_moe"
    assert sorted(out) == sorted([f"{d}.gate.weight", f"{d}.e_score_correction_bias", f"{d}.experts.0.w1.weight",
                                  f"{d}.experts.0.w3.weight", f"{d}.experts.0.w2.weight"])
    assert torch.equal(out[f"{d}.gate.weight"], torch.zeros(1, 2))
    assert torch.equal(out[f"{d}.e_score_correction_bias"], torch.zeros(1))
    assert out[f"{d}.experts.0.w1.weight"] is BB.gate and out[f"{d}.experts.0.w3.weight"] is BB.up
    assert out[f"{d}.experts.0.w2.weight"] is BB.down
    with pytest.raises(ValueError, match="^minimax_m2 experts have no biases$"):
        A.MLP_WRITERS["single_expert"](adapter, 1, ExpertWeights(BB.gate, BB.up, BB.down, None, None, t([0, 0])),
                                       keys)


def test_single_expert_writer_gemma4_text_router_scales_are_ones():
    adapter, keys = _student_keys("gemma4_text")
    block = ExpertWeights(BB.gate, BB.up, BB.down, act="geglu_tanh")
    out = A.MLP_WRITERS["single_expert"](adapter, 0, block, keys)
    p = "model.layers.0"  # the router and experts sit in the decoder layer itself, beside its own dense MLP
    assert sorted(out) == sorted([f"{p}.router.proj.weight", f"{p}.router.scale", f"{p}.router.per_expert_scale",
                                  f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"])
    assert torch.equal(out[f"{p}.router.proj.weight"], torch.zeros(1, 2))
    assert torch.equal(out[f"{p}.router.scale"], torch.ones(32)) and out[f"{p}.router.scale"].dtype == torch.float32
    assert torch.equal(out[f"{p}.router.per_expert_scale"], torch.ones(1))
    assert torch.equal(out[f"{p}.experts.gate_up_proj"], t([[[5, 6], [7, 8], [9, 10], [11, 12]]]))
    assert torch.equal(out[f"{p}.experts.down_proj"], t([[[1, 2], [3, 4]]]))
    half = ExpertWeights(BB.gate.bfloat16(), BB.up.bfloat16(), BB.down.bfloat16(), act="geglu_tanh")
    assert A.MLP_WRITERS["single_expert"](adapter, 0, half, keys)[f"{p}.router.scale"].dtype == torch.bfloat16


def test_student_config_fields_of_the_newer_families():
    def student(family, width=40):
        return A.student_config(tiny_config(family), get_adapter(tiny_config(family)), width, torch.float32)

    glm = student("glm4_moe_lite")  # every layer's mlp_layer_types entry dense
    assert (glm.mlp_layer_types, glm.intermediate_size) == (["dense"] * 3, 40)
    nxt = student("qwen3_next")  # every layer in mlp_only_layers
    assert (nxt.mlp_only_layers, nxt.intermediate_size) == ([0, 1, 2, 3], 40)
    nem = student("nemotron_h")  # the MoE layers become MLP layers, Mamba and attention stay
    assert nem.layers_block_type == ["linear_attention", "mlp", "full_attention", "mlp"]
    assert nem.intermediate_size == 40
    llama = student("llama4_text")  # the dense width field, and no MoE layers
    assert (llama.intermediate_size_mlp, llama.intermediate_size, llama.moe_layers) == (40, 16, [])
    gemma = student("gemma4_text")  # one always-on expert of the whole width; the dense MLP keeps its own
    assert (gemma.moe_intermediate_size, gemma.intermediate_size, gemma.num_experts, gemma.top_k_experts) == (
        40, 24, 1, 1)
    mm = student("minimax_m2")  # the one expert's width is intermediate_size
    assert (mm.num_local_experts, mm.num_experts_per_tok, mm.intermediate_size) == (1, 1, 40)
    teacher = tiny_config("ernie4_5_moe")
    teacher.head_dim = None  # ernie4_5 would default it to 128: hidden_size // heads instead
    ernie = A.student_config(teacher, get_adapter(tiny_config("ernie4_5_moe")), 40, torch.float32)
    assert (ernie.model_type, ernie.intermediate_size, ernie.head_dim) == ("ernie4_5", 40, 32 // 4)


def test_student_num_parameters_leaves_out_buffers():
    config = A.student_config(tiny_config("minimax_m2"), get_adapter(tiny_config("minimax_m2")), 40, torch.float32)
    layout = A.student_layout(config)
    total = sum(math.prod(shape) for shape, _ in layout.values())
    # the two layers' e_score_correction_bias [1] are persistent buffers, saved but not parameters
    assert A.student_num_parameters(config) == total - 2


def test_meta_block_of_up_only_experts():
    nem = A._meta_block(6, 4, get_adapter(tiny_config("nemotron_h")))
    assert nem.gate is None and nem.gate_bias is None and nem.act == "relu2"
    assert (nem.up.shape, nem.down.shape, nem.up.device.type) == ((6, 4), (4, 6), "meta")


def test_teacher_dtype_reads_the_embedding_under_its_disk_name(tmp_path):
    from safetensors.torch import save_file

    from moe2dense.checkpoint import CheckpointReader

    save_file({"backbone.embeddings.weight": torch.zeros(2, 2, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with CheckpointReader(tmp_path) as reader:
        assert A._teacher_dtype(reader, get_adapter(tiny_config("nemotron_h"))) == torch.bfloat16
        assert A._teacher_dtype(reader, get_adapter(tiny_config("qwen3_moe"))) == torch.float32


@pytest.fixture(scope="module")
def newer_teachers(tmp_path_factory):
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("newer_teachers")
    for family in ("llama4_text", "nemotron_h"):
        tiny_model(family).save_pretrained(root / family)
    return root


def _plan_of(family: str, experts=(3, 5), config=None):
    """K = k = 2 on every MoE layer, c = (0.25, 0.75); an ungated shared expert kept with c = 1."""
    from moe2dense.plan import ConversionPlan

    adapter = get_adapter(config or tiny_config(family))
    layer = {"routed_mass": 1.0, "shared": [{"scale": 1.0}] if adapter.spec.shared_attr else [],
             "groups": [{"experts": [experts[0]], "weights": [1.0], "scale": 0.25},
                        {"experts": [experts[1]], "weights": [1.0], "scale": 0.75}]}
    return ConversionPlan.model_validate({
        "teacher": {"model_type": family, "num_experts": adapter.num_experts, "top_k": adapter.top_k,
                    "num_layers": adapter.num_layers, "moe_layers": adapter.moe_layers,
                    "dense_layers": adapter.dense_layers},
        "score_method": "sf", "merge_scores": "sf", "experts_per_layer": 2, "blocks_per_layer": 2,
        "pure_pruning": True, "group_method": None, "align": False, "scaling": "uniform",
        "layers": {str(i): layer for i in adapter.moe_layers}})


def _saved(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_assemble_folds_c_into_the_input_where_the_router_scales_it(newer_teachers, tmp_path):
    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.teacher_weights import read_dense_mlp, read_experts, read_shared_experts

    family = "llama4_text"
    adapter, plan = get_adapter(tiny_config(family)), _plan_of(family)
    summary = A.assemble(newer_teachers / family, plan, tmp_path, progress=False)
    got = _saved(tmp_path)
    with CheckpointReader(newer_teachers / family) as reader:
        e = read_experts(reader, adapter, 3, [3, 5])
        shared, = read_shared_experts(reader, adapter, 3)
        dense = read_dense_mlp(reader, adapter, 2)
        teacher_keys = set(reader.keys())
    # per MoE layer, the router, the 2 fused expert tensors and the shared expert's 3 become the MLP's 3
    moe = {n for n in teacher_keys if n.startswith(("model.layers.1.feed_forward.", "model.layers.3.feed_forward."))}
    assert len(moe) == 12 and set(got) == teacher_keys - moe | {
        f"model.layers.{i}.feed_forward.{p}_proj.weight" for i in (1, 3) for p in ("gate", "up", "down")}
    # MoE layer 3: gate and up rows times c (0.25, 0.75, the shared expert's 1), the down columns the experts' own
    p = "model.layers.3.feed_forward"
    assert torch.equal(got[f"{p}.gate_proj.weight"], torch.cat([e[3].gate * 0.25, e[5].gate * 0.75, shared.gate]))
    assert torch.equal(got[f"{p}.up_proj.weight"], torch.cat([e[3].up * 0.25, e[5].up * 0.75, shared.up]))
    assert torch.equal(got[f"{p}.down_proj.weight"], torch.cat([e[3].down, e[5].down, shared.down], 1))
    # a dense layer is the teacher's own MLP
    assert torch.equal(got["model.layers.2.feed_forward.down_proj.weight"], dense.down)
    assert summary["intermediate_size"] == 48 and summary["model_type"] == family
    card = (tmp_path / "README.md").read_text()
    assert card == A.model_card(plan.to_json(), summary, newer_teachers / family, False) + (
        "\nllama4_text multiplies each expert's input, not its output, by the routing score, so here each block's "
        "constant c_g is folded into its gate and up rows (the MLP computes sum_g E_g(c_g x)) and the down projection "
        "is the merged expert's own.\n")
    (tmp_path / "carded").mkdir()
    A.assemble(newer_teachers / family, plan, tmp_path / "carded", progress=False, card="mine")
    assert (tmp_path / "carded" / "README.md").read_text() == "mine"  # a given card is not extended


def test_assemble_a_hybrid_skips_layers_without_an_mlp(newer_teachers, tmp_path):
    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.teacher_weights import read_experts, read_shared_experts

    family = "nemotron_h"
    adapter, plan = get_adapter(tiny_config(family)), _plan_of(family)
    summary = A.assemble(newer_teachers / family, plan, tmp_path, progress=False)
    got = _saved(tmp_path)
    with CheckpointReader(newer_teachers / family) as reader:
        e = read_experts(reader, adapter, 1, [3, 5])
        shared, = read_shared_experts(reader, adapter, 1)
        # the Mamba layer 0 and the attention layer 2 are the teacher's, under the in-memory names
        for name in reader.keys():
            if name.startswith(("backbone.layers.0.", "backbone.layers.2.", "backbone.embeddings")):
                assert torch.equal(got["model." + name.removeprefix("backbone.")], reader.read(name))
    p = "model.layers.1.mixer"
    assert sorted(n for n in got if n.startswith(p)) == [f"{p}.down_proj.weight", f"{p}.up_proj.weight"]
    assert torch.equal(got[f"{p}.up_proj.weight"], torch.cat([e[3].up, e[5].up, shared.up]))
    assert torch.equal(got[f"{p}.down_proj.weight"],
                       torch.cat([e[3].down * 0.25, e[5].down * 0.75, shared.down], 1))
    assert summary["num_parameters"] == sum(t.numel() for t in got.values())
    assert "multiplies each expert's input" not in (tmp_path / "README.md").read_text()


def test_in_class_writer_plain_mlp_or_one_expert():
    from transformers import FlexOlmoConfig, JambaConfig

    common = dict(vocab_size=64, hidden_size=2, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                  max_position_embeddings=64, num_experts_per_tok=2, intermediate_size=4, num_experts=8,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # jamba with one expert builds a plain SwiGLU MLP under the block's name
    jamba = JambaConfig(**common | {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
                                    "mamba_d_state": 2, "mamba_d_conv": 2, "mamba_expand": 1, "mamba_dt_rank": 1})
    adapter = get_adapter(jamba)
    keys = A.student_layout(A.student_config(jamba, adapter, 2, torch.float32))
    p = "model.layers.1.feed_forward"
    out = A.MLP_WRITERS["in_class"](adapter, 1, BB, keys)
    assert list(out) == [f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"]
    assert out[f"{p}.gate_proj.weight"] is BB.gate and out[f"{p}.up_proj.weight"] is BB.up
    assert out[f"{p}.down_proj.weight"] is BB.down
    msg = "^a jamba MLP has no biases and a plain SwiGLU$"
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["in_class"](adapter, 1, ExpertWeights(BB.gate, BB.up, BB.down, None, None, t([0, 0])), keys)
    with pytest.raises(ValueError, match=msg):
        A.MLP_WRITERS["in_class"](adapter, 1, ExpertWeights(BB.gate, BB.up, BB.down, act="geglu_tanh"), keys)
    # flex_olmo with one expert keeps its MoE block: the single-expert writer's names
    flex = FlexOlmoConfig(**common)
    adapter = get_adapter(flex)
    keys = A.student_layout(A.student_config(flex, adapter, 2, torch.float32))
    out = A.MLP_WRITERS["in_class"](adapter, 0, BB, keys)
    assert out.keys() == A.MLP_WRITERS["single_expert"](adapter, 0, BB, keys).keys()
    assert "model.layers.0.mlp.gate.weight" in out and "model.layers.0.mlp.gate_proj.weight" not in out


def test_assemble_checks_the_student_of_a_discovered_family(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, JambaConfig

    from moe2dense.checkpoint import CheckpointReader

    # jamba (the generic path): MoE in layers 1 and 3, plain MLPs in 0 and 2, Mamba or attention mixers
    config = JambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                         intermediate_size=16, num_experts=8, attn_layer_period=2, attn_layer_offset=1,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "teacher")
    adapter = get_adapter(config)
    assert (adapter.moe_layers, adapter.dense_layers) == ([1, 3], [0, 2])
    calls = []
    monkeypatch.setattr(A, "verify_student", lambda out, a, references: calls.append((out, a, references)))
    # a merged, aligned group (experts 3 and 5) and expert 6 alone; written in bfloat16
    plan = _plan_of("jamba", config=config).model_dump(mode="json")
    plan |= {"pure_pruning": False, "group_method": "output", "align": True, "experts_per_layer": 3}
    for layer in plan["layers"].values():
        layer["groups"] = [{"experts": [3, 5], "weights": [0.5, 0.5], "scale": 0.25},
                           {"experts": [6], "weights": [1.0], "scale": 0.75}]
    from moe2dense.plan import ConversionPlan

    plan = ConversionPlan.model_validate(plan)
    (tmp_path / "out").mkdir()
    A.assemble(tmp_path / "teacher", plan, tmp_path / "out", dtype="bfloat16", progress=False)
    (out, a, references), = calls  # after the student is saved: the first MoE layer and the first dense one
    assert out == tmp_path / "out" and a.model_type == "jamba" and list(references) == [1, 0]
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    with CheckpointReader(tmp_path / "teacher") as reader:
        for i in (1, 0):
            want = A.concat_blocks(A.layer_blocks(reader, adapter, i, plan.layers.get(i), True), 32, torch.bfloat16)
            assert references[i].gate.dtype == torch.bfloat16
            assert torch.equal(references[i].gate, want.gate) and torch.equal(references[i].down, want.down)
        unaligned = A.concat_blocks(A.layer_blocks(reader, adapter, 1, plan.layers[1], False), 32, torch.bfloat16)
        assert not torch.equal(references[1].gate, unaligned.gate)  # the plan's align reaches the references
    calls.clear()
    (tmp_path / "qwen").mkdir()
    from tiny_models import tiny_model

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "qwen_teacher")
    A.assemble(tmp_path / "qwen_teacher", _pruning_plan("qwen3_moe"), tmp_path / "qwen", progress=False)
    assert calls == []  # a family with a written spec is not checked again
