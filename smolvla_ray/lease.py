"""One writer per run: a lease file in the run directory, held while a run trains into it.

Two `smolvla-ray run`s of the same job name and storage would otherwise both write into
`<checkpoint.storage>/<name>/`, the second resuming from the first's checkpoint in progress,
and both would exit 0. The run that starts first writes `LEASE_FILE` (JSON: host, pid, a
random token, the command, start time, `expires_at`) and renews it from a heartbeat thread
every ttl/3; a second run finds a live lease and is refused with the holder named.

- `acquire(run_uri, options)`: take the lease, or raise `LeaseHeldError` (a ValueError: an
  input-level refusal, nothing started) naming the holder and the way out;
- `check(run_uri, options)`: the same decision, read-only (for `submit`, before it submits);
- `with lease:` renews it in a background thread and releases it on exit.

Expiry tolerates clock skew between machines: a lease is expired only when the reader's
clock is past `expires_at + skew_s`. A lease is never taken over silently: an expired one
(the holder died without releasing it) needs `force=True`, and `force` never takes a live one.

Atomicity, by backend:
- local filesystem: the file is written aside, then hard-linked into place (`os.link` fails
  if it exists), so creation is atomic and readers never see half a file; taking over an
  expired lease renames it away first and checks that what moved is the lease judged expired;
- S3 (s3fs): `PutObject` with `If-None-Match: *` to create and `If-Match: <etag>` to renew or
  take over, then a read-back after `settle_s`, which also covers S3-compatible stores that
  ignore the conditions (best effort there);
- other fsspec backends: exists-then-write, then the read-back: best effort.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from smolvla_ray.run_layout import LEASE_FILE
from smolvla_ray.storage import filesystem, is_local, join, mask_userinfo
from smolvla_ray.waits import seconds_from_env

TTL_ENV = "SMOLVLA_RAY_LEASE_TTL_S"
SKEW_ENV = "SMOLVLA_RAY_LEASE_SKEW_S"
DEFAULT_TTL_S = 60.0  # renewed every ttl/3 = 20 s
DEFAULT_SKEW_S = 30.0  # how far apart two machines' clocks may be
DEFAULT_SETTLE_S = 0.5  # before the read-back on object stores

Clock = Callable[[], float]


class LeaseHeldError(ValueError):
    """Another run holds the run directory's lease (or held it and died: then `--force`)."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(RuntimeError):
    """Our lease is gone or belongs to someone else now (it expired and was taken over)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and until when (wall-clock seconds since the epoch)."""

    host: str
    pid: int
    token: str
    command: str
    started_at: float
    expires_at: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        record = asdict(self)
        record["started_at"] = _iso(self.started_at)
        record["expires_at"] = _iso(self.expires_at)
        return (json.dumps(record, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Holder:
        try:
            record = json.loads(data)
            return cls(
                host=str(record["host"]),
                pid=int(record["pid"]),
                token=str(record["token"]),
                command=str(record.get("command", "")),
                started_at=_epoch(record["started_at"]),
                expires_at=_epoch(record["expires_at"]),
                ttl_s=float(record.get("ttl_s", DEFAULT_TTL_S)),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{where} is not a lease file ({type(err).__name__}: {err}); if no run is "
                "writing to this run directory, delete that file"
            ) from None

    def describe(self, now: float) -> str:
        """'pid 12 on host "h" (`smolvla-ray run s.yaml`), since <t> (5m ago)'."""
        return (
            f"pid {self.pid} on host {self.host!r} (`{self.command}`), since "
            f"{_iso(self.started_at, seconds=True)} ({_ago(now - self.started_at)} ago)"
        )


def expired(holder: Holder, now: float, skew_s: float) -> bool:
    """Whether `holder`'s lease is over for a reader whose clock says `now`: only past the
    skew allowance, so a holder whose clock runs behind ours is not declared dead."""
    return now > holder.expires_at + skew_s


def new_holder(ttl_s: float, clock: Clock = time.time, command: str | None = None) -> Holder:
    """This process as a lease holder, with a fresh token."""
    now = clock()
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        token=secrets.token_hex(16),
        command=_command(sys.argv) if command is None else command,
        started_at=now,
        expires_at=now + ttl_s,
        ttl_s=ttl_s,
    )


def read(run_uri: str, storage_options: Mapping[str, Any] | None = None) -> Holder | None:
    """Who holds (or last held) the lease of `run_uri`, None when there is no lease file."""
    return _backend(run_uri, storage_options).read()[0]


def check(
    run_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
    clock: Clock = time.time,
    skew_s: float | None = None,
) -> Holder | None:
    """Read-only `acquire`: raise LeaseHeldError where `acquire` would, else return the
    expired holder `force` would take over (None when the directory is free)."""
    skew = seconds_from_env(SKEW_ENV, DEFAULT_SKEW_S) if skew_s is None else skew_s
    current, _ = _backend(run_uri, storage_options).read()
    if current is not None:
        _judge(current, run_uri, force=force, now=clock(), skew_s=skew)
    return current


def acquire(
    run_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
    ttl_s: float | None = None,
    skew_s: float | None = None,
    holder: Holder | None = None,
    clock: Clock = time.time,
    settle_s: float = DEFAULT_SETTLE_S,
) -> Lease:
    """Take the lease of `run_uri` for this process (`holder`: who we are; passing a lease's
    own holder again re-acquires it). Raises LeaseHeldError when another run holds it, or
    held it and it expired but `force` is not set."""
    ttl = seconds_from_env(TTL_ENV, DEFAULT_TTL_S) if ttl_s is None else ttl_s
    skew = seconds_from_env(SKEW_ENV, DEFAULT_SKEW_S) if skew_s is None else skew_s
    backend = _backend(run_uri, storage_options, settle_s=settle_s)
    me = holder or new_holder(ttl, clock)
    backend.makedirs()
    current: Holder | None = None
    for _ in range(5):  # each turn lost a race to another writer; read what won
        current, version = backend.read()
        me = replace(me, expires_at=clock() + ttl, ttl_s=ttl)
        if current is None:
            won = backend.create(me)
        elif current.token == me.token:
            won = backend.replace(me, version, current)
        else:
            _judge(current, run_uri, force=force, now=clock(), skew_s=skew)
            won = backend.replace(me, version, current)  # an expired lease, with force
        if won:
            return Lease(run_uri, backend, me, ttl_s=ttl, clock=clock)
    now = clock()
    who = current.describe(now) if current else "another process"
    raise LeaseHeldError(
        f"run directory {run_uri} is being taken by {who} at the same time; try again", current
    )


class Lease:
    """A lease we hold. `with lease:` renews it every ttl/3 in a daemon thread and releases
    it on exit. If it is lost (we could not renew it for longer than ttl + skew and someone
    took it over), the heartbeat says so on stderr and sets `lost`; the run goes on."""

    def __init__(
        self, run_uri: str, backend: _Backend, holder: Holder, *, ttl_s: float, clock: Clock
    ) -> None:
        self.run_uri = run_uri
        self.holder = holder
        self.ttl_s = ttl_s
        self.lost: str | None = None
        self._backend = backend
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        """Where the lease file is."""
        return join(self.run_uri, LEASE_FILE)

    def renew(self) -> None:
        """Push `expires_at` to now + ttl; LeaseLostError if the file is no longer ours."""
        current, version = self._backend.read()
        updated = replace(self.holder, expires_at=self._clock() + self.ttl_s)
        if current is None:  # deleted by hand: nobody holds it, take it again
            ok = self._backend.create(updated)
        elif current.token == self.holder.token:
            ok = self._backend.replace(updated, version, current)
        else:
            ok = False
        if not ok:
            now = self._clock()
            who = current.describe(now) if current else "another process"
            raise LeaseLostError(f"the lease {self.uri} was taken over by {who}")
        self.holder = updated

    def release(self) -> bool:
        """Delete the lease file if it is still ours (never someone else's); True if deleted."""
        return self._backend.delete(self.holder.token)

    def __enter__(self) -> Lease:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="smolvla-ray-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.ttl_s, 5.0))
        try:
            self.release()
        except Exception as err:  # never hide the run's own outcome; the lease will expire
            _warn(f"could not release the lease {self.uri} ({type(err).__name__}: {err})")

    def _beat(self) -> None:
        interval = self.ttl_s / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = interval
            except LeaseLostError as err:
                self.lost = str(err)
                _warn(f"{err}: another run may now write to {self.run_uri}")
                return
            except Exception as err:  # storage hiccup: try again soon, before it expires
                _warn(f"could not renew the lease {self.uri} ({type(err).__name__}: {err})")
                wait = min(interval, 5.0)


# -- the decision --------------------------------------------------------------------------


def gone(holder: Holder) -> bool:
    """Whether the holder is a process of this host that no longer runs: then its lease is
    over for certain, clocks and expiry aside (a `run` killed with SIGKILL, then run again)."""
    if holder.host != socket.gethostname() or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _judge(holder: Holder, run_uri: str, *, force: bool, now: float, skew_s: float) -> None:
    """Raise LeaseHeldError unless `holder`'s lease expired and `force` takes it over, or
    its holder was a process of this host that has ended."""
    until = holder.expires_at + skew_s
    who = holder.describe(now)
    if gone(holder):
        sys.stderr.write(
            f"[smolvla-ray] taking over the lease of {run_uri} from {who}: that process no "
            "longer runs on this host\n"
        )
        return
    if not expired(holder, now, skew_s):
        refusal = (
            "--force takes over only an expired lease, and this one is live. " if force else ""
        )
        raise LeaseHeldError(
            f"run directory {run_uri} is in use by {who}; its lease expires at "
            f"{_iso(holder.expires_at, seconds=True)} unless renewed (a live run renews it "
            f"every {holder.ttl_s / 3:g}s). {refusal}Wait for that run to end or stop it; if "
            f"it died, pass --force once the lease has expired (after "
            f"{_iso(until, seconds=True)}, {skew_s:g}s of clock-skew allowance included), "
            "or give this run another name",
            holder,
        )
    if not force:
        raise LeaseHeldError(
            f"run directory {run_uri} holds the lease of {who}, which expired at "
            f"{_iso(holder.expires_at, seconds=True)} ({_ago(now - holder.expires_at)} ago): "
            "that run probably died without releasing it. If it is really gone, pass --force "
            "to take the run directory over",
            holder,
        )


# -- backends ------------------------------------------------------------------------------


class _Backend:
    """Reads and conditional writes of one lease file, as atomic as the storage allows."""

    def __init__(self, fs: Any, path: str, where: str) -> None:
        self.fs, self.path, self.where = fs, path, where

    def makedirs(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)

    def read(self) -> tuple[Holder | None, Any]:
        """(the holder, a version for conditional writes), (None, None) when there is none."""
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return Holder.from_bytes(data, self.where), None

    def create(self, holder: Holder) -> bool:
        """Write the lease if there is none; False if one exists (another writer won)."""
        raise NotImplementedError

    def replace(self, holder: Holder, version: Any, current: Holder) -> bool:
        """Overwrite `current` (read with `version`) with `holder`; False if it changed."""
        raise NotImplementedError

    def delete(self, token: str) -> bool:
        current, _ = self.read()
        if current is None or current.token != token:
            return False
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            return False
        return True


class _Local(_Backend):
    """Local (or mounted) filesystem: hard links and renames, which POSIX makes atomic."""

    def create(self, holder: Holder) -> bool:
        aside = self._aside(holder)
        try:
            os.link(aside, self.path)  # fails if the lease exists; never a half-written file
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(holder.to_bytes())
            return True
        finally:
            os.unlink(aside)

    def replace(self, holder: Holder, version: Any, current: Holder) -> bool:
        if current.token == holder.token:  # a renewal: nobody else writes a live lease
            os.replace(self._aside(holder), self.path)
            return True
        # A takeover: move the expired lease away, and make sure it is the one judged
        # expired (not a fresh one another process wrote meanwhile) before creating ours.
        grave = f"{self.path}.{secrets.token_hex(4)}.expired"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return self.create(holder)
        try:
            with open(grave, "rb") as moved:
                moved_token = Holder.from_bytes(moved.read(), self.where).token
            if moved_token != current.token:  # someone else's: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(grave, self.path)
                return False
            return self.create(holder)
        finally:
            os.unlink(grave)

    def _aside(self, holder: Holder) -> str:
        aside = f"{self.path}.{secrets.token_hex(4)}.tmp"
        with open(aside, "wb") as out:
            out.write(holder.to_bytes())
        return aside


class _Remote(_Backend):
    """Object stores: conditional PUTs on S3, exists-then-write elsewhere; a read-back after
    `settle_s` confirms the write (and catches stores that ignore the conditions)."""

    def __init__(self, fs: Any, path: str, where: str, settle_s: float) -> None:
        super().__init__(fs, path, where)
        self.settle_s = settle_s
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.s3 = bool({"s3", "s3a"} & set(protocols))

    def read(self) -> tuple[Holder | None, Any]:
        self.fs.invalidate_cache(self.path)
        version = None
        if self.s3:  # the ETag first: a write after it makes the If-Match fail, as it should
            try:
                version = self.fs.info(self.path)["ETag"]
            except FileNotFoundError:
                return None, None
        holder, _ = super().read()
        return holder, version

    def create(self, holder: Holder) -> bool:
        try:
            self.fs.pipe_file(self.path, holder.to_bytes(), mode="create")
        except FileExistsError:
            return False
        except OSError:  # S3 answers 409 to a conditional write racing another one
            if self.read()[0] is None:
                raise
            return False
        return self._confirm(holder)

    def replace(self, holder: Holder, version: Any, current: Holder) -> bool:
        extra = {"IfMatch": version} if self.s3 and version else {}
        try:
            self.fs.pipe_file(self.path, holder.to_bytes(), **extra)
        except OSError as err:  # If-Match failed (412, EINVAL) or gone: it changed under us
            now, _ = self.read()
            if not (err.errno == errno.EINVAL or now is None or now.token != current.token):
                raise
            return False
        return current.token == holder.token or self._confirm(holder)

    def _confirm(self, holder: Holder) -> bool:
        time.sleep(self.settle_s)
        current, _ = self.read()
        return current is not None and current.token == holder.token


def _backend(
    run_uri: str, storage_options: Mapping[str, Any] | None, *, settle_s: float = 0.0
) -> _Backend:
    fs, root = filesystem(run_uri, storage_options)
    where = join(run_uri, LEASE_FILE)
    if is_local(fs):
        return _Local(fs, os.path.join(root, LEASE_FILE), where)
    return _Remote(fs, join(root, LEASE_FILE), where, settle_s)


# -- small helpers -------------------------------------------------------------------------


_SECRET_SET = re.compile(r"(storage_options[^=\s'\"]*=)[^\s'\"]*")


def _command(argv: Sequence[str]) -> str:
    """The command line for humans, without storage secrets given by --set or in URLs."""
    program = os.path.basename(argv[0]) if argv else "python"
    if argv and argv[0].endswith(os.path.join("smolvla_ray", "cli.py")):
        program = "python -m smolvla_ray.cli"  # how submitted jobs start
    shown = _SECRET_SET.sub(r"\1***", shlex.join(argv[1:]))
    return mask_userinfo(f"{program} {shown}".strip())


def _iso(epoch: float, *, seconds: bool = False) -> str:
    when = datetime.fromtimestamp(epoch, tz=UTC)
    return when.isoformat(timespec="seconds" if seconds else "milliseconds").replace("+00:00", "Z")


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _warn(message: str) -> None:
    sys.stderr.write(f"[smolvla-ray] warning: {message}\n")
