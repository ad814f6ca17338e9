"""Bounded waits: how long anything may wait on a service before saying it is not there.

One setting, `SMOLVLA_RAY_CONNECT_TIMEOUT_S` (default 30 s), bounds every wait on something
outside this process that a user names: a Ray cluster address, an MLflow tracking server, a
storage endpoint probed by a command, a cluster's Jobs API that is still starting. A dead
one fails within it, in one line naming what did not answer; transient answers of a live
service are retried within the same bound. (Storage during training has its own, longer
budget, `SMOLVLA_RAY_STORAGE_RETRY_S`: a run rides out an outage rather than failing.)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
CONNECT_TIMEOUT_ENV = "SMOLVLA_RAY_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 30.0


def seconds_from_env(env: str, default: float) -> float:
    """A positive number of seconds from environment variable `env`, else `default`."""
    raw = os.environ.get(env, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{env}={raw!r} is not a positive number of seconds; e.g. {default:g}")
    return value


def connect_timeout_s() -> float:
    return seconds_from_env(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S)


def host_port(address: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `scheme://host:port/...`; None when it names none."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or default_port
    except ValueError:  # a port that is not a number
        return None


def reachable(address: str, *, default_port: int, what: str) -> None:
    """Raise ConnectionError (one line, naming `what` and the address) unless a TCP
    connection to `address` opens: a refused connection fails at once, a silent host
    within the bound (at most 10 s)."""
    target = host_port(address, default_port)
    if target is None:
        return
    bound = min(connect_timeout_s(), 10.0)
    try:
        with socket.create_connection(target, timeout=bound):
            return
    except OSError as err:
        reason = err.strerror or type(err).__name__
    host, port = target
    raise ConnectionError(
        f"{what} at {host}:{port} does not answer ({reason}); check the address and that "
        "it is running"
    )


def retry_transient(
    call: Callable[[], T], *, transient: Callable[[Exception], bool], what: str
) -> T:
    """`call()`, retried while it fails with a `transient` error, within the bound."""
    deadline = time.monotonic() + connect_timeout_s()
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as err:
            if not transient(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def check_endpoint(storage_options: dict) -> None:
    """An S3-compatible `endpoint_url` in storage options must answer (botocore's retries
    would otherwise spend minutes on a dead one)."""
    endpoint = storage_options.get("endpoint_url") or (
        storage_options.get("client_kwargs") or {}
    ).get("endpoint_url")
    if isinstance(endpoint, str) and endpoint.startswith(("http://", "https://")):
        port = 443 if endpoint.startswith("https") else 80
        reachable(endpoint, default_port=port, what="the storage endpoint (endpoint_url)")


class ResourceWaitTimeout(RuntimeError):
    """The cluster did not grant a run's resources within `failure.resource_wait_s`."""


def show_resources(resources: Mapping[str, float]) -> str:
    """`{CPU: 2, GPU: 1}` as a message shows it: no node-id or memory entries."""
    keep = {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}
    shown = ", ".join(f"{k}: {v:g}" for k, v in keep.items() if "memory" not in k)
    return f"{{{shown or 'none'}}}"


def resource_message(*, wait_s: float, whose: str, asks: str, fix: str) -> str:
    """The one message for a resource wait that ran out (the trainer's workers, the feature
    cache's build tasks): what was asked, what the cluster has and has free, what to do.
    `whose`: "the workers'"; `asks`: "scaling asks 2 worker(s) x {CPU: 1} placed PACK";
    `fix`: what to lower."""
    import ray

    try:
        available, total = ray.available_resources(), ray.cluster_resources()
    except Exception:  # the cluster itself may be gone
        available, total = {}, {}
    return (
        f"the cluster did not grant {whose} resources within failure.resource_wait_s="
        f"{wait_s:g}s: {asks}; the cluster has {show_resources(total)} in total, "
        f"{show_resources(available)} free now. Add nodes (or wait for lost ones to come "
        f"back), {fix}, or raise failure.resource_wait_s"
    )
