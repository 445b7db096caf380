"""Prefect flows over the DVC pipeline. Importing the package sets the environment every flow runs with, and every
DVC command, stage and Prefect subprocess of the flow inherits."""

import os

from moe2dense.env import interpreter_path

# stage commands (`python -m stages.x`) run with this interpreter however the flow was started (no activated venv)
os.environ["PATH"] = interpreter_path()

for _var, _value in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the temporary server (no PREFECT_API_URL) needs more than Prefect's default 20 s to start on 2 busy cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_var, _value)
