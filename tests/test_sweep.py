"""Sweep building blocks against hand-written values: axes and grids, names, the screen's best as overrides, the
checks before queuing, and `dvc exp show`'s experiment states (DVC's API) as a comparison table. The queued sweep
itself runs in test_pipeline.py on the smoke pipeline."""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import without_venv
from moe2dense import sweep as sw


def exp_state(rev: str, name: str, params: dict | None, metrics: dict | None = None, experiments=None):
    """What `Repo.experiments.show` returns (DVC 3's ExpState), as DVC builds it from params.yaml and metrics/."""
    from dvc.repo.experiments.serialize import ExpState, SerializableExp

    data = None if params is None else SerializableExp(
        rev=rev, params={"params.yaml": {"data": params}},
        metrics={path: {"data": values} for path, values in (metrics or {}).items()})
    return ExpState(rev=rev, name=name, data=data, experiments=experiments)


def exp_show_states() -> list:
    from dvc.repo.experiments.serialize import ExpExecutor, ExpRange

    return [exp_state("a" * 40, "main", {"select": {"experts": 4}, "score": {"method": "do_acp"},
                                         "distill": {"lr": 0.001}},
                      {"metrics/distill.json": {"heldout_kl_after": 0.04, "steps": 97},
                       "metrics/eval.json": {"distilled": {"demo_ppl_bible": {"bits_per_byte": 1.78,
                                                                              "word_perplexity": 654.9}}}},
                      experiments=[
        ExpRange(name="acp-K8", revs=[exp_state(
            "b" * 40, "acp-K8", {"select": {"experts": 8}, "score": {"method": "acp"}, "distill": {"lr": 0.001}},
            {"metrics/distill.json": {"heldout_kl_after": 0.03, "steps": 97}})]),
        ExpRange(name="sf-K4", executor=ExpExecutor(state="queued"), revs=[exp_state("c" * 40, "sf-K4", None)]),
    ])]


def test_axes_grid_and_names():
    axes = sw.parse_axes(["select.experts=4,8", "group.method=output", "distill.freeze=[embeddings,attention]",
                          "distill.teacher_top_k=null"])
    assert axes == {"select.experts": [4, 8], "group.method": ["output"],
                    "distill.freeze": [["embeddings", "attention"]], "distill.teacher_top_k": [None]}
    assert sw.parse_axes(["distill.lr=1e-3,5e-4"]) == {"distill.lr": [0.001, 0.0005]}  # YAML 1.2 floats, not str
    configs = sw.grid({"select.experts": [4, 8], "group.method": ["output", "weight"]})
    assert configs == [{"select.experts": 4, "group.method": "output"}, {"select.experts": 4, "group.method": "weight"},
                       {"select.experts": 8, "group.method": "output"}, {"select.experts": 8, "group.method": "weight"}]
    assert sw.experiment_name({"score.method": "acp", "select.experts": 8, "group.method": "output",
                               "group.scaling": "uniform"}) == "acp-K8-output-uniform"
    assert sw.experiment_name({"distill.lr": 0.0005, "distill.loss": "jsd"}) == "lr0.0005-lossjsd"
    assert sw.experiment_name({"distill.freeze": ["embeddings"]}) == "freeze_embeddings"
    with pytest.raises(sw.SweepError, match="same experiment name"):
        sw.experiments([{"select.experts": 8}, {"select.experts": 8}])
    for bad in ("select.experts", "=4", "select.experts="):
        with pytest.raises(sw.SweepError, match="key=value"):
            sw.parse_axes([bad])


def test_set_arguments_round_trip_through_dvc_override_grammar():
    from dvc.utils.hydra import to_hydra_overrides

    args = [sw.set_arg(k, v) for k, v in {"select.experts": 8, "distill.lr": 0.0005, "group.method": "output",
                                          "distill.teacher_top_k": None, "group.align": True,
                                          "distill.freeze": ["embeddings", "attention"]}.items()]
    assert args == ["select.experts=8", "distill.lr=0.0005", "group.method=output", "distill.teacher_top_k=null",
                    "group.align=true", 'distill.freeze=["embeddings", "attention"]']
    parsed = {o.key_or_group: o.value() for o in to_hydra_overrides(args)}
    assert parsed == {"select.experts": 8, "distill.lr": 0.0005, "group.method": "output",
                      "distill.teacher_top_k": None, "group.align": True,
                      "distill.freeze": ["embeddings", "attention"]}


