"""End-to-end, as the README's walkthrough goes: a real `git clone` of this repository with the smoke params, then
`make demo`, `make screen`, `make sweep`, `make compare` and a served, triggered Prefect deployment, each run as a
user types it (PATH without the venv: make puts .venv/bin first itself); in between, DVC's caching, the screen
flow and the sweep's checks on the same workspace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
import yaml

from conftest import clone_repo, dvc, stop, wait_for, without_venv

pytestmark = pytest.mark.slow


EVAL_STAGES = {"eval_tasks", "evaluate@teacher", "evaluate@student", "evaluate@distilled", "report"}
ALL_STAGES = {"prepare", "teacher", "calibrate", "score", "select", "group", "assemble", "teacher_logits", "distill",
              *EVAL_STAGES, "screen"}


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


def make(repo, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """`make ARGS` in `repo` as a user runs it: no activated venv on PATH (the Makefile puts .venv/bin first)."""
    proc = subprocess.run(["make", *args], cwd=repo, env=without_venv(env or os.environ), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"make {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory, smoke_params):
    """The journey's first two steps on a fresh clone: `make demo`, then `make screen`."""
    repo = clone_repo(tmp_path_factory.mktemp("journey") / "moe2dense", smoke_params)
    demo = make(repo, "demo")
    assert ran(demo) == ALL_STAGES - {"screen"} | {"check"}, demo.stdout
    assert "heldout_kl_after" in demo.stdout  # `python -m moe2dense summary`
    # the run rewrote the shipped example results (another params file here; another machine's last digits in
    # real life): the next README step must not trip over them (the sweep's baseline, below)
    assert {"dvc.lock", "metrics/eval.json"} <= {line[3:] for line in git(repo, "status", "--porcelain").splitlines()}
    screen = make(repo, "screen")
    assert ran(screen) == {"screen"} and "# Design-space screen: 4 configurations" in screen.stdout, screen.stdout
    return repo


def test_outputs_exist_and_teacher_metrics_are_numbers(repo):
    for split in ("train", "calibration", "eval"):
        assert (repo / "data/prepared/packed" / f"{split}.parquet").is_file()
        assert (repo / "data/prepared/text" / f"{split}.parquet").is_file()
    assert (repo / "data/prepared/tokenizer/tokenizer.json").is_file()
    assert (repo / "models/teacher/config.json").is_file() and (repo / "models/teacher/model.safetensors").is_file()
    m = json.loads((repo / "metrics/teacher.json").read_text())
    for key in ("perplexity", "unigram_perplexity", "perplexity_vs_unigram"):
        assert isinstance(m[key], float) and m[key] > 0, key
    assert "train_tokens_per_s" not in m  # wall clock: untracked timings/, never in a DVC-tracked metric
    assert json.loads((repo / "timings/teacher.json").read_text())["train_tokens_per_s"] > 0
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


def test_distillation_lowers_the_heldout_kl_and_exports_a_model(repo):
    from transformers import AutoModelForCausalLM

    m = json.loads((repo / "metrics/distill.json").read_text())
    assert m["steps"] == 12 and m["workers"] == 2 and m["device"] == "cpu" and m["tokens"] == 3072
    # The smoke teacher is too little trained for its pruned student to be far from it (KL ~1e-4), so the drop
    # of the KL is asserted where it is measurable: tests/test_distill.py and the demo (bench/RESULTS.md).
    assert 0 <= m["heldout_kl_before"] < 1 and 0 <= m["heldout_kl_after"] < 1, m
    assert m["best_loss"] <= m["final_loss"] and "tokens_per_s" not in m  # wall clock: timings/, not metrics
    assert json.loads((repo / "timings/distill.json").read_text())["tokens_per_s"] > 0
    lines = (repo / "plots/distill_loss.csv").read_text().splitlines()
    assert lines[0] == "step,tokens,loss" and len(lines) == 13
    model = AutoModelForCausalLM.from_pretrained(repo / "models/distilled")
    assert model.config.model_type == "qwen3"
    assert json.loads((repo / "teacher_logits/cache.json").read_text())["cached"] is False


