"""Prefect flows over the DVC pipeline. Importing the package sets the environment every flow runs with, and every
DVC command, stage and Prefect subprocess of the flow inherits."""

import os

from moe2dense.checks import set_offline_env
from moe2dense.env import interpreter_path

# stage commands (`python -m stages.x`) run with this interpreter however the flow was started (no activated venv)
os.environ["PATH"] = interpreter_path()

set_offline_env()  # offline and telemetry-free (moe2dense.checks.OFFLINE_ENV)
# the temporary server (no PREFECT_API_URL) needs more than Prefect's default 20 s to start on 2 busy cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