def test_screen_best_become_overrides(tmp_path):
    path = tmp_path / "results.parquet"
    pl.DataFrame([
        {"config": "sf-K4-none-uniform", "method": "sf", "experts": 4, "grouping": "none", "scaling": "uniform",
         "perplexity": 300.0},
        {"config": "acp-K8-output-score", "method": "acp", "experts": 8, "grouping": "output", "scaling": "score",
         "perplexity": 280.0},
        {"config": "pp-K8-weight-uniform", "method": "pp", "experts": 8, "grouping": "weight", "scaling": "uniform",
         "perplexity": 390.0},
    ]).write_parquet(path)
    assert sw.from_screen(path, 2) == [  # best first; pure pruning leaves group.method alone
        {"score.method": "acp", "select.experts": 8, "group.method": "output", "group.scaling": "score"},
        {"score.method": "sf", "select.experts": 4, "group.scaling": "uniform"}]
    with pytest.raises(sw.SweepError, match="dvc repro screen"):
        sw.from_screen(tmp_path / "missing.parquet", 2)


def test_validation_names_every_bad_configuration(tmp_path, smoke_params):
    (tmp_path / "params.yaml").write_text(smoke_params.read_text())  # demo teacher: k = 4, E = 32
    good = sw.experiments([{"select.experts": 8, "group.method": "coactivation"}])
    sw.validate(tmp_path, good)
    bad = sw.experiments([{"score.method": "nope"}, {"select.experts": 33}, {"group.k": 6},
                          {"select.experts": 8, "distill.lr": 0.001}, {"selct.experts": 8},
                          {"distill.loss": "jsd", "distill.loss_options": {"beta": 2}},
                          {"distill.teacher_top_k": 64}])
    with pytest.raises(sw.SweepError) as err:
        sw.validate(tmp_path, bad)
    text = str(err.value)
    assert "nothing was queued" in text
    assert "score.method" in text and "'do_acp'" in text
    assert "K33" in text and "4 <= select.experts <= 32" in text
    assert "group.k = 6 must be <= select.experts = 4" in text
    assert "selct: unknown key" in text and "select" in text
    # the stages' pre-flight
    assert "jsd beta: Input should be less than 1 (got 2)" in text and "distill.teacher_top_k = 64" in text
    assert "K8-lr0.001" not in text  # the valid one is not reported
    with pytest.raises(sw.SweepError, match="the sweep is empty"):
        sw.validate(tmp_path, [])


