"""What the flows' command lines share: the Prefect server check, user errors as one line with exit code 2 (a stage
that failed: its own exit status's class), and no tracebacks on the console for errors that are already one line."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator

import httpx

HEALTH_TIMEOUT_S = 5.0
HINT = "start one with `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`"


class FlowError(RuntimeError):
    """A flow that cannot start or did not finish, in one line; `code`: the CLI's exit status (2: the user's input
    or set-up, 1: anything else)."""

    code = 2


def check_server(api_url: str | None, required: bool = False) -> None:
    """Raise a one-line FlowError unless the Prefect server at `api_url` answers /health within HEALTH_TIMEOUT_S.
    No `api_url`: fine, Prefect starts a temporary server, unless `required` (deployments need a real one)."""
    if not api_url:
        if required:
            raise FlowError(f"PREFECT_API_URL is not set; serving deployments needs a running Prefect server: {HINT}")
        return
    url = f"{api_url.rstrip('/')}/health"
    try:
        httpx.get(url, timeout=HEALTH_TIMEOUT_S).raise_for_status()
    except httpx.HTTPError as exc:
        raise FlowError(f"no Prefect server answers at {url} (PREFECT_API_URL; {type(exc).__name__}: {exc}); {HINT}, "
                        "or unset PREFECT_API_URL to run with a temporary server") from None


class _OneLineErrors(logging.Filter):
    """Drops the traceback from console log records of the `errors` (their message already says it all)."""

    def __init__(self, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.errors):
            record.exc_info, record.exc_text = None, None
        return True


def console_handlers() -> list[logging.Handler]:
    """Prefect's console log handlers (its API handler, which feeds the UI, is not one)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    found = []
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # "": Prefect 3.9 logs to the console
        for handler in logging.getLogger(name).handlers:                 # through the root logger
            if isinstance(handler, PrefectConsoleHandler) and handler not in found:
                found.append(handler)
    return found


def quiet_tracebacks(errors: tuple[type[BaseException], ...]) -> None:
    """On the console only: the UI keeps the tracebacks."""
    for handler in console_handlers():
        handler.addFilter(_OneLineErrors(errors))


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str) -> Iterator:
    """One tqdm bar on stderr (none without a terminal); console log lines print above it instead of through it."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:
        patched = console_handlers()
        for handler in patched:
            def emit(record: logging.LogRecord, _emit=handler.emit) -> None:
                with tqdm.external_write_mode(file=sys.stderr):  # clears the bar, logs, redraws it
                    _emit(record)

            handler.emit = emit
        try:
            yield bar
        finally:
            for handler in patched:
                del handler.emit  # back to the class's


def run(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a flow CLI's `main`: a FlowError or one of `user_errors` becomes `error: <message>` on stderr."""
    errors = (FlowError, *user_errors)
    quiet_tracebacks(errors)
    try:
        return main() or 0
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "code", 2)
