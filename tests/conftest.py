"""Shared fixtures. Everything runs offline with telemetry off; Prefect state lives in a temp PREFECT_HOME."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `stages` and `flows` are run from the repo root, not installed
from moe2dense.checks import OFFLINE_ENV  # noqa: E402

_PREFECT_HOME = tempfile.mkdtemp(prefix="moe2dense-prefect-")
for var, val in {**OFFLINE_ENV, "PREFECT_HOME": _PREFECT_HOME, "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ[var] = val
os.environ.pop("PREFECT_API_URL", None)
# No PATH set-up here: the code under test must make stage commands (`python -m stages.x`) run with this interpreter
# itself (moe2dense.env), as it must when cron or a Prefect deployment starts it without an activated venv.

PIPELINE_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "stages", "moe2dense",
                  "flows")


def copy_pipeline_repo(dest: Path, params: Path | None = None) -> Path:
    """A fresh git repo holding the pipeline (code + dvc.yaml) with `params` as its params.yaml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copy2(params or REPO / "params.yaml", dest / "params.yaml")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "pipeline"], cwd=dest, check=True)
    return dest


def clone_repo(dest: Path, params: Path) -> Path:
    """A real `git clone` of this repository at `dest` (this checkout's uncommitted changes to tracked files and
    its untracked files applied on top, so it tests the code at hand), with `params` committed as its params.yaml,
    and this interpreter's venv as its .venv, marked installed so `make` does not reinstall it."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=dest, input=diff, check=True)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, untracked):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    shutil.copy2(params, dest / "params.yaml")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "the shipped state: code, smoke params, example results"], cwd=dest,
                   check=True)
    venv = Path(sys.prefix)
    (dest / ".venv").symlink_to(venv, target_is_directory=True)
    (venv / ".installed").touch()  # newer than the clone's pyproject.toml: `make` sees the venv as installed
    return dest


def without_venv(env: dict[str, str]) -> dict[str, str]:
    """`env` with this interpreter's directory taken off PATH: a shell, cron or systemd that never activated it."""
    bindir = str(Path(sys.executable).parent)
    return {**env, "PATH": os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir)}


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` the way a user in the activated venv runs it: stage commands find this interpreter on PATH."""
    from moe2dense.env import stage_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=stage_env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_params() -> Path:
    return REPO / "tests" / "smoke_params.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def prefect_server():
    """One real `prefect server start` on a free loopback port with its own PREFECT_HOME per pytest run (starting
    one costs 20-40 s on 2 cores); yields (api_url, env for subprocesses that should use it)."""
    home = tempfile.mkdtemp(prefix="moe2dense-prefect-server-")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    log = open(Path(home) / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the Prefect server", healthy, 90, proc)
        yield api, {**env, "PREFECT_API_URL": api}
    except AssertionError:
        log.flush()
        print((Path(home) / "server.log").read_text()[-3000:])
        raise
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="session")
def prefect_harness(prefect_server):
    """Flows run in this process report to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server[0]}):
        yield