def _dvc_repo_with_results(root: Path) -> None:
    """A git + DVC repo whose stage `report` writes a tracked metric from $MACHINE (not a dep: a run on another
    machine gives other bytes for the same code and params), with machine A's results committed."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"select": {"experts": 4}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": {
        "cmd": "python -c \"import os, json; json.dump({'x': os.environ['MACHINE']}, open('m.json', 'w'))\"",
        "params": ["select.experts"], "metrics": [{"m.json": {"cache": False}}]}}}))
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "report"], cwd=root, check=True,
                   env={**os.environ, "MACHINE": "1"})
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "results of machine A"], cwd=root, check=True)


def _git_out(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_own_finished_run_becomes_the_baseline_and_anything_else_is_refused(tmp_path):
    _dvc_repo_with_results(tmp_path)
    assert sw.pipeline_outputs(tmp_path) == {"dvc.lock", "m.json"}
    assert sw.record_baseline(tmp_path) is None  # clean: nothing to record
    # machine B runs the same pipeline: other bytes in the tracked results, DVC up to date
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "--force", "report"], cwd=tmp_path, check=True,
                   env={**os.environ, "MACHINE": "2"})
    assert sorted(sw.dirty_files(tmp_path)) == [" M dvc.lock", " M m.json"]
    head = _git_out(tmp_path, "rev-parse", "--short", "HEAD")
    branch = sw.record_baseline(tmp_path)
    assert branch == f"moe2dense-baseline-{head}" == _git_out(tmp_path, "branch", "--show-current")
    assert sw.dirty_files(tmp_path) == [] and json.loads((tmp_path / "m.json").read_text()) == {"x": "2"}
    assert _git_out(tmp_path, "show", "main:m.json") == '{"x": "1"}'  # the shipped results stay on main
    assert _git_out(tmp_path, "diff", "--name-only", "main", branch).split() == ["dvc.lock", "m.json"]
    # a second baseline from the same commit gets its own name
    subprocess.run(["git", "switch", "-q", "main"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "--force", "report"], cwd=tmp_path, check=True,
                   env={**os.environ, "MACHINE": "3"})
    assert sw.record_baseline(tmp_path) == f"moe2dense-baseline-{head}-1"
    subprocess.run(["git", "switch", "-q", "main"], cwd=tmp_path, check=True)
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=tmp_path, check=True)

    # the user's own changes are refused, named, and nothing is committed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"select": {"experts": 8}}))
    (tmp_path / "notes.txt").write_text("new")
    with pytest.raises(sw.SweepError) as err:
        sw.record_baseline(tmp_path)
    assert "M params.yaml" in str(err.value) and "?? notes.txt" in str(err.value)
    assert "git stash -u" in str(err.value) and "nothing was queued" in str(err.value)
    assert _git_out(tmp_path, "branch", "--show-current") == "main"
    # results of an unfinished run (params changed since): finish it first
    (tmp_path / "notes.txt").unlink()
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=tmp_path, check=True)
    (tmp_path / "m.json").write_text('{"x": "4"}')
    with pytest.raises(sw.SweepError, match=r"unfinished run \(m.json changed, and report not up to date\)"):
        sw.record_baseline(tmp_path)


def test_one_sweep_at_a_time(tmp_path):
    with sw.sweep_lock(tmp_path):
        with pytest.raises(sw.SweepError, match="another sweep is running"):
            with sw.sweep_lock(tmp_path):
                pass
    with sw.sweep_lock(tmp_path):  # released
        pass


def test_exp_show_states_become_a_comparison_table():
    rows = sw.exp_rows(exp_show_states())
    assert [(r["name"], r["rev"], r["baseline"], r["state"]) for r in rows] == [
        ("main", "aaaaaaa", True, "success"), ("acp-K8", "bbbbbbb", False, "success"),
        ("sf-K4", "ccccccc", False, "queued")]
    assert rows[1]["baseline_rev"] == "aaaaaaa"
    assert rows[0]["metrics"]["eval.distilled.demo_ppl_bible.bits_per_byte"] == 1.78
    records = sw.table(rows[:2], ["select.experts"])
    # params: the swept one, then those that differ; metrics: the headline ones only (not steps, word_perplexity)
    assert records == [
        {"name": "main", "rev": "aaaaaaa", "select.experts": 4, "score.method": "do_acp",
         "distill.heldout_kl_after": 0.04, "eval.distilled.demo_ppl_bible.bits_per_byte": 1.78},
        {"name": "acp-K8", "rev": "bbbbbbb", "select.experts": 8, "score.method": "acp",
         "distill.heldout_kl_after": 0.03, "eval.distilled.demo_ppl_bible.bits_per_byte": None}]
    md = sw.markdown(records, "Sweep")
    assert md.splitlines()[2] == "| name | rev | select.experts | score.method | KL after | distilled bible bpb |"
    assert md.splitlines()[5] == "| acp-K8 | bbbbbbb | 8 | acp | 0.03 | — |"
    assert md.splitlines()[-1].startswith("bpb: held-out bits per byte")
    assert [sw.label(c) for c in ("eval.student.demo_continuation.acc_mutual_info", "eval.teacher.arc_easy.acc",
                                  "assemble.parameter_ratio", "distill.heldout_kl_before", "select.experts")] == [
        "student continuation acc_mi", "teacher arc_easy acc", "params / teacher", "KL before", "select.experts"]


def tiny_params_repo(dest: Path) -> Path:
    """A git + DVC repo with one stage that writes its param `x` and whether DVC's `python` is this interpreter."""
    dest.mkdir()
    (dest / "params.yaml").write_text("x: 1\n")
    cmd = ("python -c \"import json, sys, yaml; x = yaml.safe_load(open('params.yaml'))['x']; "
           f"json.dump({{'x': x, 'this_python': int(sys.prefix == {sys.prefix!r})}}, open('m.json', 'w'))\"")
    stage = {"cmd": cmd, "params": ["x"], "metrics": [{"m.json": {"cache": False}}]}
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"echo": stage}}))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny"], cwd=dest, check=True)
    return dest


