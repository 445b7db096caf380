"""The baselines at matched parameters (issue: the paper's comparison): the dense demo teacher's size, the random
baselines' weights, the comparison's numbers and tables, and dvc.yaml in step with the path table. The pruning
itself: tests/test_prune.py; the stages end to end: tests/test_pipeline.py (`make baselines`)."""
from __future__ import annotations

import io

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO
from moe2dense import methods as M
from moe2dense.arch import get_adapter
from moe2dense.assemble import student_config
from moe2dense.baselines import reinit
from moe2dense.baselines.report import ROWS, collect, cost_ratio, curves_png, headline, render
from moe2dense.baselines.runs import DENSE_TEACHER, EVAL_MODELS, RUNS, TEACHER
from moe2dense.params import load_params, parse_params
from moe2dense.teacher.demo import dense_demo_config, demo_config, num_parameters
from tiny_models import CONFIGS


# ---------------------------------------------------------------- dvc.yaml and the path table
def test_dvc_stages_follow_the_path_table():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    foreach = stages["distill_baseline"]["foreach"]
    assert list(foreach) == list(M.names("baseline")) == list(RUNS)
    assert {k: f"models/{v}" for k, v in foreach.items()} == {n: r.teacher for n, r in RUNS.items()}
    assert stages["evaluate_baseline"]["matrix"]["model"] == list(EVAL_MODELS)
    assert stages["reinit"]["matrix"]["baseline"] == ["random_ffn", "random_init"]
    assert stages["prune"]["outs"] == [RUNS["d2d"].initial]
    assert stages["dense_teacher"]["outs"] == [DENSE_TEACHER]
    body = stages["distill_baseline"]["do"]
    assert body["outs"] == ["models/distilled_${key}"] and "models/baseline_${key}" in body["deps"]
    for name, run in RUNS.items():  # the templated paths, expanded, are the table's
        assert run.distilled == f"models/distilled_{name}" and run.initial == f"models/baseline_{name}"
        assert run.metrics == list(body["metrics"][0])[0].replace("${key}", name)
        assert run.loss_plot == list(body["plots"][0])[0].replace("${key}", name)
        assert run.metrics in stages["baselines"]["deps"] and run.loss_plot in stages["baselines"]["deps"]
    assert RUNS["d2d"].teacher == DENSE_TEACHER and RUNS["random_ffn"].teacher == RUNS["random_init"].teacher == TEACHER


# ---------------------------------------------------------------- the dense demo teacher
@pytest.mark.parametrize("params", ["params.yaml", "tests/smoke_params.yaml"])
def test_dense_demo_teacher_matches_the_moe_teachers_size(params):
    m = parse_params(yaml.safe_load((REPO / params).read_text())).teacher.demo
    moe = num_parameters(demo_config(m, 8192, 256, 0, 1))
    dense = dense_demo_config(m, 8192, 256, 0, 1)
    assert abs(num_parameters(dense) - moe) / moe < 0.05
    assert dense.intermediate_size % 64 == 0 and dense.model_type == "qwen3"
    assert (dense.hidden_size, dense.num_hidden_layers, dense.num_attention_heads, dense.num_key_value_heads) == \
        (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads)


def test_dense_demo_width_by_hand():
    """The shipped demo: hidden 128, 4 layers, vocab 8,192 tied. Non-MLP = 8192*128 (embeddings) + 4 * (attention
    128*128*2 + 128*64*2 = 49,152, q/k norms 2*32, two layer norms 2*128) + 128 (final norm) = 1,246,592; the MoE
    teacher has 4,408,704, so 4 * 3 * 128 * w = 3,162,112 -> w = 2,058.7 -> 2,048 (multiple of 64)."""
    m = load_params(REPO / "params.yaml").teacher.demo
    config = dense_demo_config(m, 8192, 256, 0, 1)
    assert config.intermediate_size == 2048
    assert num_parameters(config) == 1_246_592 + 4 * 3 * 128 * 2048 == 4_392_320
    assert num_parameters(demo_config(m, 8192, 256, 0, 1)) == 4_408_704


# ---------------------------------------------------------------- random_ffn / random_init
def _student(tmp_path, family: str):
    teacher = CONFIGS[family]()
    config = student_config(teacher, get_adapter(teacher), 24, torch.float32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "student")
    return teacher, tmp_path / "student"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text", "nemotron_h", "deepseek_v3"])
