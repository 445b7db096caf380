"""Shared entry point for stages: offline + no-telemetry environment, logging, and user errors as one clean line
(exit code 2) instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from moe2dense.params import ParamsError

# Before anything imports transformers / datasets / huggingface_hub: never reach for the network at run time.
for _var, _val in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _val)

USER_ERRORS = (ParamsError, FileNotFoundError, KeyError, ValueError)


def run(name: str, main: Callable[[], None]) -> None:
    logging.basicConfig(level=os.environ.get("MOE2DENSE_LOG", "INFO"), format=f"[{name}] %(message)s")
    try:
        main()
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"[{name}] error: {msg}", file=sys.stderr)
        if os.environ.get("MOE2DENSE_DEBUG"):
            raise
        sys.exit(2)
