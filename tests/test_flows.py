"""The flow command lines the way a scheduler starts them: `.venv/bin/python -m flows.x` from another directory with a
PATH that does not hold the venv (cron, systemd), against the session's Prefect server; their errors in one line."""

from __future__ import annotations

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

    # a params error: the stage that rejects it (exit 2) is named with its own message, once, without a retry
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["seq_len"] = "long"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = flow_cli("flows.pipeline", "--repo", str(repo), "--stage", "prepare", env=env, cwd=elsewhere)
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2, out
    last = bad.stderr.strip().splitlines()[-1]
    assert re.match(r"^error: stage '(\w+)' failed \(exit 2\): .*seq_len", last), out
    assert "Traceback" not in out and "Retry" not in out, out
    failed = re.match(r"^error: stage '(\w+)'", last).group(1)
    assert len(re.findall(rf"Running stage '{failed}'", out)) == 1, out
    assert not (repo / "data/prepared").exists()

    # good params: the stage runs with the flow's interpreter although `python` on PATH is another one
    shutil.copy2(smoke_params, repo / "params.yaml")
    good = flow_cli("flows.pipeline", "--repo", str(repo), "--stage", "prepare", env=env, cwd=elsewhere)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^\s*prepare: ran", good.stdout, re.M), good.stdout
    assert (repo / "data/prepared/packed/train.parquet").is_file()


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