@pytest.mark.slow
def test_queue_runs_with_this_interpreter_and_counts_finished_experiments(tmp_path, monkeypatch):
    """DVC's queue workers and the stages in their temp workspaces run with this interpreter although PATH lacks the
    venv (a sweep started by cron or a deployment); progress counts the sweep's finished experiments."""
    repo = tiny_params_repo(tmp_path / "repo")
    monkeypatch.setenv("PATH", without_venv(dict(os.environ))["PATH"])
    monkeypatch.setattr(sw, "PROGRESS_POLL_S", 0.2)
    exps = sw.experiments([{"x": 2}, {"x": 3}])
    assert sw.queue(repo, exps, "echo") == ["x2", "x3"]
    seen: list[tuple[int, str]] = []
    caller = contextvars.ContextVar("caller")
    caller.set("sweep")  # like Prefect's run context and settings: on_done sees the caller's contextvars
    sw.run_queue(repo, 1, names=["x2", "x3"], on_done=lambda n: seen.append((n, caller.get())))
    counts = [n for n, _ in seen]
    assert counts[-1] == 2 and counts == sorted(set(counts)), seen  # each change once, ending at all done
    assert {ctx for _, ctx in seen} == {"sweep"}, seen
    shown = {r["name"]: r["metrics"] for r in sw.exp_rows(sw.exp_show(repo)) if not r["baseline"]}
    assert shown == {"x2": {"m.x": 2, "m.this_python": 1}, "x3": {"m.x": 3, "m.this_python": 1}}


def test_malformed_configs_file_is_one_line_naming_it(tmp_path, capsys):
    from flows.sweep import main

    bad = tmp_path / "sweep.yaml"
    bad.write_text("- {select.experts: 8\n- {distill.loss: jsd}\n")
    assert main(["--repo", str(tmp_path), "--configs", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not valid YAML at line 2"), err
    bad.write_text("select.experts: 8\n")
    assert main(["--repo", str(tmp_path), "--configs", str(bad)]) == 2
    assert "expected a YAML list of mappings" in capsys.readouterr().err


def test_progress_bar_redraws_stay_out_of_the_sweep_log():
    from flows.sweep import PROGRESS_REDRAW

    dropped = ["distill:  42%|████▏     | 84k/199k [00:19<00:26, 4.31ktok/s, loss=0.0612]",
               "Loading weights:   0%|          | 0/46 [00:00<?, ?it/s]", "  7%|▋         | 42/600 [00:00<00:01]"]
    kept = ["distill: 100%|██████████| 199k/199k [00:43<00:00, 4.72ktok/s, loss=0.0451]",
            "Running stage 'report':", "[distill] held-out KL(teacher || assembled student) = 0.3983 over 16384 tokens",
            "[evaluate] distilled demo_ppl_bible: word_perplexity 682.9, bits_per_byte 1.792"]
    assert [bool(PROGRESS_REDRAW.match(line)) for line in dropped + kept] == [True] * 3 + [False] * 4


def test_a_queue_run_that_outlives_its_experiments_is_stopped(tmp_path, monkeypatch):
    """`dvc exp run --run-all` held forever by a queue worker stuck in its shutdown: once every experiment of the
    sweep has finished, it gets QUEUE_EXIT_GRACE_S, then the workers and it are stopped and the sweep goes on."""
    monkeypatch.setattr(sw, "PROGRESS_POLL_S", 0.05)
    monkeypatch.setattr(sw, "QUEUE_EXIT_GRACE_S", 0.3)
    polls = iter([{"old": "a"}, {"old": "a"}] + [{"old": "a", "new": "a"}] * 10_000)  # before; running; done
    monkeypatch.setattr(sw, "finished_experiments", lambda repo: next(polls))
    stopped = []
    monkeypatch.setattr(sw._Progress, "_stop_workers", lambda self: stopped.append(True))
    seen = []
    poller = sw._Progress(tmp_path, {"a"}, seen.append)
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    poller.stop_when_done(hung, 1)
    assert hung.wait(timeout=20) != 0  # terminated, not left to run out
    poller.close()
    assert poller.stopped_idle and stopped == [True] and seen == [1]
