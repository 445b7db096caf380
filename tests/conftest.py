"""Shared fixtures. Everything runs offline with telemetry off; Prefect state lives in a temp PREFECT_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `stages` and `flows` are run from the repo root, not installed

_PREFECT_HOME = tempfile.mkdtemp(prefix="moe2dense-prefect-")
for var, val in {
    "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ[var] = val
os.environ.pop("PREFECT_API_URL", None)
# Stage commands in dvc.yaml call `python`: make it this interpreter.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

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


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_params() -> Path:
    return REPO / "tests" / "smoke_params.yaml"


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server per pytest run (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory, smoke_params) -> Path:
    """The smoke pipeline reproduced once per session, for tests that only read its outputs."""
    repo = copy_pipeline_repo(tmp_path_factory.mktemp("smoke_repo"), smoke_params)
    dvc(repo, "repro")
    return repo
