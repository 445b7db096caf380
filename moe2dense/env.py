"""The environment DVC runs stage commands in. dvc.yaml calls `python -m stages.<name>`, which DVC's shell resolves on
PATH; a flow started as `.venv/bin/python -m flows.x` by cron, systemd, a Prefect deployment or a DVC experiment
worker has no activated venv, so PATH would find another Python (or none). With this interpreter's directory first on
PATH, every stage runs with the interpreter and packages that started the flow."""

from __future__ import annotations

import os
import sys
from typing import Mapping


def interpreter_path(path: str | None = None) -> str:
    """`path` (default: $PATH) with the running interpreter's directory first (moved there if already present)."""
    bindir = os.path.dirname(sys.executable)
    rest = (os.environ.get("PATH", "") if path is None else path).split(os.pathsep)
    return os.pathsep.join([bindir] + [p for p in rest if p and p != bindir])


def stage_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) for a subprocess that runs DVC stages."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = interpreter_path(env.get("PATH", ""))
    return env
