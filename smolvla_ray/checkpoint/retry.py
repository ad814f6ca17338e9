"""Retrying storage calls through transient faults, within a bounded time budget.

Object stores drop connections, throttle and go away for a few seconds; a finetune that
runs for days must ride that out without losing a checkpoint. Every storage call of the
checkpoint path (upload, listing, verification, download) goes through `with_retries`:
a transient error is retried with exponential backoff until the budget is spent, then the
call fails with a `StorageUnavailableError` that names the operation, the storage location,
how long it tried and the last error. Errors that retrying cannot fix (a missing file,
denied access, a bad argument) are raised at once.

The budget is `SMOLVLA_RAY_STORAGE_RETRY_S` seconds (default 120), read when a call starts,
so it can be set per cluster (in the environment of `ray start`) without a spec change.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BUDGET_ENV = "SMOLVLA_RAY_STORAGE_RETRY_S"
DEFAULT_RETRY_BUDGET_S = 120.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0

# Retrying cannot fix these: the object is not there, access is denied, or the call is wrong.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
)


class StorageUnavailableError(OSError):
    """Storage stayed unreachable (or kept failing) for longer than the retry budget."""


def retry_budget_s() -> float:
    """The retry budget in seconds: `SMOLVLA_RAY_STORAGE_RETRY_S`, else 120."""
    raw = os.environ.get(RETRY_BUDGET_ENV)
    if raw is None or raw == "":
        return DEFAULT_RETRY_BUDGET_S
    try:
        value = float(raw)
    except ValueError as err:
        raise ValueError(
            f"{RETRY_BUDGET_ENV}={raw!r} is not a number of seconds; set it to e.g. 120"
        ) from err
    if value < 0:
        raise ValueError(f"{RETRY_BUDGET_ENV}={raw!r} is negative; set it to e.g. 120")
    return value


def is_transient(error: BaseException) -> bool:
    """Whether retrying `error` can help: anything but the permanent kinds above (network
    errors from s3fs/gcsfs/adlfs are not OSError subclasses consistently, so the test is
    by exclusion)."""
    if isinstance(error, StorageUnavailableError):
        return False  # an inner call already spent its budget
    return isinstance(error, Exception) and not isinstance(error, PERMANENT_ERRORS)


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    budget_s: float | None = None,
    first_delay_s: float | None = None,
    max_delay_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call()`, retrying transient errors with exponential backoff for up to
    `budget_s` seconds (default: `retry_budget_s()`). `what` names the operation and the
    location for messages, e.g. "upload of s3://bucket/run/checkpoint_000000010/manifest.json".
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    start = time.monotonic()
    delay = FIRST_DELAY_S if first_delay_s is None else first_delay_s
    max_delay = MAX_DELAY_S if max_delay_s is None else max_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            elapsed = time.monotonic() - start
            if elapsed + delay > budget:
                raise StorageUnavailableError(
                    f"storage unavailable: {what} failed {attempt} time(s) over {elapsed:.1f}s, "
                    f"past the retry budget of {budget:g}s (last error: "
                    f"{type(err).__name__}: {err}). Check that the storage endpoint is up and "
                    f"reachable from every node; {RETRY_BUDGET_ENV} sets the budget"
                ) from err
            message = (
                f"warning: {what} failed ({type(err).__name__}: {err}); "
                f"retry {attempt} in {delay:.1f}s"
            )
            log.warning(message)
            sys.stderr.write(f"[smolvla-ray] {message}\n")
            sleep(delay)
            delay = min(delay * 2, max_delay)
