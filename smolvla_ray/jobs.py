"""Ray Jobs: submit a job spec to a Ray cluster, then follow, stop and list it.

`submit` validates everything locally first (the spec, then `driver.preflight`: dataset,
checkpoint, storage), so bad input never reaches the cluster (docs/design.md, invariant 6).
The job it submits is `python -m smolvla_ray.cli run spec.yaml` in a working_dir holding the
resolved spec (overrides applied, secrets dropped) and, with `ship_package`, this very
`smolvla_ray` package in `py_modules`, so the cluster runs the code that was validated here.
A run directory another run holds (its lease, `lease.py`) is refused before submitting;
`--force` (an expired lease only) is passed on to the job's `run`, which takes it over.

Secrets never travel with a submission: the uploaded spec is `spec.public_dict()` and the
metadata holds the job name and the spec's hash only. The job on the cluster reads
credentials from its own environment ($SMOLVLA_STORAGE_OPTIONS, AWS_* and the like, set on
every node before `ray start`); see docs/cluster.md.

Auth: Ray 2.60 clusters may require a token. Ray's own client sends one only when
RAY_AUTH_MODE=token is set in the submitting process; here $RAY_AUTH_TOKEN (or the file in
$RAY_AUTH_TOKEN_PATH) is sent as `Authorization: Bearer <token>` whenever it is set.
A cluster without auth ignores the header.

No typer here: `smolvla_ray.cli` wraps these functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from smolvla_ray import storage
from smolvla_ray.spec import JobSpec, load_spec
from smolvla_ray.waits import retry_transient

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.yaml"
ENTRYPOINT = f"python -m smolvla_ray.cli run {SPEC_FILE}"
# Job metadata marking a submission as ours; `list_jobs` keeps only jobs that carry it.
MARKER_KEY = "submitted_by"
MARKER_VALUE = "smolvla-ray"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

JobStatusName = Literal["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})


@dataclass(frozen=True)
class JobInfo:
    """What a caller needs to know about one submitted job (a slim view of Ray's JobDetails)."""

    job_id: str
    """The submission id `submit` returned: `<spec name>-<random hex>`."""
    status: JobStatusName
    name: str
    """The spec's name ('' for a job not submitted by smolvla-ray)."""
    spec_sha256: str
    """sha256 of the uploaded spec.yaml ('' when unknown)."""
    message: str
    start_time: datetime | None
    end_time: datetime | None

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change (SUCCEEDED, FAILED or STOPPED)."""
        return self.status in TERMINAL_STATUSES


class JobFailedError(RuntimeError):
    """A job waited on ended in FAILED or STOPPED; `info` holds its final state."""

    def __init__(self, info: JobInfo) -> None:
        super().__init__(
            f"job {info.job_id!r} ended {info.status}: {info.message or 'no message'}; "
            f"see its output with `smolvla-ray logs {info.job_id}`"
        )
        self.info = info


def resolve_address(address: str | None) -> str:
    """The dashboard (Jobs API) URL: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS.

    A bare `host:port` becomes `http://host:port`. A `ray://` address is Ray Client's port
    (10001), which does not serve the Jobs API, so it is refused with the fix."""
    chosen = address or next((os.environ[v] for v in ADDRESS_ENVS if os.environ.get(v)), "")
    chosen = chosen.strip().rstrip("/")
    if not chosen:
        raise ValueError(
            "no Ray cluster address: pass --address http://HOST:8265 (the head node's "
            "dashboard) or set RAY_ADDRESS"
        )
    if chosen in ("auto", "local"):
        raise ValueError(
            f"address {chosen!r} (from --address or RAY_ADDRESS) finds a local Ray, not a "
            "dashboard; give the head node's dashboard URL, e.g. http://HOST:8265"
        )
    if chosen.startswith("ray://"):
        raise ValueError(
            f"address {chosen!r} is a Ray Client address; the Jobs API is served by the "
            "dashboard: use http://HOST:8265"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    if not chosen.startswith(("http://", "https://")):
        raise ValueError(
            f"address {chosen!r} must be an http(s):// dashboard URL, e.g. http://HOST:8265"
        )
    return chosen


def auth_token(*, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster token from $RAY_AUTH_TOKEN, else from the file named by $RAY_AUTH_TOKEN_PATH."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = env.get(TOKEN_PATH_ENV, "").strip()
    if not path:
        return None
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise FileNotFoundError(
            f"${TOKEN_PATH_ENV}={path!r} cannot be read ({err.strerror}); point it at the "
            f"file holding the cluster's token or set ${TOKEN_ENV}"
        ) from None
    if not token:
        raise ValueError(f"${TOKEN_PATH_ENV}={path!r} is empty; put the cluster's token in it")
    return token


def _client(address: str | None):  # -> ray.job_submission.JobSubmissionClient
    """A connected client; unreachable or unauthorized clusters raise errors with the fix."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except ConnectionError:
        # RAY_ADDRESS on a cluster node often holds the GCS address (port 6379), not the API's.
        gcs = " (6379 is Ray's GCS port, not the dashboard's)" if url.endswith(":6379") else ""
        raise ConnectionError(
            f"cannot reach a Ray dashboard at {url!r}{gcs}; start the cluster with "
            "`ray start --head --dashboard-host 0.0.0.0` (the Jobs API listens on port "
            "8265 by default) and check that this machine can reach that host and port"
        ) from None
    except AuthenticationError as err:
        # Ray says 'Authentication required' (401: no token sent) or '... failed' (403).
        how = "got no token" if "required" in str(err).split(":", 1)[0] else "rejected the token"
        raise PermissionError(
            f"the Ray cluster at {url!r} uses token auth and {how}; set ${TOKEN_ENV} to the "
            "cluster's token (on the head node: `ray get-auth-token`)"
        ) from None


def _details(client: Any, job_id: str, url: str):  # -> ray JobDetails
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "status code 404" in str(err):
            raise ValueError(
                f"no job {job_id!r} on the Ray cluster at {url!r}; `smolvla-ray list "
                f"--address {url}` shows the jobs there"
            ) from None
        raise


def _to_info(details: Any) -> JobInfo:
    meta = details.metadata or {}

    def when(ms: int | None) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None

    status = details.status
    return JobInfo(
        job_id=details.submission_id or details.job_id or "",
        status=getattr(status, "value", str(status)),
        name=meta.get("name", ""),
        spec_sha256=meta.get("spec_sha256", ""),
        message=details.message or "",
        start_time=when(details.start_time),
        end_time=when(details.end_time),
    )


def submission_id(name: str) -> str:
    """`<name>-<6 hex>`: readable in `ray job list`, unique per submission."""
    return f"{name}-{secrets.token_hex(3)}"


def upload_spec(spec: JobSpec, *, base: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """The spec as uploaded: secrets dropped, relative local paths made absolute from `base`.

    The job's working directory on the cluster is a temporary copy of the upload, so a
    relative path would point somewhere else there; an absolute one names the same place
    that `preflight` checked here (a shared filesystem, or a path baked into the image)."""
    data = spec.public_dict()

    def absolute(value: str | None, *, only_if_exists: bool = False) -> str | None:
        if not value:
            return value
        candidate = storage.absolute(value, base=base, here=False)
        if only_if_exists and candidate != value and not os.path.exists(candidate):
            return value  # a hub id such as lerobot/smolvla_base
        return candidate

    data["data"]["uri"] = absolute(data["data"]["uri"], only_if_exists=True)  # or a hub id
    data["data"]["cache_dir"] = absolute(data["data"].get("cache_dir"))
    data["checkpoint"]["storage"] = absolute(data["checkpoint"]["storage"])
    data["checkpoint"]["from_checkpoint"] = absolute(data["checkpoint"].get("from_checkpoint"))
    data["policy"]["pretrained"] = absolute(data["policy"].get("pretrained"), only_if_exists=True)
    return data


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def _runtime_env(working_dir: str, user: Mapping[str, Any] | None, ship_package: bool) -> dict:
    runtime_env = dict(user or {})
    if "working_dir" in runtime_env:
        raise ValueError(
            f"runtime_env.working_dir={runtime_env['working_dir']!r}: submit sets the "
            "working_dir itself (it carries spec.yaml); ship extra code with py_modules"
        )
    runtime_env["working_dir"] = working_dir
    if ship_package:
        runtime_env["py_modules"] = [*runtime_env.get("py_modules", []), _package_dir()]
    runtime_env["excludes"] = [*runtime_env.get("excludes", []), "__pycache__", "*.pyc"]
    return runtime_env


def _secret_keys(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names (never values) of the secrets in storage_options, for the warning."""
    names = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            names += _secret_keys(value, f"{prefix}{key}.")
        elif hasattr(value, "get_secret_value"):
            names.append(f"{prefix}{key}")
    return sorted(names)


def entrypoint(*, force: bool = False) -> str:
    """The job's command: `run` the uploaded spec; with `force`, taking over the run
    directory's expired lease (checked by `submit` before it submits)."""
    return f"{ENTRYPOINT} --force" if force else ENTRYPOINT


def submit(
    spec_path: str,
    address: str | None,
    *,
    overrides: Sequence[str] = (),
    ship_package: bool = True,
    runtime_env: dict[str, Any] | None = None,
    wait: bool = False,
    force: bool = False,
) -> str:
    """Validate `spec_path` here, submit it to the cluster's Jobs API and return the job id.

    Raises SpecError/ValueError/OSError (bad spec, dataset, checkpoint or storage) before
    contacting the cluster, ConnectionError/PermissionError when the cluster cannot be
    reached or refuses the token. With `wait`, blocks until the job ends and raises
    JobFailedError unless it SUCCEEDED. `runtime_env` is merged in (its working_dir is
    ours); do not put credentials in its env_vars: Ray shows them in the job's details.

    A run directory another run holds (its lease, see `lease.py`) is refused here with
    LeaseHeldError (a ValueError); `force` lets through an expired lease and is passed to
    the job's own `run`, which takes the lease over.
    """
    from smolvla_ray import driver, lease
    from smolvla_ray.run_layout import run_uri

    spec = load_spec(spec_path, overrides)
    driver.preflight(spec)
    run_dir = run_uri(storage.absolute(spec.checkpoint.storage), spec.name)
    lease.check(run_dir, spec.storage_options_plain(), force=force)  # read-only
    dropped = _secret_keys(spec.storage_options)
    if dropped:
        logger.warning(
            "storage_options %s are secrets and are not uploaded; the job reads credentials "
            "from the cluster's environment ($SMOLVLA_STORAGE_OPTIONS, AWS_* ...)",
            ", ".join(dropped),
        )
    text = yaml.safe_dump(upload_spec(spec), sort_keys=False)
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="smolvla-ray-submit-") as workdir:
        (Path(workdir) / SPEC_FILE).write_text(text)
        job_id = retry_transient(
            lambda: client.submit_job(
                entrypoint=entrypoint(force=force),
                submission_id=submission_id(spec.name),
                runtime_env=_runtime_env(workdir, runtime_env, ship_package),
                metadata={
                    MARKER_KEY: MARKER_VALUE,
                    "name": spec.name,
                    "spec_sha256": hashlib.sha256(text.encode()).hexdigest(),
                },
            ),
            # A cluster that has just started answers 500 until its job agent is up.
            transient=lambda err: "No available agent" in str(err),
            what="job submission",
        )
    if wait:
        final = wait_for(job_id, address)
        if final.status != "SUCCEEDED":
            raise JobFailedError(final)
    return job_id


def info(job_id: str, address: str | None) -> JobInfo:
    """The job's status, start/end times and Ray's message; ValueError for an unknown id."""
    client = _client(address)
    return _to_info(_details(client, job_id, resolve_address(address)))


def status(job_id: str, address: str | None) -> JobStatusName:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return info(job_id, address).status


def wait_for(
    job_id: str,
    address: str | None,
    *,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
) -> JobInfo:
    """Poll until the job ends and return its final state; TimeoutError after `timeout_s`."""
    client = _client(address)
    url = resolve_address(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        current = _to_info(_details(client, job_id, url))
        if current.is_terminal:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id!r} is still {current.status} after {timeout_s}s; stop it with "
                f"`smolvla-ray stop {job_id}` or wait longer"
            )
        time.sleep(poll_s)


def logs(job_id: str, address: str | None, *, follow: bool = False) -> Generator[str, None, None]:
    """The job's output, line by line (without newlines); ValueError for an unknown id.

    `follow` streams new output until the job ends (Ray's websocket tail, driven from a
    background thread so callers get a plain iterator even inside a running event loop)."""
    client = _client(address)
    _details(client, job_id, resolve_address(address))  # checked now, not on first next()
    if not follow:
        return _lines(iter([client.get_job_logs(job_id)]))
    return _lines(_sync_iter(lambda: client.tail_job_logs(job_id)))


def _lines(chunks: Generator[str, None, None] | Iterator[str]) -> Generator[str, None, None]:
    # Chunks end anywhere, not only at newlines. Closing this closes the stream under it.
    pending = ""
    try:
        for chunk in chunks:
            pending += chunk
            *complete, pending = pending.split("\n")
            yield from complete
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if pending:
        yield pending


_DONE = object()


def _sync_iter(make: Callable[[], AsyncIterator[str]]) -> Generator[str, None, None]:
    """Iterate an async iterator from sync code; closing the iterator cancels the stream.

    The loop runs in its own thread, so this works even where the caller's thread already
    runs an event loop (Jupyter). On close the stream is cancelled and unwound while the
    loop still runs, so the websocket and HTTP session close cleanly."""
    items: queue.Queue[Any] = queue.Queue()
    loop = asyncio.new_event_loop()

    async def pump() -> None:
        try:
            async for item in make():
                items.put(item)
        except Exception as err:  # handed to the consumer, raised there
            items.put(err)
        finally:
            items.put(_DONE)

    thread = threading.Thread(target=loop.run_forever, name="smolvla-ray-logs", daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(pump(), loop)
    done = False
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
        done = True
    finally:
        future.cancel()
        with contextlib.suppress(queue.Empty):
            while not done:  # wait for pump's cleanup; items left unread are dropped
                done = items.get(timeout=10) is _DONE
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def stop(job_id: str, address: str | None) -> bool:
    """Ask the job to stop (it ends as STOPPED); False if it had already ended."""
    client = _client(address)
    details = _details(client, job_id, resolve_address(address))
    if details.status.is_terminal():
        # Ray answers True while the ended job's supervisor actor is still being torn down.
        return False
    return bool(client.stop_job(job_id))


def list_jobs(address: str | None) -> list[JobInfo]:
    """Jobs on the cluster that smolvla-ray submitted, oldest first."""
    client = _client(address)
    ours = [
        _to_info(d)
        for d in client.list_jobs()
        if (d.metadata or {}).get(MARKER_KEY) == MARKER_VALUE
    ]
    epoch = datetime.fromtimestamp(0, tz=UTC)
    return sorted(ours, key=lambda j: (j.start_time or epoch, j.job_id))