def test_evaluation_and_report_cover_all_three_models(repo):
    merged = json.loads((repo / "metrics/eval.json").read_text())
    assert set(merged) == {"teacher", "student", "distilled"}
    tasks = json.loads((repo / "eval_tasks/tasks.json").read_text())["tasks"]
    held_out = json.loads((repo / "metrics/prepare.json").read_text())["splits"]["eval"]["domains"]
    # One perplexity task per held-out domain, and the continuation task (its distractors come from the item's own
    # document, so the smoke split's one document per domain is enough).
    assert set(tasks) == {f"demo_ppl_{d}" for d in held_out} | {"demo_continuation"}
    assert all(v["docs"] == 1 for v in held_out.values())
    for model, result in merged.items():
        assert result["size"]["parameters"] > 0 and result["path"] == f"models/{model}"
        for task in tasks:
            assert result[task]["samples"] > 0, (model, task)
        assert all(result[t]["bits_per_byte"] > 0 for t in tasks if t.startswith("demo_ppl_"))
    assert merged["student"]["size"]["parameters"] < merged["teacher"]["size"]["parameters"]
    summary = (repo / "reports/summary.md").read_text()
    assert "| task | metric | teacher | student | distilled | distillation recovers |" in summary
    assert "![eval](eval.png)" in summary and (repo / "reports/eval.png").read_bytes()[:4] == b"\x89PNG"
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert "metrics/eval.json" in json.dumps(shown)
    assert (repo / "plots/eval_accuracy.csv").read_text().startswith("label,model,value")
    assert not list(repo.rglob("*.tmp"))


def test_screen_scores_configurations_and_caches_each_by_content(repo, tmp_path):
    from transformers import AutoModelForCausalLM

    from moe2dense.heldout import perplexity as heldout_perplexity
    from moe2dense.screen import configurations, inputs_digest, load_inputs, run_screen

    from moe2dense.params import load_params

    inp = load_inputs(repo, eval_tokens=1024, batch_rows=8, methods=["do_acp", "sf"],
                      score_params=load_params(repo / "params.yaml").score)
    digest = inputs_digest(repo, inp)
    grid = configurations(["do_acp", "sf"], ["output", "coactivation"], ["uniform"], [4], k=4)
    assert [c.name for c in grid] == ["do_acp-K4-none-uniform", "sf-K4-none-uniform"]  # K == k: grouping once
    first, computed = run_screen(grid, inp, tmp_path / "cache", digest, progress=False)
    assert computed == [c.name for c in grid]
    # do_acp, K = k, uniform is exactly the pipeline's own student: same perplexity
    student = AutoModelForCausalLM.from_pretrained(repo / "models/student").eval()
    assert first[0]["perplexity"] == pytest.approx(heldout_perplexity(student, inp.rows), rel=1e-6)
    assert first[0]["num_parameters"] == json.loads((repo / "metrics/assemble.json").read_text())["num_parameters"]
    # one more K value: only its configurations are computed, the others come from the cache
    grid8 = configurations(["do_acp", "sf"], ["output", "coactivation"], ["uniform"], [4, 8], k=4)
    assert len(grid8) == 2 + 2 * 2
    second, computed = run_screen(grid8, inp, tmp_path / "cache", digest, progress=False)
    assert sorted(computed) == sorted(c.name for c in grid8 if c.experts == 8)
    assert [r for r in second if r["experts"] == 4] == first
    assert all(r["perplexity"] > 1 for r in second)


