"""Where dataset files live: a dataset root at any URL (`smolvla_ray.storage`), and a
node-local file cache.

Parquet and JSON are small and read straight from storage; mp4 files (and the feature
cache's shards) are read many times per epoch, so remote ones are copied once into a local
cache that several loader processes on one node share (download to a temp file, atomic
rename, a file lock per entry, and LRU eviction under a size bound).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.spec import AbstractFileSystem

from smolvla_ray.storage import (
    StorageUnavailableError,
    filesystem,
    is_local,
    join,
    looks_like_connection_error,
)

DEFAULT_CACHE_DIR = Path(os.environ.get("SMOLVLA_RAY_CACHE", "~/.cache/smolvla_ray")).expanduser()
DEFAULT_CACHE_MAX_BYTES = 20 * 1024**3


def node_cache_dir(configured: str | None) -> Path:
    """The node-local cache directory (`data.cache_dir`, `~` expanded; None: the default),
    one rule for the driver that sizes the caches and the workers that fill them."""
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR


@dataclass(frozen=True)
class Storage:
    """A dataset root: its URL, the fsspec filesystem and the root path inside it.

    Holds only picklable state (the URL and options) so it can travel to loader worker
    processes and Ray workers; the filesystem object is rebuilt lazily on the other side.
    """

    url: str
    # Credentials may live here: keep them out of reprs, logs and error messages.
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem (fsspec caches instances, so this is cheap after the first)."""
        return filesystem(self.url, self.storage_options)[0]

    @property
    def root(self) -> str:
        """The dataset root as a path inside `fs` (no protocol)."""
        return filesystem(self.url, self.storage_options)[1].rstrip("/")

    @property
    def is_local(self) -> bool:
        """True when files can be opened by path directly (no copy needed for PyAV)."""
        return is_local(self.fs)

    def path(self, relative: str) -> str:
        """Path of a file of the dataset inside `fs`."""
        return join(self.root, relative)

    def display(self, relative: str) -> str:
        """A file's URL for error messages (the user's URL plus the relative path)."""
        return join(self.url, relative)

    def read_bytes(self, relative: str) -> bytes:
        """Read a whole (small) file; missing files raise FileNotFoundError naming the URL."""
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.display(relative)} does not exist") from err
        except (PermissionError, IsADirectoryError):
            raise
        except OSError as err:
            raise _unreachable(self, relative, err) from err
        except Exception as err:
            if looks_like_connection_error(err):
                raise _unreachable(self, relative, err) from err
            raise

    def exists(self, relative: str) -> bool:
        """Whether a file of the dataset exists."""
        try:
            return bool(self.fs.exists(self.path(relative)))
        except Exception as err:
            if looks_like_connection_error(err):
                raise _unreachable(self, relative, err) from err
            raise


def _unreachable(storage: Storage, relative: str, err: BaseException) -> StorageUnavailableError:
    endpoint = (storage.storage_options.get("client_kwargs") or {}).get("endpoint_url")
    where = f" (endpoint {endpoint})" if endpoint else ""
    return StorageUnavailableError(
        f"cannot reach storage for {storage.display(relative)}{where}: {err}. "
        "Check the URL, the endpoint and the network, then retry."
    )


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock shared by all processes of the node (flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class FileCache:
    """A size-bounded local copy of remote files, safe to share between processes of a node.

    Entries are named by a hash of the source URL and size, so a changed remote file is a new
    entry. The least recently used entries (by mtime, refreshed on every hit) are evicted
    when the total exceeds `max_bytes`; a process that already opened an evicted file keeps
    reading it (POSIX unlink semantics).
    """

    directory: Path = DEFAULT_CACHE_DIR / "files"
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    # (dataset URL, relative path) -> size, asked of remote storage once per reader, not at
    # every frame read (a HEAD request on S3): a dataset's files do not change while it is
    # read; a new reader (the next run) sees a changed file as a new entry.
    _sizes: dict[tuple[str, str], int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def local_path(self, storage: Storage, relative: str, *, size: int | None = None) -> Path:
        """A local path with the file's content, downloading it once if needed. `size`, when
        known (from a listing), spares asking storage for it."""
        fs = storage.fs
        remote = storage.path(relative)
        if size is not None:
            self._sizes[(storage.url, relative)] = size
        size = self._sizes.get((storage.url, relative))
        if size is None:
            try:
                size = int(fs.size(remote))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{storage.display(relative)} does not exist") from err
            except Exception as err:
                if looks_like_connection_error(err) or isinstance(err, OSError):
                    raise _unreachable(storage, relative, err) from err
                raise
            self._sizes[(storage.url, relative)] = size
        key = hashlib.sha256(f"{storage.url}|{relative}|{size}".encode()).hexdigest()[:32]
        suffix = Path(relative).suffix
        target = self.directory / key[:2] / f"{key}{suffix}"
        if _is_complete(target, size):
            _touch(target)
            return target
        with _locked(_lock_path(target)):
            if not _is_complete(target, size):  # another process may have fetched it meanwhile
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=suffix)
                os.close(fd)
                try:
                    fs.get_file(remote, tmp)
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        _touch(target)
        self.evict(keep=target)
        return target

    def evict(self, *, keep: Path | None = None) -> None:
        """Delete least recently used entries until the cache fits `max_bytes`."""
        with _locked(self.directory / ".evict.lock"):
            entries = []
            for path in self.directory.glob("*/*"):
                if path.name.startswith(".") or path.name.endswith(".lock"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if keep is not None and path == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    total -= size

    def total_bytes(self) -> int:
        """Bytes currently held by complete entries."""
        return sum(
            p.stat().st_size
            for p in self.directory.glob("*/*")
            if not p.name.startswith(".") and not p.name.endswith(".lock")
        )


def _is_complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
