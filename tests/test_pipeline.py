"""End-to-end: `dvc repro` of the smoke pipeline in a temporary git copy of the repo, DVC's caching, and the
Prefect flow over it."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import copy_pipeline_repo, dvc

pytestmark = pytest.mark.slow


ALL_STAGES = {"prepare", "teacher", "calibrate", "score", "select", "group", "assemble"}


def ran(proc) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def set_param(repo, dotted: str, value) -> None:
    path = repo / "params.yaml"
    data = yaml.safe_load(path.read_text())
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, smoke_params):
    repo = copy_pipeline_repo(tmp_path_factory.mktemp("pipeline"), smoke_params)
    first = dvc(repo, "repro")
    assert ran(first) == ALL_STAGES, first.stdout
    return repo


def test_outputs_exist_and_teacher_metrics_are_numbers(repo):
    for split in ("train", "calibration", "eval"):
        assert (repo / "data/prepared/packed" / f"{split}.parquet").is_file()
        assert (repo / "data/prepared/text" / f"{split}.parquet").is_file()
    assert (repo / "data/prepared/tokenizer/tokenizer.json").is_file()
    assert (repo / "models/teacher/config.json").is_file() and (repo / "models/teacher/model.safetensors").is_file()
    m = json.loads((repo / "metrics/teacher.json").read_text())
    for key in ("perplexity", "unigram_perplexity", "perplexity_vs_unigram", "train_tokens_per_s"):
        assert isinstance(m[key], float) and m[key] > 0, key
    assert len(m["usage_entropy"]) == 4 and all(0 < s <= 1 for s in m["max_token_share"])
    assert (repo / "plots/teacher_loss.csv").read_text().startswith("step,tokens,loss")
    assert not list(repo.rglob("*.tmp")), "no temp outputs may be left behind"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(repo / "models/teacher")
    tok = AutoTokenizer.from_pretrained(repo / "models/teacher")
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 32
    assert len(tok) == model.config.vocab_size


def test_assembled_student_is_a_plain_dense_qwen3(repo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = repo / "models/student"
    assert len(list(student_dir.glob("model-*.safetensors"))) > 1, "max_shard_gb of the smoke params shards it"
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert student.config.model_type == "qwen3" and student.config.intermediate_size == 4 * 16
    assert not any("expert" in n for n, _ in student.named_parameters())
    m = json.loads((repo / "metrics/assemble.json").read_text())
    assert m["num_parameters"] == sum(p.numel() for p in student.parameters())
    assert 0 < m["parameter_ratio"] < 0.5  # 4 of 32 experts kept
    ids = tok("In the beginning", return_tensors="pt").input_ids
    out = student.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    card = (student_dir / "README.md").read_text()
    assert "do_acp" in card and "qwen3_moe" in card


def test_repro_is_cached_and_reruns_only_what_a_param_touches(repo):
    again = dvc(repo, "repro")
    assert ran(again) == set(), again.stdout
    set_param(repo, "teacher.train.lr", 0.004)
    third = dvc(repo, "repro")
    assert ran(third) == ALL_STAGES - {"prepare"}, third.stdout
    assert "Stage 'prepare' didn't change" in third.stdout
    set_param(repo, "select.experts", 6)  # downstream-only change: calibration and scores are reused
    fourth = dvc(repo, "repro")
    assert ran(fourth) == {"select", "group", "assemble"}, fourth.stdout
    set_param(repo, "group.method", "coactivation")  # K = 6 > k = 4: grouping matters, selection is reused
    fifth = dvc(repo, "repro")
    assert ran(fifth) == {"group", "assemble"}, fifth.stdout
    plan = json.loads((repo / "grouping/plan.json").read_text())
    assert plan["group_method"] == "coactivation" and plan["blocks_per_layer"] == 4
    assert sorted(e for g in plan["layers"]["0"]["groups"] for e in g["experts"]) == \
        sorted(json.loads((repo / "selection/selection.json").read_text())["layers"]["0"]["experts"])


def test_prefect_flow_runs_stages_and_publishes_artifact(repo, prefect_harness):
    from flows.pipeline import pipeline

    dvc(repo, "repro")
    set_param(repo, "teacher.seed", 1)
    results = pipeline(repo=str(repo))
    assert [(r["stage"], r["status"]) for r in results] == [
        ("prepare", "skipped"), ("teacher", "ran"), ("calibrate", "ran"), ("score", "ran"), ("select", "ran"),
        ("group", "ran"), ("assemble", "ran")]
    art = read_artifact("moe2dense-pipeline")
    assert art["type"] == "markdown"
    assert "| prepare | skipped |" in art["data"] and "| teacher | ran |" in art["data"] and "perplexity" in art["data"]


def read_artifact(key: str) -> dict:
    """Latest artifact by key, straight from the REST API: prefect 3.8.8's client sends explicit nulls that its
    server, under fastapi 0.154, rejects (422); omitted fields are fine."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"key": {"any_": [key]}}, "limit": 1, "sort": "CREATED_DESC"}
    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    resp.raise_for_status()
    found = resp.json()
    assert found, f"no artifact {key!r}"
    return found[0]
