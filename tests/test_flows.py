"""The flow command lines the way a scheduler starts them: `.venv/bin/python -m flows.x` from another directory with a
PATH that does not hold the venv (cron, systemd), against the session's Prefect server; their errors in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_pipeline_repo, free_port, without_venv

pytestmark = pytest.mark.slow


def flow_cli(module: str, *args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_flow_runs_stages_with_its_interpreter_without_the_venv_on_path(prefect_server, smoke_params, tmp_path):
    _, server_env = prefect_server
    repo = copy_pipeline_repo(tmp_path / "repo", smoke_params)
    env = {**without_venv(server_env), "PREFECT_LOGGING_LEVEL": "INFO"}
    found = shutil.which("python", path=env["PATH"])
    assert found is None or Path(found).parent != Path(sys.executable).parent  # `python` is not this venv's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # a params error: refused before Prefect or DVC starts, every problem named
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["seq_len"] = "long"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = flow_cli("flows.pipeline", "--repo", str(repo), "--stage", "prepare", env=env, cwd=elsewhere)
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "prepare.seq_len" in bad.stderr, out
    assert "Traceback" not in out and "Beginning flow run" not in out and "Running stage" not in out, out

    # good params: the stage runs with the flow's interpreter although `python` on PATH is another one
    shutil.copy2(smoke_params, repo / "params.yaml")
    good = flow_cli("flows.pipeline", "--repo", str(repo), "--stage", "prepare", env=env, cwd=elsewhere)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^\s*prepare: ran", good.stdout, re.M), good.stdout
    assert (repo / "data/prepared/packed/train.parquet").is_file()


FAILING_STAGES = {  # what stages/_runner.py does with a user's mistake (one line, exit 2), and a crash
    "rejects": "python -c \"import sys; print('[rejects] error: data/x.txt: not found; run prepare first', "
               "file=sys.stderr); sys.exit(2)\"",
    "crashes": "python -c \"raise RuntimeError('out of cheese')\"",
}


def toy_repo(dest: Path, stages: dict[str, dict]) -> Path:
    """A git + DVC repo with these stages in dvc.yaml (in the order given) and no params."""
    dest.mkdir()
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    return dest


def no_dvc_locks(repo: Path) -> bool:
    """Neither DVC's repo lock nor a stage's read/write lock is held (a failed stage left none behind)."""
    from dvc.repo import Repo

    rwlock = repo / ".dvc/tmp/rwlock"
    locks = json.loads(rwlock.read_text()) if rwlock.is_file() else {}
    with Repo(str(repo)) as dvc_repo, dvc_repo.lock:  # raises LockError when another process holds it
        return not any(locks.values())


def test_a_failing_stage_is_one_error_with_its_own_message(prefect_server, smoke_params, tmp_path):
    """Exit 2 (the stage's verdict on its input): not retried, CLI exit 2; a crash: retried once, CLI exit 1. Their
    upstream stage `source` runs first, as DVC's own: then skipped, up to date (DVC's answer, not its log)."""
    source = {"cmd": "python -c \"open('source.txt', 'w').write('x')\"", "outs": ["source.txt"]}
    repo = toy_repo(tmp_path / "repo", {n: {"cmd": c, "deps": ["source.txt"]} for n, c in FAILING_STAGES.items()}
                    | {"source": source})
    shutil.copy2(smoke_params, repo / "params.yaml")  # valid: the pre-flight check passes
    env = {**prefect_server[1], "PREFECT_LOGGING_LEVEL": "INFO"}
    for stage, code, runs, message, source_status in (
            ("rejects", 2, 1, "[rejects] error: data/x.txt: not found; run prepare first", "ran"),
            ("crashes", 1, 2, "RuntimeError: out of cheese", "skipped")):
        proc = flow_cli("flows.pipeline", "--repo", str(repo), "--stage", stage, env=env, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == code, out
        assert proc.stderr.strip().splitlines()[-1] == f"error: stage {stage!r} failed (exit {code}): {message}", out
        assert out.count(f"Running stage '{stage}'") == runs, out  # relayed DVC output, once per attempt
        assert f"stage source {source_status} in " in out and out.index("stage source ") < out.index(stage), out
        # no tracebacks but the crashing stage's own (its output, relayed per attempt)
        assert out.count("Traceback (most recent call last)") == (runs if code == 1 else 0), out
        assert "prefect/flow_engine.py" not in out and "prefect/task_engine.py" not in out, out
        assert no_dvc_locks(repo)


def test_stage_order_and_what_ran_come_from_dvc(tmp_path):
    """The flow's stage order is the order `dvc repro` runs them in; whether a stage ran is what `Repo.reproduce`
    returned; a failing stage's result carries its exit status, and its stderr is its own (DVC logs to stdout)."""
    from flows.dvc_stage import stage_order

    write = "python -c \"import sys; open(sys.argv[1], 'w').write(sys.argv[1])\" "
    # a diamond, listed in dvc.yaml bottom-up, and a stage outside it
    repo = toy_repo(tmp_path / "repo", {
        "d": {"cmd": write + "d.txt", "deps": ["b.txt", "c.txt"], "outs": ["d.txt"]},
        "c": {"cmd": write + "c.txt", "deps": ["a.txt"], "outs": ["c.txt"]},
        "b": {"cmd": write + "b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "a": {"cmd": write + "a.txt", "outs": ["a.txt"]},
        "fails": {"cmd": "python -c \"import sys; print('[fails] error: no'); sys.exit(2)\" 1>&2", "deps": ["a.txt"]},
    })
    order = stage_order(repo, "d")
    assert stage_order(repo) == order + ["fails"]
    with pytest.raises(ValueError, match=r"unknown stage 'e'; stages in dvc.yaml: d, c, b, a, fails"):
        stage_order(repo, "e")

    def reproduce(stage: str, *force: str) -> tuple[dict, subprocess.CompletedProcess]:
        result = tmp_path / "result.json"
        proc = subprocess.run([sys.executable, "-m", "flows.dvc_stage", str(repo), stage, str(result), *force],
                              cwd=tmp_path, capture_output=True, text=True, check=True)  # from another cwd
        return json.loads(result.read_text()), proc

    assert reproduce("a")[0] == {"ran": ["a"]} and (repo / "a.txt").is_file()
    assert reproduce("a")[0] == {"ran": []}  # up to date
    assert reproduce("a", "--force")[0] == {"ran": ["a"]}
    result, proc = reproduce("fails")
    assert result["status"] == 2 and "failed to reproduce 'fails'" in result["error"], result
    assert proc.stderr == "[fails] error: no\n" and "Running stage 'fails'" in proc.stdout, proc
    assert no_dvc_locks(repo)
    # DVC's CLI goes through the stages in that order: `a` up to date, then the others run
    cli = subprocess.run([sys.executable, "-m", "dvc", "repro", "d"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    assert re.findall(r"^(?:Running stage|Stage) '([^']+)'", cli, re.M) == order == ["a", "b", "c", "d"], cli
    assert "Stage 'a' didn't change" in cli


def test_flow_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    # unknown stage: the stages of dvc.yaml listed, before Prefect starts
    proc = flow_cli("flows.pipeline", "--repo", str(REPO), "--stage", "nosuch", env=env, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unknown stage 'nosuch'" in lines[0] and "prepare" in lines[0] and "report" in lines[0]
    # an unreachable PREFECT_API_URL: named, after a bounded wait, instead of Prefect's retries and traceback
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    start = time.monotonic()
    proc = flow_cli("flows.screen", "--repo", str(REPO), env={**env, "PREFECT_API_URL": api}, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "PREFECT_API_URL" in lines[0] and f"{api}/health" in lines[0] and "prefect server start" in lines[0]
    assert time.monotonic() - start < 30
    # not a DVC repository
    proc = flow_cli("flows.pipeline", "--repo", str(tmp_path), env=env, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(tmp_path) in proc.stderr and "DVC" in proc.stderr