def test_random_ffn_differs_from_the_student_only_in_the_mlps(tmp_path, family):
    teacher, student_dir = _student(tmp_path, family)
    student = _state(AutoModelForCausalLM.from_pretrained(student_dir))
    model, names = reinit.build("random_ffn", student_dir, teacher, seed=0)
    attr = get_adapter(teacher).spec.dense_mlp_attr
    assert names and all(n.split(".")[-1] == attr for n in names)
    got = _state(model)
    assert got.keys() == student.keys()
    in_mlp = {k for k in got if any(k.startswith(n + ".") for n in names)}
    assert in_mlp and all(not torch.equal(got[k], student[k]) for k in in_mlp if got[k].ndim == 2)
    assert all(torch.equal(got[k], student[k]) for k in got if k not in in_mlp), \
        [k for k in got if k not in in_mlp and not torch.equal(got[k], student[k])]
    std = model.config.initializer_range
    weights = torch.cat([got[k].flatten() for k in in_mlp if got[k].ndim == 2])
    assert abs(weights.std().item() - std) < 0.2 * std  # the config's own initializer, N(0, initializer_range)
    again, _ = reinit.build("random_ffn", student_dir, teacher, seed=0)
    other, _ = reinit.build("random_ffn", student_dir, teacher, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in got.items())
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in got.items())


def test_random_init_is_the_initializer_everywhere(tmp_path):
    teacher, student_dir = _student(tmp_path, "qwen3_moe")
    student = _state(AutoModelForCausalLM.from_pretrained(student_dir))
    torch.manual_seed(123)  # a fresh init with another seed: nothing shared with the student
    model, names = reinit.build("random_init", student_dir, teacher, seed=1)
    assert names == []
    got = _state(model)
    assert got.keys() == student.keys()
    assert all(not torch.equal(got[k], student[k]) for k in got if got[k].ndim == 2)
    again, _ = reinit.build("random_init", student_dir, teacher, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in got.items())


def test_random_ffn_refuses_a_student_without_the_familys_mlps(tmp_path):
    teacher, student_dir = _student(tmp_path, "qwen3_moe")
    nemotron = CONFIGS["nemotron_h"]()  # says its MLPs are `mixer`: a Qwen3 student has none
    with pytest.raises(ValueError, match=r"the student has no module named like .*mixer: random_ffn cannot find"):
        reinit.build("random_ffn", student_dir, nemotron, seed=0)


# ---------------------------------------------------------------- the comparison
def _eval(bpb: float, acc: float) -> dict:
    return {"path": "x", "demo_ppl_bible": {"bits_per_byte": bpb, "word_perplexity": 2 ** bpb, "samples": 3},
            "demo_continuation": {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc, "samples": 9}}


def _run(params: int, teacher: str, before: float, after: float, seconds: float | None, fwd: float | None) -> dict:
    return {"distill": {"parameters": params, "teacher": teacher, "tokens": 1000, "heldout_kl_before": before,
                        "heldout_kl_after": after},
            "timings": {} if seconds is None else {"seconds": seconds, "tokens_per_s": 1000 / seconds,
                                                   "teacher_forward_tokens_per_s": fwd},
            "before": _eval(3.0, 0.2), "after": _eval(2.0, 0.3)}


def _comparison() -> dict:
    runs = {"m2d": _run(100, TEACHER, 0.4, 0.04, 50.0, 4000.0), "d2d": _run(101, DENSE_TEACHER, 0.9, 0.1, 80.0, 1000.0),
            "random_ffn": _run(100, TEACHER, 5.0, 0.5, 49.0, 4100.0), "random_init": _run(100, TEACHER, 9.0, 2.0,
                                                                                          None, None)}
    teachers = {"moe": {"metrics": {"parameters": 300, "perplexity": 12.5}, "eval": _eval(1.5, 0.5)},
                "dense": {"metrics": {"parameters": 290, "perplexity": 11.0}, "eval": _eval(1.4, 0.55)}}
    return collect(runs, teachers)


