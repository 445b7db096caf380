"""`python -m moe2dense convert`: the one-shot command end to end on a tiny saved teacher, and its bad-input errors
(each before any weight is loaded, nothing written)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe2dense.convert as convert_mod
from moe2dense.__main__ import main
from moe2dense.data.tokenizer import train_bpe
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (8 experts, top-2) with its own byte-level BPE, saved like a hub checkpoint."""
    d = tmp_path_factory.mktemp("teacher")
    texts = [f"In the beginning {i} the word was {i * 7} and the light was good.\n" * 3 for i in range(200)]
    tok = train_bpe(texts, vocab_size=300, min_frequency=2, out_dir=d)
    config = tiny_config("qwen3_moe")
    config.vocab_size = 320
    config.max_position_embeddings = 256
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    assert len(tok) <= config.vocab_size
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe2dense", "convert", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_convert_writes_a_loadable_dense_model(teacher, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"The light {i} shines in darkness {i}."}) + "\n" for i in range(300)))
    out = tmp_path / "dense"
    proc = _cli("--teacher", str(teacher), "--method", "do_acp", "--experts", "4", "--group", "dominant",
                "--scaling", "score", "--data", str(data), "--calibration-tokens", "2048", "--seq-len", "64",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote a dense qwen3" in proc.stdout
    student = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert student.config.model_type == "qwen3" and student.config.intermediate_size == 2 * 16
    plan = json.loads((out / "moe2dense_plan.json").read_text())
    assert plan["group_method"] == "dominant" and plan["scaling"] == "score" and plan["experts_per_layer"] == 4
    assert plan["calibration"]["tokens"] == 2048 and plan["merge_scores"] == "acp"
    assert all(len(lp["groups"]) == 2 for lp in plan["layers"].values())
    ids = tok("In the beginning", return_tensors="pt").input_ids
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert not list(tmp_path.glob(".dense.*")), "no temp dir may be left beside --out"


def test_convert_defaults_to_the_demo_corpus_and_says_pure_pruning_once(teacher, tmp_path, caplog):
    out = tmp_path / "dense"
    with caplog.at_level("INFO"):
        code = main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "2", "--group", "router",
                     "--calibration-tokens", "512", "--seq-len", "64", "--out", str(out)])
    assert code == 0
    said = [r.getMessage() for r in caplog.records if "pure pruning" in r.getMessage()]
    assert len(said) == 1 and "--group router" in said[0]
    plan = json.loads((out / "moe2dense_plan.json").read_text())
    assert plan["pure_pruning"] and plan["calibration"]["data"] == "demo corpus"


@pytest.mark.parametrize("args, message", [
    (["--method", "sf", "--experts", "1"], "out of range: need k <= K <= E, i.e. 2 <= select.experts <= 8"),
    (["--method", "sf", "--experts", "9"], "out of range"),
    (["--method", "magic", "--experts", "4"], "not a scoring method; choose one of ('sf', 'pp'"),
    (["--method", "sf", "--experts", "4", "--group", "kmeans"], "not a grouping method"),
    (["--method", "sf", "--experts", "4", "--scaling", "big"], "not a scaling"),
    (["--method", "sf", "--experts", "4", "--blocks", "5"], "--blocks 5 must be in [1, --experts 4]"),
    (["--method", "sf", "--experts", "4", "--data", "/nonexistent.jsonl"], "no such file"),
])
def test_bad_arguments_fail_before_loading_weights(teacher, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the arguments were checked"))
    out = tmp_path / "dense"
    assert main(["convert", "--teacher", str(teacher), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_refused_unless_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "dense"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "2", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_quantized_teacher_is_refused_with_how_to_dequantize(teacher, tmp_path, capsys):
    q = tmp_path / "quantized"
    q.mkdir()
    for f in teacher.iterdir():
        (q / f.name).write_bytes(f.read_bytes())
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (q / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--teacher", str(q), "--method", "sf", "--experts", "2", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "quantized (mxfp4)" in err and "dequantize" in err.lower()


def test_failure_during_assembly_leaves_nothing_behind(teacher, tmp_path, monkeypatch):
    def broken(checkpoint, plan, out, **kw):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_mod, "assemble", broken)
    out = tmp_path / "dense"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "2", "--calibration-tokens",
              "256", "--seq-len", "64", "--out", str(out)])
    assert not out.exists() and list(tmp_path.iterdir()) == []
