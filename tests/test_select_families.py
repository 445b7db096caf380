"""Every stage on a saved tiny checkpoint of every supported family (tiny_models.FAMILIES): prepare -> teacher ->
calibrate -> score -> select -> group -> assemble -> eval_tasks -> evaluate run through the stage entry points
exactly as DVC calls them (in-process to keep the suite fast); distillation runs its training objective
(distill.loop.Objective, the code every Ray worker runs) for a few steps in-process, since a Ray job per family would
cost minutes (tests/test_distill.py and the smoke pipeline run the Ray stage itself)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from conftest import REPO
from tiny_models import FAMILIES



def make_checkpoint(family: str, path, config=None, quantize: str | None = None):
    """A tiny random checkpoint of `family` (or of `config`) with a byte-level BPE tokenizer of its own, as a user's
    dir would be; `quantize` (mxfp4, fp8) publishes it quantized, as tests/quantize.py writes the formats."""
    import torch
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from moe2dense.data.tokenizer import train_bpe

    torch.manual_seed(0)
    config = config or tiny_config(family)
    tok = train_bpe(["In the beginning God created the heaven and the earth. def f(x): return x"] * 30,
                    vocab_size=300, min_frequency=1, out_dir=path)
    config.vocab_size = len(tok)
    config.eos_token_id, config.bos_token_id, config.pad_token_id = tok.eos_token_id, tok.eos_token_id, None
    model = AutoModelForCausalLM.from_config(config)
    if quantize is None:
        model.save_pretrained(path)
        return config
    from quantize import quantize_checkpoint

    model.to(torch.bfloat16).save_pretrained(path.parent / "float")
    quantize_checkpoint(path.parent / "float", path, quantize, [16, 16])
    return config


def small_params(tmp_path, ckpt, experts: int) -> dict:
    """Smoke params over a small user corpus (kind: files), so each family runs in seconds."""
    import random

    rng = random.Random(0)
    words = ("the expert router token layer dense model sparse gate weight value light earth water king "
             "def return class import self lambda yield").split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120)),
                                            "topic": ("prose", "code")[i % 2]}) for i in range(200)))
    params = yaml.safe_load((REPO / "tests" / "smoke_params.yaml").read_text())
    params["prepare"]["corpus"] = [{"kind": "files", "paths": [str(corpus)], "domain_column": "topic"}]
    params["prepare"]["seq_len"] = 32
    params["teacher"]["source"] = str(ckpt)
    params["select"]["experts"] = experts
    params["calibrate"]["max_tokens"] = 4096
    params["evaluate"]["limit"] = 4  # documents/items per lm-eval task: this test checks that it runs, not scores
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def run_stages(workdir, monkeypatch, names):
    import importlib

    monkeypatch.chdir(workdir)
    for name in names:
        importlib.import_module(f"stages.{name}").main()


def distill_step() -> None:
    """One optimizer step of the distillation objective on the first batch of the train split (in the current
    directory, after assemble): its loss equals the KL of both models' own forward, so does its held-out measure (the
    one the workers report), and every student weight gets a finite gradient, the dense FFN's projections a non-zero
    one."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe2dense.distill.data import load_rows
    from moe2dense.distill.loop import Objective, _labels, _online_target
    from moe2dense.distill.losses import kd_loss
    from moe2dense.heldout import kl as heldout_kl
    from moe2dense.params import load_params
    from moe2dense.teacher.load import load_teacher

    p = load_params().distill
    teacher = load_teacher("models/teacher", device="cpu")
    student = AutoModelForCausalLM.from_pretrained("models/student", dtype=torch.float32).eval()  # no dropout
    objective = Objective(student, {"loss": p.loss, "temperature": p.temperature, "loss_options": p.loss_options,
                                    "ce_weight": p.ce_weight, "chunk_tokens": 16})
    ids = torch.from_numpy(load_rows("data/prepared/packed/train.parquet")[: p.batch_size].astype("int64"))
    with torch.no_grad():  # the reference: the full logits of both models' own forward, last position unlabelled
        ref = kd_loss(student(input_ids=ids).logits[:, :-1].flatten(0, 1),
                      teacher(input_ids=ids).logits[:, :-1].flatten(0, 1)).mean()
    with torch.no_grad():  # the workers' held-out measure (labels None): heldout.kl, the family's head map included
        held = objective(ids, _online_target(teacher, ids), None) / ids.numel()
    assert float(held) == pytest.approx(heldout_kl(student, teacher, ids.numpy()), rel=1e-4, abs=1e-9)
    loss = objective(ids, _online_target(teacher, ids), _labels(ids))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-4, abs=1e-9)
    grads = {name: w.grad for name, w in student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the FFN's projections (a one-expert student's router gets none: a softmax over one expert is constant)
    dead = [name for name, g in grads.items() if ".mlp." in name and "proj" in name and not g.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    torch.optim.AdamW(student.parameters(), lr=p.lr).step()


@pytest.mark.parametrize("family", FAMILIES)
def test_stages_on_every_family(family, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    run_every_stage(make_checkpoint(family, ckpt), ckpt, tmp_path, monkeypatch)


@pytest.mark.parametrize("scheme", ["mxfp4", "fp8"])
def test_stages_on_a_quantized_teacher(scheme, tmp_path, monkeypatch):
    """GPT-OSS as published (MXFP4 experts) and DeepSeek-V3 as published (block FP8): every stage reads the teacher
    as it is, and evaluate runs on the teacher itself, dequantized as it loads."""
    from test_quantized import quantizable_config

    ckpt = tmp_path / "ckpt"
    config = make_checkpoint(None, ckpt, quantizable_config(scheme), quantize=scheme)
    run_every_stage(config, ckpt, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "work/metrics/teacher.json").read_text())["quantization"] == scheme
    student = json.loads((tmp_path / "work/models/student/config.json").read_text())
    assert "quantization_config" not in student
    monkeypatch.setattr("sys.argv", ["stages.evaluate", "teacher"])
    run_stages(tmp_path / "work", monkeypatch, ["evaluate"])
    assert json.loads((tmp_path / "work/eval/teacher.json").read_text())["demo_ppl_code"]["byte_perplexity"] > 1


def run_every_stage(config, ckpt, tmp_path, monkeypatch) -> None:
    from moe2dense.arch import get_adapter

    adapter = get_adapter(config)
    work = small_params(tmp_path, ckpt, experts=adapter.top_k + 1)

    monkeypatch.setattr("sys.argv", ["stages"])  # stages.teacher parses its argv (kind moe|dense): not pytest's
    run_stages(work, monkeypatch, ["prepare", "teacher", "calibrate", "score", "select", "group", "assemble"])

    teacher = json.loads((work / "metrics/teacher.json").read_text())
    assert teacher["trained"] is False and teacher["model_type"] == config.model_type
    assert not list((work / "models/teacher").glob("*.safetensors"))  # recorded, not copied
    scores = pl.read_parquet(work / "scores/scores.parquet")
    assert scores.height == len(adapter.moe_layers) * adapter.num_experts * 7
    assert set(scores["layer"].unique()) == set(adapter.moe_layers)
    sel = json.loads((work / "selection/selection.json").read_text())
    assert sel["method"] == "do_acp" and sel["top_k"] == adapter.top_k and sel["num_experts"] == adapter.num_experts
    assert sorted(int(layer) for layer in sel["layers"]) == adapter.moe_layers
    for entry in sel["layers"].values():
        assert len(set(entry["experts"])) == adapter.top_k + 1 and 0 < entry["routed_mass_kept"] <= 1
    for plot in ("score_distributions.png", "usage_by_domain.png", "selection_heatmap.png"):
        assert (work / "plots" / plot).stat().st_size > 5000

    student = json.loads((work / "models/student/config.json").read_text())
    assert student["model_type"] == adapter.dense_model_type
    distill_step()

    monkeypatch.setattr("sys.argv", ["stages.evaluate", "student"])
    run_stages(work, monkeypatch, ["eval_tasks", "evaluate"])
    result = json.loads((work / "eval/student.json").read_text())
    assert result["path"] == "models/student" and set(result) >= {"demo_ppl_code", "demo_ppl_prose", "demo_continuation"}
    assert 0 <= result["demo_continuation"]["acc"] <= 1 and result["demo_ppl_code"]["byte_perplexity"] > 1


def test_bad_expert_count_fails_before_calibration(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    make_checkpoint("qwen3_moe", ckpt)
    work = small_params(tmp_path, ckpt, experts=9)  # E = 8
    monkeypatch.setattr("sys.argv", ["stages"])  # stages.teacher parses its argv: not pytest's
    run_stages(work, monkeypatch, ["prepare", "teacher"])
    from stages._runner import run
    from stages.calibrate import main

    with pytest.raises(SystemExit) as info:
        run("calibrate", main)
    assert info.value.code == 2
    assert "select.experts = 9 is out of range" in capsys.readouterr().err
    assert not (work / "calibration").exists()