def test_collect_by_hand():
    b = _comparison()
    assert list(b) == [*ROWS, "teachers", "cost_m2d_over_d2d"]
    assert b["d2d"] == {"parameters": 101, "teacher": DENSE_TEACHER, "tokens": 1000, "seconds": 80.0,
                        "tokens_per_s": 12.5, "teacher_forward_tokens_per_s": 1000.0, "heldout_kl_before": 0.9,
                        "heldout_kl_after": 0.1,
                        "eval_before": {"demo_continuation": {"acc": 0.2, "acc_norm": 0.2},
                                        "demo_ppl_bible": {"bits_per_byte": 3.0, "word_perplexity": 8.0}},
                        "eval": {"demo_continuation": {"acc": 0.3, "acc_norm": 0.3},
                                 "demo_ppl_bible": {"bits_per_byte": 2.0, "word_perplexity": 4.0}}}
    assert b["random_init"]["seconds"] is None  # no timings (e.g. after a `dvc pull`): shown as missing, not 0
    # M2D 50 s against d2d 80 s; the teacher forward 1/4000 s per token against 1/1000
    assert b["cost_m2d_over_d2d"] == {"seconds": 0.625, "teacher_forward_seconds_per_token": 0.25}
    assert b["teachers"]["dense"]["perplexity"] == 11.0 and b["teachers"]["moe"]["parameters"] == 300


def test_cost_ratio_needs_both_runs():
    assert cost_ratio(None, {"seconds": 1}) == {} and cost_ratio({"seconds": 1}, None) == {}
    assert cost_ratio({"seconds": None, "teacher_forward_tokens_per_s": 2.0},
                      {"seconds": 3.0, "teacher_forward_tokens_per_s": 1.0}) == \
        {"seconds": None, "teacher_forward_seconds_per_token": 0.5}


def test_headline_keeps_the_reported_metrics_only():
    results = {"a": _eval(2.0, 0.25)}
    assert headline(results["a"], results) == {"demo_continuation": {"acc": 0.25, "acc_norm": 0.25},
                                               "demo_ppl_bible": {"bits_per_byte": 2.0, "word_perplexity": 4.0}}


def test_render_puts_m2d_first_and_shows_before_and_after():
    text = render(_comparison())
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "parameters" not in line and "task" not in line]
    assert rows[0].startswith("| M2D") and rows[1].startswith("| d2d")
    assert "| M2D (this pipeline's student) | 100 | models/teacher | 0.4000 | 0.04000 | 50.00 | 20.00 | 4000 |" in text
    assert "| random_init | 100 | models/teacher | 9.000 | 2.000 | — | — | — |" in text
    assert "the workers' training time ×0.6250, the teacher's forward per token ×0.2500" in text
    assert "| demo_ppl_bible | bits_per_byte ↓ | 3.000 → 2.000 | 3.000 → 2.000 | 3.000 → 2.000 | 3.000 → 2.000 | " \
           "1.500 | 1.400 |" in text
    assert "MoE teacher: 300 parameters, held-out perplexity 12.50. dense teacher: 290 parameters" in text
    assert "| task | metric | M2D | d2d | random_ffn | random_init | MoE teacher | dense teacher |" in text


def test_curves_png_is_deterministic():
    curves = {r: [(100 * i, 1.0 / (i + 1 + k)) for i in range(5)] for k, r in enumerate(ROWS)}
    a, b = io.BytesIO(), io.BytesIO()
    curves_png(curves, a)
    curves_png(curves, b)
    assert a.getvalue() == b.getvalue() and a.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pipeline_flow_runs_the_baselines_after_what_they_read():
    """`python -m flows.pipeline --stage baselines` runs DVC's own plan for the target: every baseline stage, each
    after the stages it reads from, and nothing that only the screen needs."""
    from flows.dvc_stage import stage_order

    order = stage_order(REPO, "baselines")
    at = {s: i for i, s in enumerate(order)}
    assert order[-1] == "baselines" and "screen" not in at
    for before, after in (("assemble", "prune"), ("dense_teacher", "prune"), ("prune", "distill_baseline@d2d"),
                          ("assemble", "reinit@random_ffn"), ("reinit@random_init", "distill_baseline@random_init"),
                          ("distill_baseline@d2d", "evaluate_baseline@distilled_d2d"), ("distill", "baselines"),
                          ("evaluate_baseline@dense_teacher", "baselines"), ("evaluate@student", "baselines")):
        assert at[before] < at[after], (before, after)
