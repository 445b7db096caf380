"""Dense-to-dense width pruning (issue 16, the d2d baseline): importance functions against hand-computed values, the
size choice against hand-solved counts, the streamed pruning (kept rows are the top ones, keep-all is the identity,
the output loads as a stock model) and the stage's one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from moe2dense.baselines import importance as I
from moe2dense.baselines.prune import (Sizes, choose_sizes, prune, prune_checkpoint, pruned_config, read_layout,
                                       top_indices, transformers_count)
from moe2dense.checkpoint import CheckpointReader
from moe2dense.data.packing import PackedWriter
from moe2dense.data.tokenizer import train_bpe
from tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[1]
# vocab 128, hidden 64, MLP 256, 2 layers, 4 heads x 16 (2 kv): P(h, w) = 64 + 645 h + 6 h w (see test_count_by_hand)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=64)


def _save(config, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms init to ones: make them distinguishable so a wrong copy shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _save(Qwen3Config(**TINY), tmp_path_factory.mktemp("dense") / "teacher")


def _load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.read(n) for n in r.keys()}


# ------------------------------------------------------------------------------------------------ parameter counts
def test_count_by_hand(teacher):
    """Per hidden channel: embed + lm_head (2 x 128) + 5 norms + per layer q, k, v (64 + 32 + 32) and o (64) = 645;
    per (channel, neuron): 3 per layer; fixed: q_norm + k_norm (16 + 16 per layer)."""
    layout = read_layout(teacher)
    assert layout.coefficients() == (64, 645, 0, 6)
    assert layout.num_parameters(64, 256) == 64 + 645 * 64 + 6 * 64 * 256 == \
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())


@pytest.mark.parametrize("config", [
    Qwen3Config(**TINY),
    Qwen2Config(**{**TINY, "tie_word_embeddings": True}),  # q/k/v biases, tied head
    LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),  # biases on o_proj and the MLP too
    MistralConfig(**TINY),
], ids=["qwen3", "qwen2_tied", "llama_biases", "mistral"])
def test_closed_form_count_equals_transformers(config, tmp_path):
    layout = read_layout(_save(config, tmp_path / "t"))
    for h, w in [(64, 256), (64, 100), (40, 256), (24, 7)]:
        assert layout.num_parameters(h, w) == transformers_count(pruned_config(layout, h, w)), (h, w)


# ------------------------------------------------------------------------------------------------ choosing sizes
def test_width_alone_when_it_reaches_the_target(teacher):
    """112000 = 41344 + 384 w gives w = 184 exactly; 128, 64, 32 and 16 round it to 128 or 192 (>1% off), 8 is the
    largest multiple that keeps it."""
    assert choose_sizes(read_layout(teacher), 112000, 0.6) == Sizes(64, 184, 8, 112000, 112000)


def test_hidden_channels_go_when_a_60_percent_cut_is_not_enough(teacher):
    """69824 needs w = 74.2 < 0.4 x 256: the MLP keeps ceil(102.4) = 103 and h = 69760 / 1263 = 55.2 -> 55; every
    larger multiple lands more than 1% off (e.g. 8: w 104, h 56 -> 71128)."""
    sizes = choose_sizes(read_layout(teacher), 69824, 0.6)
    assert sizes == Sizes(55, 103, 1, 64 + 645 * 55 + 6 * 55 * 103, 69824)
    assert abs(sizes.relative_error) <= 0.01


def test_keep_all_target_is_the_teacher(teacher):
    layout = read_layout(teacher)
    n = layout.num_parameters(64, 256)
    assert choose_sizes(layout, n, 0.6) == Sizes(64, 256, 128, n, n)


@pytest.mark.parametrize("target, match", [
    (139649, r"139,649 parameters are more than the dense teacher's 139,648: pruning can only shrink"),
    (1000, r"1,000 parameters are below the dense teacher's 1,327 at hidden size 1 and MLP width 103 "
           r"\(baselines.prune.max_mlp_cut 0.6\)"),
])
def test_unreachable_target_is_one_line(teacher, target, match):
    with pytest.raises(ValueError, match=match) as err:
        choose_sizes(read_layout(teacher), target, 0.6)
    assert "\n" not in str(err.value) and "baselines" in str(err.value)


def test_top_indices_ascending_ties_to_the_lower_index():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1])
    assert top_indices(scores, 2).tolist() == [1, 3]
    assert top_indices(scores, 3).tolist() == [1, 2, 3]
    assert top_indices(torch.tensor([3.0, 3.0, 3.0]), 2).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------ importance
def test_sequence_mean_then_l2_by_hand():
    """Two sequences of two tokens, two channels: mean |x| per sequence [2, 1] and [0.5, 2]; L2 over sequences
    sqrt(4 + 0.25), sqrt(1 + 4)."""
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.0, 0.0], [-1.0, 4.0]]])
    sq = I.sequence_mean_sq(x)
    torch.testing.assert_close(sq.sqrt(), torch.tensor([4.25 ** 0.5, 5 ** 0.5]))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _write_rows(path: Path, rows: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = PackedWriter(path, rows.shape[1], sep_id=0, row_group_rows=2)
    w.rows, w.row_domains = list(rows), ["d"] * len(rows)
    w.close()
    return path


def test_minitron_equals_the_formula_on_a_model_without_attention(tmp_path):
    """o_proj = 0 makes attention add nothing, so every activation follows from the embedding by hand: the layer
    input is the embedding e, the MLP input n = rms(e) * w_post, the down_proj input z = silu(gate n) * up n, the final
    norm reads e + down z. Importance: sqrt(sum over sequences of (mean over tokens of |.|)^2)."""
    config = Qwen3Config(**{**TINY, "num_hidden_layers": 1})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        for n in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                  model.model.norm):
            n.weight.uniform_(0.5, 1.5)
    rows = np.random.default_rng(0).integers(0, 128, size=(5, 8)).astype(np.int32)
    inputs = I.ImportanceInputs(tmp_path, _write_rows(tmp_path / "cal.parquet", rows), batch_size=2)
    got = I.capture_minitron(model, inputs)

    layer, eps = model.model.layers[0], config.rms_norm_eps
    e = model.model.embed_tokens.weight[torch.from_numpy(rows).long()]  # [S, T, H]
    with torch.no_grad():
        n_in, n_post = _rms(e, layer.input_layernorm.weight, eps), _rms(e, layer.post_attention_layernorm.weight, eps)
        z = torch.nn.functional.silu(n_post @ layer.mlp.gate_proj.weight.T) * (n_post @ layer.mlp.up_proj.weight.T)
        n_final = _rms(e + z @ layer.mlp.down_proj.weight.T, model.model.norm.weight, eps)

    def l2_of_means(a: torch.Tensor) -> torch.Tensor:
        return a.abs().mean(1).pow(2).sum(0).sqrt()

    torch.testing.assert_close(got.mlp, l2_of_means(z)[None])
    torch.testing.assert_close(got.hidden, l2_of_means(n_in) + l2_of_means(n_post) + l2_of_means(n_final))
    assert got.tokens == 40
    # capped at 3 whole sequences (calibration_tokens 30 with seq_len 8 -> 3 rows), batches of 1
    capped = I.capture_minitron(model, I.ImportanceInputs(tmp_path, inputs.calibration, 30, batch_size=1))
    assert capped.tokens == 24
    torch.testing.assert_close(capped.mlp, l2_of_means(z[:3])[None])
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks  # hooks removed


def test_registry_is_the_method_table():
    import typing

    from moe2dense import methods as M
    from moe2dense import params as P

    assert tuple(I.IMPORTANCE) == M.names("importance") == typing.get_args(P.Importance)


def test_magnitude_is_the_weight_norms(teacher):
    got = I.importance("magnitude", I.ImportanceInputs(teacher))
    w = _tensors(teacher)

    def norm(t, dim):
        return t.pow(2).sum(dim).sqrt()

    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        want = (norm(w[p + "gate_proj.weight"], 1) + norm(w[p + "up_proj.weight"], 1)
                + norm(w[p + "down_proj.weight"], 0))
        torch.testing.assert_close(got.mlp[layer], want)
    torch.testing.assert_close(got.hidden, norm(w["model.embed_tokens.weight"], 0))
    assert got.tokens == 0 and not I.needs_calibration("magnitude") and I.needs_calibration("minitron")


# ------------------------------------------------------------------------------------------------ the pruned checkpoint
def test_kept_rows_are_the_top_ones(teacher, tmp_path):
    """Hand-written importance: layer 0 ranks neurons by index, layer 1 by minus index, hidden channels 3, 1, 0 and
    2 first... The pruned tensors are exactly those rows and columns, in ascending order."""
    layout = read_layout(teacher)
    mlp = torch.stack([torch.arange(256.0), -torch.arange(256.0)])
    hidden = torch.zeros(64)
    hidden[[3, 1, 0, 2]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # channels 3 > 1 > 0 > 2 > the rest (ties: low first)
    sizes = Sizes(6, 5, 1, layout.num_parameters(6, 5), layout.num_parameters(6, 5))
    out = tmp_path / "pruned"
    prune(layout, teacher, out, sizes, mlp, hidden, importance="hand", source=str(teacher), tokens=0,
          tokenizer_dir=_tok(tmp_path), progress=False)
    keep_h = torch.tensor([0, 1, 2, 3, 4, 5])
    keep_m = {0: torch.tensor([251, 252, 253, 254, 255]), 1: torch.tensor([0, 1, 2, 3, 4])}
    t, p = _tensors(teacher), _tensors(out)
    assert set(p) == set(t)
    torch.testing.assert_close(p["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, keep_h], rtol=0,
                               atol=0)
    for layer, km in keep_m.items():
        q = f"model.layers.{layer}."
        assert torch.equal(p[q + "mlp.gate_proj.weight"], t[q + "mlp.gate_proj.weight"][km][:, keep_h])
        assert torch.equal(p[q + "mlp.down_proj.weight"], t[q + "mlp.down_proj.weight"][keep_h][:, km])
        assert torch.equal(p[q + "self_attn.q_proj.weight"], t[q + "self_attn.q_proj.weight"][:, keep_h])
        assert torch.equal(p[q + "self_attn.o_proj.weight"], t[q + "self_attn.o_proj.weight"][keep_h])
        assert torch.equal(p[q + "input_layernorm.weight"], t[q + "input_layernorm.weight"][keep_h])
        assert torch.equal(p[q + "self_attn.q_norm.weight"], t[q + "self_attn.q_norm.weight"])
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (6, 5, 16)
    model = _load(out)
    assert sum(x.numel() for x in model.parameters()) == sizes.parameters
    assert torch.isfinite(model(torch.arange(12)[None]).logits).all()
    card = (out / "README.md").read_text()
    assert "| hidden size | 64 | 6 |" in card and "| MLP width (every layer) | 256 | 5 |" in card


@pytest.mark.parametrize("config", [Qwen3Config(**TINY), Qwen2Config(**{**TINY, "tie_word_embeddings": True})],
                         ids=["qwen3", "qwen2_tied"])
def test_keep_all_is_the_teacher_exactly(config, tmp_path):
    teacher = _save(config, tmp_path / "teacher")
    layout = read_layout(teacher)
    out = tmp_path / "same"
    prune_checkpoint(layout, teacher, out, torch.arange(64), torch.arange(256).repeat(2, 1), progress=False)
    t, p = _tensors(teacher), _tensors(out)
    assert t.keys() == p.keys() and all(torch.equal(t[n], p[n]) for n in t)
    assert json.loads((out / "config.json").read_text()) == json.loads((teacher / "config.json").read_text())
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(_load(teacher)(ids).logits, _load(out)(ids).logits)


@pytest.mark.parametrize("importance", ["minitron", "magnitude"])
def test_target_count_and_stock_loading_on_both_paths(teacher, tmp_path, importance):
    layout = read_layout(teacher)
    rows = np.random.default_rng(1).integers(0, 128, size=(4, 16)).astype(np.int32)
    scores = I.importance(importance, I.ImportanceInputs(teacher, _write_rows(tmp_path / "c.parquet", rows)))
    for target in (112000, 69824):  # width alone; width cut by 60% and hidden channels
        sizes = choose_sizes(layout, target, 0.6)
        out = tmp_path / f"p{target}"
        prune(layout, teacher, out, sizes, scores.mlp, scores.hidden, importance=importance, source="t",
              tokens=scores.tokens, tokenizer_dir=_tok(tmp_path), progress=False)
        model = _load(out)
        n = sum(x.numel() for x in model.parameters())
        assert n == sizes.parameters and abs(n - target) <= 0.01 * target
        assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def test_tied_head_on_the_hidden_path(tmp_path):
    """A tied qwen2 (q/k/v biases) cut in hidden channels: no lm_head is written, the model ties it back."""
    teacher = _save(Qwen2Config(**{**TINY, "tie_word_embeddings": True}), tmp_path / "t")
    layout = read_layout(teacher)
    target = layout.num_parameters(40, 96)
    sizes = choose_sizes(layout, target, 0.6)
    assert sizes.hidden < 64
    scores = I.importance("magnitude", I.ImportanceInputs(teacher))
    prune(layout, teacher, tmp_path / "p", sizes, scores.mlp, scores.hidden, importance="magnitude", source="t",
          tokens=0, tokenizer_dir=_tok(tmp_path), progress=False)
    assert "lm_head.weight" not in _tensors(tmp_path / "p")
    model = _load(tmp_path / "p")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(x.numel() for x in model.parameters()) == sizes.parameters
    assert torch.isfinite(model(torch.arange(16)[None]).logits).all()


def _tok(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text("{}")
    return d


# ------------------------------------------------------------------------------------------------ validation
def test_unknown_tensor_and_moe_family_fail_before_reading_weights(teacher, tmp_path):
    moe = tmp_path / "moe"
    AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).save_pretrained(moe)
    with pytest.raises(ValueError, match=r"model_type 'qwen3_moe' is not a supported dense family .*supported: "
                                         r"llama, mistral, qwen2, qwen3$"):
        read_layout(moe)
    from moe2dense.checkpoint import ShardedWriter

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((teacher / "config.json").read_text())
    with CheckpointReader(teacher) as r:
        plan = [(n, r.shape(n), r.dtype(n)) for n in r.keys()] + [("model.layers.0.mlp.gate.weight", (4, 64),
                                                                    torch.float32)]
        with ShardedWriter(odd, plan) as w:
            for n, s, d in plan:
                w.write(n, r.read(n) if n in r else torch.zeros(s, dtype=d))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate.weight' is not one a dense qwen3 "
                                         r"checkpoint has .*supported model_types: llama, mistral, qwen2, qwen3"):
        read_layout(odd)


# ------------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """models/dense_teacher (tiny dense Qwen3 + BPE), models/student/config.json (a smaller dense Qwen3: the
    target), the calibration split and params.yaml (smoke params, minitron on 256 tokens)."""
    root = tmp_path_factory.mktemp("ws")
    dense = root / "models" / "dense_teacher"
    texts = [f"In the beginning {i} the word was {i * 7}.\n" * 3 for i in range(60)]
    train_bpe(texts, vocab_size=300, min_frequency=2, out_dir=dense)
    _save(Qwen3Config(**{**TINY, "vocab_size": 320}), dense)
    Qwen3Config(**{**TINY, "vocab_size": 320, "intermediate_size": 150}).save_pretrained(root / "models" / "student")
    rows = np.random.default_rng(2).integers(0, 300, size=(12, 32)).astype(np.int32)
    _write_rows(root / "data" / "prepared" / "packed" / "calibration.parquet", rows)
    params = yaml.safe_load((REPO / "tests" / "smoke_params.yaml").read_text())
    params.setdefault("baselines", {})["prune"] = {"importance": "minitron", "calibration_tokens": 256,
                                                   "batch_size": 4, "device": "cpu"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _stage(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.prune"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_stage_prunes_to_the_students_count(workspace):
    proc = _stage(workspace)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((workspace / "metrics" / "baselines" / "prune.json").read_text())
    student = transformers_count(json.loads((workspace / "models" / "student" / "config.json").read_text()))
    assert metrics["target_parameters"] == student and abs(metrics["relative_error"]) <= 0.01
    assert (metrics["importance"], metrics["calibration_tokens"], metrics["hidden_size"]) == ("minitron", 256, 64)
    assert metrics["teacher_intermediate_size"] == 256 and metrics["intermediate_size"] < 256
    model = _load(workspace / "models" / "baseline_d2d")
    assert sum(x.numel() for x in model.parameters()) == metrics["parameters"]
    assert (workspace / "models" / "baseline_d2d" / "tokenizer.json").is_file()
    assert "minitron (on 256 calibration tokens)" in (workspace / "models" / "baseline_d2d" / "README.md").read_text()
    assert "importance_seconds" in json.loads((workspace / "timings" / "prune.json").read_text())


def _bad(workspace: Path, tmp_path: Path, edit) -> str:
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("baseline_d2d", "metrics", "timings"))
    edit(ws)
    proc = _stage(ws)
    assert proc.returncode == 2, proc.stderr
    assert not (ws / "models" / "baseline_d2d").exists()
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_stage_refuses_an_moe_dense_teacher_in_one_line(workspace, tmp_path):
    def moe(ws):
        d = ws / "models" / "dense_teacher"
        for f in d.glob("*.safetensors"):
            f.unlink()
        AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).save_pretrained(d)

    line = _bad(workspace, tmp_path, moe)
    assert line.startswith("[prune] error: models/dense_teacher/config.json: model_type 'qwen3_moe' is not a "
                           "supported dense family for width pruning; supported: llama, mistral, qwen2, qwen3")


def test_stage_refuses_a_target_larger_than_the_teacher(workspace, tmp_path):
    def big(ws):
        Qwen3Config(**{**TINY, "vocab_size": 320, "intermediate_size": 400}).save_pretrained(ws / "models" / "student")

    line = _bad(workspace, tmp_path, big)
    assert line.startswith("[prune] error: the M2D student's ") and "pruning can only shrink" in line
