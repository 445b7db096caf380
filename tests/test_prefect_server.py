"""`flows/serve.py` against a real `prefect server start` on loopback: the deployment is registered with its cron
schedule, a run triggered through the API completes and publishes its artifacts; no server: a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port, stop, wait_for

pytestmark = pytest.mark.slow

CRON = "0 3 * * *"
DVC_YAML = """\
stages:
  make:
    cmd: python -c "open('a.txt', 'w').write('a')"
    outs: [a.txt]
  copy:
    cmd: python -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
    deps: [a.txt]
    outs: [b.txt]
"""


def tiny_repo(dest: Path) -> Path:
    """A git + DVC repo with two trivial stages (make -> copy)."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    (dest / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny"], cwd=dest, check=True)
    return dest


def test_served_deployment_runs_and_publishes_artifacts(prefect_server, tmp_path):
    api, env = prefect_server
    repo = tiny_repo(tmp_path)
    serve_log = tmp_path.parent / f"{tmp_path.name}-serve.log"
    with open(serve_log, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo), "--cron", CRON,
                                 "--stage", "copy"],  # the tiny repo's last stage (default: report)
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=api, timeout=30) as client:
                def deployment():
                    found = client.post("/deployments/filter",
                                        json={"deployments": {"name": {"any_": ["nightly"]}}}).json()
                    return found[0] if found else None

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

                def trigger():  # 503 while the server's scheduler holds the SQLite lock: retry
                    resp = client.post(f"/deployments/{dep['id']}/create_flow_run", json={})
                    assert resp.status_code in (201, 503), resp.text
                    return resp.json()["id"] if resp.status_code == 201 else None

                run_id = wait_for("a triggered flow run", trigger, 30, proc, interval=1)

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
            assert (repo / "b.txt").read_text() == "aa"
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