def test_make_baselines_compares_at_matched_parameters(repo):
    """`make baselines` after `make demo`: the dense teacher, pruning, the random baselines, their distillation and
    evaluation, and the comparison, run as the README says; nothing of `make demo` reruns."""
    from moe2dense.baselines.runs import EVAL_MODELS, RUNS

    out = make(repo, "baselines", timeout=1200)
    assert ran(out) == {"dense_teacher", "prune", "reinit@random_ffn", "reinit@random_init",
                        *(f"distill_baseline@{b}" for b in RUNS), *(f"evaluate_baseline@{m}" for m in EVAL_MODELS),
                        "baselines"}, out.stdout
    assert "# Baselines at matched parameters" in out.stdout  # the Makefile prints the report's head
    b = json.loads((repo / "metrics/baselines.json").read_text())
    student = json.loads((repo / "metrics/assemble.json").read_text())["num_parameters"]
    assert b["m2d"]["parameters"] == student == b["random_ffn"]["parameters"] == b["random_init"]["parameters"]
    assert abs(b["d2d"]["parameters"] - student) / student <= 0.01
    dense, moe = b["teachers"]["dense"]["parameters"], b["teachers"]["moe"]["parameters"]
    assert abs(dense - moe) / moe <= 0.05 and b["teachers"]["dense"]["perplexity"] > 0
    tokens = b["m2d"]["tokens"]
    for name in ("m2d", *RUNS):
        row = b[name]
        assert row["tokens"] == tokens and row["seconds"] > 0 and row["tokens_per_s"] > 0, name
        assert row["teacher_forward_tokens_per_s"] > 0, name
        # the baselines start far from their teachers; the smoke M2D student starts close (its KL may not move)
        assert name == "m2d" or row["heldout_kl_after"] < row["heldout_kl_before"], name
        assert row["eval"].keys() == row["eval_before"].keys() == b["m2d"]["eval"].keys(), name
    assert b["d2d"]["teacher"] == "models/dense_teacher" and b["random_ffn"]["teacher"] == "models/teacher"
    assert set(b["cost_m2d_over_d2d"]) == {"seconds", "teacher_forward_seconds_per_token"}
    report = (repo / "reports/baselines.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert rows[1:5] == ["M2D (this pipeline's student)", "d2d (pruned dense teacher)",
                         "random_ffn (teacher attention)", "random_init"], report
    assert (repo / "plots/baselines_curves.png").read_bytes()[:4] == b"\x89PNG"
    pruned = json.loads((repo / "models/baseline_d2d/config.json").read_text())
    assert pruned["model_type"] == "qwen3" and (repo / "models/baseline_d2d/README.md").is_file()
    # that a second run reruns nothing: test_repro_is_cached_..., whose `dvc repro` covers these stages too


def test_repro_is_cached_and_reruns_only_what_a_param_touches(repo):
    again = dvc(repo, "repro")
    assert ran(again) == set(), again.stdout
    # Targets up to `assemble` keep the suite fast; distillation reruns inside DVC experiments in the sweep test.
    set_param(repo, "select.experts", 6)  # downstream-only change: calibration and scores are reused
    second = dvc(repo, "repro", "evaluate@teacher", "evaluate@student")
    # the new student is evaluated; the teacher's evaluation is unchanged and not rerun
    assert ran(second) == {"check", "select", "group", "assemble", "evaluate@student"}, second.stdout
    set_param(repo, "group.method", "coactivation")  # K = 6 > k = 4: grouping matters, selection is reused
    third = dvc(repo, "repro", "assemble")
    assert ran(third) == {"check", "group", "assemble"}, third.stdout  # same passes: no recalibration
    plan = json.loads((repo / "grouping/plan.json").read_text())
    assert plan["group_method"] == "coactivation" and plan["blocks_per_layer"] == 4
    assert sorted(e for g in plan["layers"]["0"]["groups"] for e in g["experts"]) == \
        sorted(json.loads((repo / "selection/selection.json").read_text())["layers"]["0"]["experts"])
    # Back to the first run's params: DVC's run cache restores every output without running a stage.
    for key, value in (("select.experts", 4), ("group.method", "output")):
        set_param(repo, key, value)
    restored = dvc(repo, "repro")  # only `check` reruns (the file's bytes are new); its outputs are unchanged
    assert ran(restored) == {"check"}, restored.stdout


def read_artifact(key: str) -> dict:
    """Latest artifact by key through Prefect's own Python client (its requests carry explicit nulls, which the
    server rejected with 422 under the former fastapi pin)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact {key!r}"
    return found[0].model_dump(mode="json")


def test_prefect_screen_flow_publishes_the_best_configurations(repo, prefect_harness):
    from flows.screen import screen

    rows = screen(repo=str(repo))  # the smoke params' grid: do_acp, sf x output x uniform x K in {4, 8}
    assert [r["config"] for r in rows] == sorted((r["config"] for r in rows),
                                                 key=lambda c: next(x["perplexity"] for x in rows if x["config"] == c))
    assert sorted(r["config"] for r in rows) == ["do_acp-K4-none-uniform", "do_acp-K8-output-uniform",
                                                 "sf-K4-none-uniform", "sf-K8-output-uniform"]
    metrics = json.loads((repo / "metrics/screen.json").read_text())
    assert metrics["configurations"] == 4 and metrics["best_config"] == rows[0]["config"]
    assert (repo / "plots/screen_perplexity_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    table = read_artifact("moe2dense-screen-best")
    assert table["type"] == "table" and "do_acp-K4-none-uniform" in table["data"]
    assert "Best per scoring method and K" in read_artifact("moe2dense-screen")["data"]
    assert "| screen | skipped |" in read_artifact("moe2dense-pipeline")["data"]  # DVC: up to date

    cached = {p: p.stat().st_mtime_ns for p in (repo / ".screen_cache").iterdir()}
    assert len(cached) == 4
    set_param(repo, "screen.scalings", ["uniform", "score"])  # the grid grows: only the new half is computed
    grown = screen(repo=str(repo))
    assert len(grown) == 8 and len(list((repo / ".screen_cache").iterdir())) == 8
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # the first four were read, not recomputed
    # the pipeline flow underneath: one task per stage in DAG order, only the changed stage ran, headline metrics
    md = read_artifact("moe2dense-pipeline")["data"]
    stage_table = md.split("\n## ", 1)[0]  # the stage table; headline metrics follow (a "teacher" key among them)
    lines = [line for line in stage_table.splitlines()
             if line.startswith("| ") and line.split("|")[1].strip() in ALL_STAGES]
    assert [line.split("|")[1].strip() for line in lines] == ["prepare", "teacher", "calibrate", "score", "screen"]
    assert [line.split("|")[2].strip() for line in lines] == ["skipped"] * 4 + ["ran"]
    assert "## metrics/teacher.json" in md and "perplexity" in md
    assert float(read_artifact("moe2dense-pipeline-progress")["data"]) == 100.0
    set_param(repo, "screen.scalings", ["uniform"])
    assert screen(repo=str(repo)) == rows  # DVC's run cache restores the first grid's outputs
    # Repo.reproduce returned it: `ran`, though DVC restored its outputs from its run cache instead of running it
    assert "| screen | ran |" in read_artifact("moe2dense-pipeline")["data"]


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def sweep_cli(repo, capsys, *args: str) -> tuple[int, str]:
    """`python -m flows.sweep --repo REPO ARGS` in this process (its checks run before Prefect starts)."""
    from flows.sweep import main

    code = main(["--repo", str(repo), *args])
    return code, capsys.readouterr().err


def test_journey_sweep_compare_and_a_scheduled_run(repo, prefect_harness, prefect_server, capsys):
    """After `make demo` and `make screen` (the fixture): the sweep's checks, `make sweep`, `make compare`, then
    `python -m flows.serve` and `prefect deployment run`, as the README writes them."""
    import polars as pl

    from moe2dense import sweep as sw
    from moe2dense.sweep import exp_rows, exp_show

    # bad input fails before anything is queued, each naming what is wrong
    code, err = sweep_cli(repo, capsys, "--set", "score.method=nope,sf")
    assert code == 2 and "nope (score.method=nope)" in err and "'do_acp'" in err and "sf (" not in err, err
    code, err = sweep_cli(repo, capsys, "--set", "select.experts=8,64")
    assert code == 2 and "K64" in err and "4 <= select.experts <= 32" in err, err
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "# edited\n")
    code, err = sweep_cli(repo, capsys, "--from-screen", "2")
    assert code == 2 and "uncommitted changes" in err and "params.yaml" in err, err
    git(repo, "checkout", "params.yaml")
    assert "Queued" not in dvc(repo, "queue", "status").stdout and not list((repo / ".dvc/tmp").glob("exps/run/*"))
    shipped = git(repo, "rev-parse", "--short=7", "HEAD").strip()

    # `make sweep`: the user's own demo results become the baseline, on a branch of their own
    api, env = prefect_server  # a user who started `prefect server start` and exported PREFECT_API_URL
    # BEST=1: one full experiment is the journey; a queue of several is test_sweep's (tiny stages, seconds)
    out = make(repo, "sweep", "BEST=1", timeout=1200, env=env).stdout  # JOBS=1: the default
    branch = f"moe2dense-baseline-{shipped}"
    assert f"committed on the new branch {branch}" in out, out[-3000:]
    assert git(repo, "branch", "--show-current").strip() == branch
    assert git(repo, "show", "main:metrics/eval.json") != (repo / "metrics/eval.json").read_text()  # main as shipped
    best = pl.read_parquet(repo / "screen/results.parquet").head(1).to_dicts()
    names = ["-".join([b["method"], f"K{b['experts']}"] + [b["grouping"]] * (b["grouping"] != "none")
                      + [b["scaling"]]) for b in best]
    report = (repo / "reports/experiments.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")][1:]
    assert rows == [branch, *names], report  # the baseline first
    shown = {r["name"]: r for r in exp_rows(exp_show(repo)) if not r["baseline"]}
    assert set(shown) == set(names) and all(r["state"] == "success" for r in shown.values())
    for name, b in zip(names, best):
        assert shown[name]["params"]["select.experts"] == b["experts"]
        assert "heldout_kl_after" in json.dumps(shown[name]["metrics"])
    table = read_artifact("moe2dense-sweep")
    assert table["type"] == "table" and all(n in table["data"] for n in names)
    assert git(repo, "status", "--porcelain") == ""  # the workspace is untouched: experiments ran in temp copies
    assert sw.queue(repo, sw.experiments(sw.from_screen(repo / "screen/results.parquet", 1))) == []  # resumable

    # `make compare`: the shipped results against yours; an experiment promoted to a branch joins the table
    dvc(repo, "exp", "branch", names[0], "best-config")
    out = make(repo, "compare").stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| name | rev |") and "KL after" in rows[0], out
    assert {r.split("|")[1].strip() for r in rows[1:]} == {"main", branch, "best-config"}, out
    assert (repo / "reports/compare.md").read_text().strip() in out

    # `python -m flows.serve` (terminal 2 of the README) and a triggered run of the nightly pipeline
    serve_log = repo.parent / "serve.log"
    with open(serve_log, "w") as log:
        serve = subprocess.Popen([".venv/bin/python", "-m", "flows.serve"], cwd=repo, env=without_venv(env),
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            def trigger():
                cli = subprocess.run([".venv/bin/prefect", "deployment", "run", "moe2dense-pipeline/nightly"],
                                     cwd=repo, env=without_venv(env), capture_output=True, text=True, timeout=120)
                found = re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout)
                return found.group(1) if cli.returncode == 0 and found else None

            run_id = wait_for("a triggered run of moe2dense-pipeline/nightly", trigger, 90, serve, interval=2)
            import httpx

            def finished():
                state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
                return state if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED"} else None

            assert wait_for("the flow run", finished, 300, serve, interval=2)["type"] == "COMPLETED"
        except AssertionError:
            log.flush()
            print(serve_log.read_text()[-4000:])
            raise
        finally:
            stop(serve, signal.SIGINT)
    md = read_artifact("moe2dense-pipeline")["data"]
    assert "| report | skipped |" in md and "| distill | skipped |" in md, md  # everything up to date
