"""The params pre-flight (moe2dense/checks.py): every check before any model is loaded, each error naming the key;
`python -m moe2dense check-params` and the DVC stage `check` that runs it first."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, copy_pipeline_repo, dvc
from moe2dense.checks import capture_passes, preflight, problems
from moe2dense.params import ParamsError, load_params, parse_params


def found(data: dict, **kw) -> str:
    return "\n".join(problems(parse_params(data), lm_eval=False, **kw))


@pytest.mark.parametrize("data, needles", [
    ({"select": {"experts": 64}}, ["select.experts = 64 is out of range", "4 <= select.experts <= 32"]),
    ({"select": {"experts": 2}}, ["select.experts = 2 is out of range"]),
    ({"distill": {"teacher_top_k": 64}}, ["distill.teacher_top_k = 64", "E = 32", "allowed: 1..32"]),
    ({"screen": {"experts": [2, 4, 40]}}, ["screen.experts [2, 40] out of range", "4 <= K <= 32"]),
    ({"score": {"method": "sf", "methods": ["sf"]}, "group": {"method": "weight"}, "screen": {"groupings": ["weight"]}},
     ["screen.methods: ['acp', 'do_acp', 'ean', 'reap'] need the ['all_outputs', 'routed_outputs']",
      "calibrate runs only ['routing']"]),
    ({"score": {"method": "sf", "methods": ["sf"]}, "group": {"method": "weight"}, "screen": {"methods": ["sf"]}},
     ["screen.groupings: ['dominant', 'output'] need the ['all_outputs']"]),
    ({"evaluate": {"tasks": ["paper"], "num_fewshot": {"demo_continuation": 1}}},
     ["evaluate.num_fewshot: ['demo_continuation'] are demo tasks, but evaluate.tasks ['paper'] has none"]),
    ({"teacher": {"source": "/no/such/teacher"}}, ["teacher.source='/no/such/teacher': no such directory"]),
])
def test_each_check_names_its_key(data, needles):
    msg = found(data)
    for needle in needles:
        assert needle in msg, msg


def test_valid_params_pass_and_every_problem_is_listed_at_once():
    for path in (REPO / "params.yaml", REPO / "tests" / "smoke_params.yaml"):
        assert problems(load_params(path), REPO, lm_eval=False) == []
    demo_only = {"evaluate": {"tasks": ["demo_ppl_bible", "demo_continuation"], "num_fewshot": {"demo_continuation": 2}}}
    assert problems(parse_params(demo_only)) == []  # demo task names are the eval_tasks stage's: lm-eval not asked
    bad = parse_params({"select": {"experts": 64}, "distill": {"teacher_top_k": 64}, "screen": {"experts": [40]}})
    with pytest.raises(ParamsError) as err:
        preflight(bad, lm_eval=False)
    lines = str(err.value).splitlines()
    assert "3 problem(s) found before any model is loaded" in lines[0] and len(lines) == 4
    assert all(re.match(r"  - (select\.experts|distill\.|screen\.experts)", line) for line in lines[1:]), lines


def test_real_teacher_shape_comes_from_its_config_alone(tmp_path):
    from tiny_models import tiny_config

    tiny_config("qwen3_moe").save_pretrained(tmp_path / "ckpt")  # config.json only: no weights to read
    base = {"teacher": {"source": "ckpt"}, "screen": {"experts": [2, 8]}}
    assert problems(parse_params({**base, "select": {"experts": 4}}), tmp_path, lm_eval=False) == []
    msg = "\n".join(problems(parse_params({**base, "select": {"experts": 9}, "distill": {"teacher_top_k": 9}}),
                             tmp_path, lm_eval=False))
    assert "2 <= select.experts <= 8" in msg and "distill.teacher_top_k = 9" in msg and "E = 8" in msg


@pytest.mark.slow  # lm-eval indexes its task registry (~10-20 s)
def test_lm_eval_tasks_and_their_offline_datasets_are_checked_up_front():
    # the same resolution as the evaluate stage (moe2dense.evaluate.runner.load_tasks), demo tasks aside
    msg = "\n".join(problems(parse_params({"evaluate": {"tasks": ["demo", "arc_easy"]}})))
    assert msg.startswith("evaluate.tasks: lm-eval task 'arc_easy' needs its dataset"), msg
    assert "HF_DATASETS_OFFLINE" in msg


@pytest.mark.parametrize("score_methods, group, passes", [
    (["sf"], "output", {"routing", "all_outputs"}),  # calibrate must capture the Gram that grouping reads
    (["sf"], "dominant", {"routing", "all_outputs"}),
    (["sf"], "coactivation", {"routing"}),
    (["sf", "reap"], "weight", {"routing", "routed_outputs"}),
    (["do_acp"], "router", {"routing", "all_outputs"}),
])
def test_capture_passes_cover_scoring_and_grouping(score_methods, group, passes):
    assert capture_passes(score_methods, [group]) == passes


@pytest.mark.parametrize("data, needle", [
    ({"select": {"experts": True}}, "select.experts: Input should be a valid integer (got True)"),
    ({"select": {"experts": 4.0}}, "select.experts: Input should be a valid integer"),
    ({"calibrate": {"store_probs": 1}}, "calibrate.store_probs: Input should be a valid boolean (got 1)"),
    ({"distill": {"lr": True}}, "distill.lr"),
    ({"distill": {"loss": "jsd", "loss_options": {"beta": True}}},
     "distill.loss_options: jsd beta: Input should be a valid number (got True)"),
    ({"distill": {"batch_size": 0}}, "distill.batch_size: Input should be greater than or equal to 1 (got 0)"),
    ({"evaluate": {"batch_size": -1}}, "evaluate.batch_size"),
    ({"distill": {"seed": -1}}, "distill.seed: Input should be greater than or equal to 0 (got -1)"),
    ({"prepare": {"seed": -3}}, "prepare.seed"),
])
def test_strict_types_and_bounds_name_the_key(data, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(data, "params.yaml")
    assert needle in str(err.value)


def test_yaml_files_empty_and_exponent_floats(tmp_path):
    path = tmp_path / "params.yaml"
    for text in ("", "# nothing\n", "{}\n"):
        path.write_text(text)
        with pytest.raises(ParamsError, match="empty; it needs at least one stage section"):
            load_params(path)
    path.write_text("distill: {lr: 1e-3, weight_decay: 5E-2}\n")  # YAML 1.1 would give the string '1e-3'
    p = load_params(path)
    assert p.distill.lr == 0.001 and p.distill.weight_decay == 0.05


def test_stage_runner_preflights_before_main(tmp_path, monkeypatch, capsys):
    from stages._runner import run

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"distill": {"teacher_top_k": 64}}))
    monkeypatch.chdir(tmp_path)
    called = []
    with pytest.raises(SystemExit) as info:
        run("distill", lambda: called.append(1))
    assert info.value.code == 2 and not called
    assert "[distill] error: " in (err := capsys.readouterr().err) and "distill.teacher_top_k = 64" in err


def test_check_params_cli_from_another_directory(tmp_path, capsys):
    """As users run it: a subprocess, elsewhere, with --params; bad input -> rc 2 and the key, good -> OK + stamp."""
    smoke = yaml.safe_load((REPO / "tests" / "smoke_params.yaml").read_text())
    cases = {"selct.yaml": {**smoke, "selct": {"experts": 8}},
             "topk.yaml": {**smoke, "distill": {**smoke["distill"], "teacher_top_k": 64}},
             "good.yaml": smoke}
    for name, data in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump(data))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def cli(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moe2dense", "check-params", "--params", str(tmp_path / name),
                               *extra], cwd=cwd, capture_output=True, text=True, timeout=300)

    bad = cli("selct.yaml")
    assert bad.returncode == 2 and "selct: unknown key; allowed keys here: assemble, baselines, calibrate" in bad.stderr
    assert "Traceback" not in bad.stderr
    from moe2dense.__main__ import main  # the same command in-process: one interpreter start less

    assert main(["check-params", "--params", str(tmp_path / "topk.yaml")]) == 2
    assert "distill.teacher_top_k = 64 is more than the teacher's E = 32" in capsys.readouterr().err
    good = cli("good.yaml", "--stamp", "out/params.ok", "--passes", "out/passes.json")
    assert good.returncode == 0 and "OK" in good.stdout, good.stderr
    assert (cwd / "out/params.ok").read_text() == "params.yaml passed `python -m moe2dense check-params`\n"
    assert yaml.safe_load((cwd / "out/passes.json").read_text()) == {"passes": ["all_outputs", "routed_outputs",
                                                                               "routing"]}


@pytest.mark.slow
def test_dvc_stage_check_runs_first_and_fails_on_unknown_sections(tmp_path, smoke_params):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "params.yaml" in stages["check"]["deps"] and "params" not in stages["check"]
    users = {name for name, s in stages.items() for d in s.get("deps", []) if str(d).startswith("checks/")}
    assert users == {"prepare", "calibrate"}  # the roots of the pipeline, and calibrate (its passes)

    data = yaml.safe_load(smoke_params.read_text())
    data["prepare"]["corpus"] = [{"kind": "bible", "max_chars": 120_000}]  # one domain: prepare in seconds
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    repo = copy_pipeline_repo(tmp_path / "pipeline", tmp_path / "params.yaml")

    def ran(proc) -> list[str]:
        return re.findall(r"Running stage '([^']+)'", proc.stdout)

    assert ran(dvc(repo, "repro", "prepare")) == ["check", "prepare"]
    params = repo / "params.yaml"
    data["distill"]["lr"] = data["distill"]["lr"] * 2  # a valid edit: only the check reruns
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    assert ran(dvc(repo, "repro", "prepare")) == ["check"]
    params.write_text(params.read_text() + "selct: {experts: 8}\n")  # misspelled section: dvc repro fails
    bad = dvc(repo, "repro", "prepare", check=False)
    assert bad.returncode != 0 and "selct: unknown key" in bad.stdout + bad.stderr
