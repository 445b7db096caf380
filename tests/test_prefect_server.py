"""`flows/serve.py` against a real `prefect server start` on loopback, started as a scheduler would (another directory,
no venv on PATH): the deployments are registered with their cron schedules, a run triggered with the README's
`prefect deployment run` completes (its stages ran with the serve process's interpreter) and publishes its artifacts,
and the README's `prefect` CLI commands answer; no server: a clear error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port, stop, wait_for, without_venv

pytestmark = pytest.mark.slow

CRON = "0 3 * * *"
PREFECT = Path(sys.executable).parent / "prefect"
DVC_YAML = """\
stages:
  make:  # which Python DVC found on PATH for `python`
    cmd: python -c "import sys; open('a.txt', 'w').write(sys.prefix)"
    outs: [a.txt]
  copy:
    cmd: python -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
    deps: [a.txt]
    outs: [b.txt]
"""


def tiny_repo(dest: Path) -> Path:
    """A git + DVC repo with two trivial stages (make -> copy)."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    dest.mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    (dest / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny"], cwd=dest, check=True)
    return dest


def prefect_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PREFECT), *args], env=env, capture_output=True, text=True, timeout=120)


def test_served_deployment_runs_and_publishes_artifacts(prefect_server, tmp_path):
    api, env = prefect_server
    repo = tiny_repo(tmp_path / "repo")
    serve_log = tmp_path.parent / f"{tmp_path.name}-serve.log"
    with open(serve_log, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo), "--cron", CRON,
                                 "--stage", "copy"],  # the tiny repo's last stage (default: report)
                                cwd=tmp_path, env=without_venv(env), stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=api, timeout=30) as client:
                def deployment():  # registered by this serve process (the session's server may hold an earlier one)
                    found = client.post("/deployments/filter",
                                        json={"deployments": {"name": {"any_": ["nightly"]}}}).json()
                    return next((d for d in found if d["parameters"].get("repo") == str(repo.resolve())), None)

                dep = wait_for("the deployment", deployment, 60, proc)
                assert [s["schedule"]["cron"] for s in dep["schedules"]] == [CRON]
                assert dep["parameters"]["repo"] == str(repo.resolve())
                flow = client.get(f"/flows/{dep['flow_id']}").json()
                assert f"{flow['name']}/{dep['name']}" == "moe2dense-pipeline/nightly"
                assert dep["parameters"]["stage"] == "copy"

                def all_served():  # the three deployments of flows.serve, with their crons
                    out = {}
                    for d in client.post("/deployments/filter", json={}).json():
                        flow_name = client.get(f"/flows/{d['flow_id']}").json()["name"]
                        out[f"{flow_name}/{d['name']}"] = [s["schedule"]["cron"] for s in d["schedules"]]
                    return out if len(out) == 3 else None

                served = wait_for("all deployments", all_served, 30, proc)
                assert served == {"moe2dense-pipeline/nightly": [CRON], "moe2dense-screen/weekly": ["0 4 * * 0"],
                                  "moe2dense-sweep/weekly": ["0 6 * * 0"]}, served

                def trigger(*args: str):  # the README's command; retried while SQLite is locked (503)
                    cli = prefect_cli(env, "deployment", "run", *args)
                    assert cli.returncode == 0 or "503" in cli.stdout + cli.stderr, cli.stdout + cli.stderr
                    found = re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout)
                    return found.group(1) if cli.returncode == 0 and found else None

                run_id = wait_for("a triggered flow run", lambda: trigger("moe2dense-pipeline/nightly"), 60, proc,
                                  interval=1)
                # parameters per run; started in an hour, so this test's serve process never executes it
                sweep_id = wait_for("a sweep run", lambda: trigger("moe2dense-sweep/weekly", "-p", "from_screen=5",
                                                                   "-p", "jobs=2", "--start-in", "1 hour"), 60, proc)
                sweep_run = client.get(f"/flow_runs/{sweep_id}").json()
                assert sweep_run["parameters"]["from_screen"] == 5 and sweep_run["parameters"]["jobs"] == 2
                assert sweep_run["state"]["type"] == "SCHEDULED"

                def finished():
                    state = client.get(f"/flow_runs/{run_id}").json()["state"]
                    return state if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} \
                        else None

                state = wait_for("the flow run", finished, 120, proc, interval=1)
                assert state["type"] == "COMPLETED", state

                arts = client.post("/artifacts/filter",
                                   json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
                by_type = {a["type"]: a for a in arts}
                assert by_type["markdown"]["key"] == "moe2dense-pipeline"
                assert "| make | ran |" in by_type["markdown"]["data"]
                assert "| copy | ran |" in by_type["markdown"]["data"]
                assert float(by_type["progress"]["data"]) == 100.0
            # the stages ran with the serve process's interpreter, not the `python` its PATH would find
            assert (repo / "b.txt").read_text() == sys.prefix * 2

            # the CLI's listings (422 from prefect 3.8.8's client against fastapi 0.154)
            listings = {("deployment", "ls"): ["moe2dense-pipeline/nightly", "moe2dense-sweep/weekly"],
                        ("flow", "ls"): ["moe2dense-pipeline"], ("flow-run", "ls"): ["COMPLETED", "SCHEDULED"],
                        ("artifact", "ls"): ["moe2dense-pipeline", "moe2dense-pipeline-progress"]}
            for args, expected in listings.items():
                cli = prefect_cli({**env, "COLUMNS": "250"}, *args)
                assert cli.returncode == 0 and all(e in cli.stdout for e in expected), (args, cli.stdout, cli.stderr)
        except AssertionError:
            log.flush()
            print(serve_log.read_text()[-4000:])
            raise
        finally:
            stop(proc, signal.SIGINT)  # Ctrl-C: the runner's clean shutdown (SIGTERM logs tracebacks)


def test_unreachable_server_is_a_clear_error(tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.serve", "--repo", str(repo)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{api}/health" in lines[0] and "prefect server start" in lines[0] and "PREFECT_API_URL" in lines[0]
    # nothing registered, nothing run: the repo is as it was
    assert sorted(p.name for p in repo.iterdir()) == ["dvc.yaml"] and (repo / "dvc.yaml").read_text() == DVC_YAML
