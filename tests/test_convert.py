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


@pytest.mark.parametrize("args, message", [  # the pipeline's params errors, under the flags' names
    (["--method", "sf", "--experts", "1"], "--experts = 1 is out of range: need k <= K <= E, i.e. 2 <= --experts <= 8"),
    (["--method", "sf", "--experts", "9"], "out of range"),
    (["--method", "magic", "--experts", "4"], "--method: Input should be 'sf', 'pp', 'cp', 'ean', 'reap', 'acp' or "
                                              "'do_acp' (got 'magic')"),
    (["--method", "sf", "--experts", "4", "--group", "kmeans"], "--group: Input should be 'weight', 'output'"),
    (["--method", "sf", "--experts", "4", "--scaling", "big"], "--scaling: Input should be 'uniform' or 'score'"),
    (["--method", "sf", "--experts", "4", "--blocks", "5"], "--blocks = 5 must be <= --experts = 4"),
    (["--method", "sf", "--experts", "4", "--blocks", "0"], "--blocks: Input should be greater than or equal to 1"),
    (["--method", "sf", "--experts", "4", "--dtype", "int8"], "--dtype: Input should be 'float32'"),
    (["--method", "sf", "--experts", "4", "--batch-size", "0"], "--batch-size: Input should be greater than or"),
    (["--method", "sf", "--experts", "4", "--calibration-tokens", "0"], "--calibration-tokens must be >= 1"),
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


def test_calibration_rows_are_the_pipelines_packing(teacher, tmp_path):
    """convert packs its calibration text exactly as the prepare stage packs a split (PackedWriter): the same rows
    of seq_len tokens, documents separated by EOS, per domain; the first calibration_tokens // seq_len of them."""
    from moe2dense.data.packing import PackedWriter, packed_tokens, read_packed
    from moe2dense.data.tokenizer import batched_encode, eos_id, load_tokenizer

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"The light {i} shines {'in darkness ' * (i % 7)}{i}."}) + "\n"
                            for i in range(200)))
    tok = load_tokenizer(teacher)
    args = convert_mod.ConvertArgs(teacher=str(teacher), out=str(tmp_path / "o"), method="sf", experts=2,
                                   data=str(data), calibration_tokens=1000)
    ids, domains = convert_mod.calibration_rows(args, tok, 32)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    w = PackedWriter(tmp_path / "packed.parquet", 32, eos_id(tok), row_group_rows=16)
    for t in batched_encode(tok, texts):
        w.add("calib", t)
    w.close()
    n = 1000 // 32
    assert ids.dtype == "int64" and ids.shape == (n, 32)
    assert (ids == packed_tokens(tmp_path / "packed.parquet")[:n]).all()
    assert domains == read_packed(tmp_path / "packed.parquet", ["domain"])["domain"].to_pylist()[:n]


@pytest.mark.parametrize("group, passes", [("router", ["routing"]),
                                           ("output", ["all_outputs", "routing"])])  # even at K == k: one rule
def test_convert_captures_the_stages_passes(teacher, tmp_path, monkeypatch, group, passes):
    """The calibration passes are checks.calibrated_passes of the params convert built, as calibrate's are."""
    seen = []

    def spy(checkpoint, batches, out_root, *, needs, **kw):
        seen.append(sorted(needs))
        return real(checkpoint, batches, out_root, needs=needs, **kw)

    real = convert_mod.capture_checkpoint
    monkeypatch.setattr(convert_mod, "capture_checkpoint", spy)
    assert main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "2", "--group", group,
                 "--calibration-tokens", "256", "--seq-len", "64", "--out", str(tmp_path / "dense")]) == 0
    assert seen == [passes]
