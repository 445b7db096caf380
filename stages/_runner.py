"""Shared entry point for stages: offline + no-telemetry environment, logging, the params pre-flight, and user
errors as one clean line (exit code 2) instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from moe2dense.checks import preflight, set_offline_env
from moe2dense.params import ParamsError, load_params

set_offline_env()  # before anything imports transformers / datasets / huggingface_hub

USER_ERRORS = (ParamsError, FileNotFoundError, KeyError, ValueError)


def run(name: str, main: Callable[[], None]) -> None:
    """Pre-flight the whole params.yaml (every check that reads no weights; lm-eval task resolution is left to the
    DVC stage `check` and to the evaluate stage itself, as it costs ~25 s), then run `main`."""
    logging.basicConfig(level=os.environ.get("MOE2DENSE_LOG", "INFO"), format=f"[{name}] %(message)s")
    try:
        preflight(load_params(), Path("."), lm_eval=False)
        main()
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"[{name}] error: {msg}", file=sys.stderr)
        if os.environ.get("MOE2DENSE_DEBUG"):
            raise
        sys.exit(2)
