"""Storage: any fsspec URL (`/path`, `file://`, `s3://`, `gs://`, `az://`, `memory://`, `hf://`),
as one set of rules every part of the project uses.

- `url_problem(url)`: an unknown scheme (a typo), or a backend runs cannot keep checkpoints on;
- `mask_userinfo(text)`: `user:password@` in any URL masked, wherever a URL is shown or kept;
- `filesystem(url, options)`: the fsspec filesystem and the path inside it (S3 clients fail
  fast on a dead endpoint instead of botocore's long default retries);
- `join(uri, *parts)`: a child URL or path (never a hand-made f-string);
- `absolute(uri)`: a local path made absolute against this process's directory (with `~`
  expanded), URLs untouched; Ray workers run elsewhere, so the driver absolutises;
- `with_retries(call, what=...)`: transient faults retried with exponential backoff within a
  budget (`SMOLVLA_RAY_STORAGE_RETRY_S`, default 120 s), permanent ones raised at once;
- `StorageUnavailableError`: the one error for storage that cannot be reached or kept
  failing past the budget (a `ConnectionError`, so an `OSError`).

Object stores drop connections, throttle and go away for a few seconds; a finetune that runs
for days must ride that out without losing a checkpoint, so every call of the checkpoint
path goes through `with_retries`. Errors that retrying cannot fix (a missing file, denied
access, a bad argument) are raised at once.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.spec import AbstractFileSystem

T = TypeVar("T")

# botocore's default retry policy turns a refused connection into ~10 s of retries per call;
# these keep a dead endpoint a sub-second error. User-given `config_kwargs` win.
_S3_FAIL_FAST = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Storage Ray Train cannot keep a run in: its checkpoints are uploaded by worker processes
# and read back by the driver, so an in-process filesystem loses them; http(s) is read-only.
_NOT_FOR_CHECKPOINTS = {
    "memory": "memory:// lives inside one process and Ray's workers cannot share it",
    "http": "http(s) storage is read-only",
    "https": "http(s) storage is read-only",
}


def url_problem(url: str, *, checkpoints: bool = False) -> str | None:
    """Why `url` is not usable storage, or None: empty, an unknown fsspec protocol (with the
    near misses), or with `checkpoints` a backend a run's checkpoints cannot live on."""
    if not url.strip():
        return "must not be empty; give a local path or an fsspec URL like s3://b/p"
    for part in url.split("::"):
        match = _URL_SCHEME.match(part)
        if match is None:
            continue
        scheme = match.group(1).lower()
        known = set(fsspec.available_protocols())
        if scheme not in known:
            close = difflib.get_close_matches(scheme, sorted(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(c + '://' for c in close)}?" if close else ""
            return f"unknown URL scheme {scheme + '://'!r}{hint}"
        if checkpoints and scheme in _NOT_FOR_CHECKPOINTS:
            return f"{_NOT_FOR_CHECKPOINTS[scheme]}; keep runs on a path, s3://, gs:// or az://"
    return None


_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def mask_userinfo(text: str) -> str:
    """`text` with the userinfo of every URL in it (`user:password@`, `token@`) masked to
    `***@`, for every message, file and record a URL may reach."""
    return _USERINFO.sub(r"\1***@", text)


def mask_secrets_in(value: Any) -> Any:
    """`mask_userinfo` over every string of a JSON-like value."""
    if isinstance(value, str):
        return mask_userinfo(value)
    if isinstance(value, dict):
        return {k: mask_secrets_in(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets_in(v) for v in value]
    return value


class StorageUnavailableError(ConnectionError):
    """Storage could not be reached, or kept failing for longer than the retry budget."""


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for `url` with `storage_options`."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        config = dict(_S3_FAIL_FAST)
        config.update(options.get("config_kwargs") or {})
        options["config_kwargs"] = config
    fs: AbstractFileSystem
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, one slash between each."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def absolute(uri: str | None, *, base: str | os.PathLike[str] = ".", here: bool = True):
    """A local path (or `file://` URL) made absolute against `base`; other URLs and None
    unchanged. `here=True` expands `~` on this machine; `here=False` (a path for another
    machine, such as a submitted job's) leaves `~` and `$VAR` paths for that machine."""
    if uri is None:
        return None
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        return uri
    if not here and uri.startswith(("~", "$")):
        return uri
    return os.path.abspath(os.path.join(base, os.path.expanduser(uri)))


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether files of `fs` can be opened by path directly."""
    protocol = fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def looks_like_connection_error(err: BaseException) -> bool:
    """A connection failure, also from botocore/aiohttp's own hierarchies (matched by name
    so they need not be imported)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectionError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
        }
    )


# -- retries ---------------------------------------------------------------------------------

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
