"""Hugging Face Hub ids for the base policy and the dataset: checked before Ray starts,
pinned to a commit for the run (a job spec's, by the driver's `prepare.py`), fetched at most
once per node into the Hugging Face cache.

`policy.pretrained: owner/name` (with `policy.revision`) is materialised with
huggingface_hub into its own cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`), under a file lock so
the processes of one node download it once; later processes (other workers, restarts,
export) find it there without touching the network. `data.uri: owner/name` (or
`hf://datasets/owner/name`, with `data.revision`) is read from the cached snapshot when the
cache holds it (so `HF_HUB_OFFLINE=1` works), else through huggingface_hub's `HfFileSystem`
at the pinned commit, which the dataset reader streams through its own node-local file cache
like any other URL. Nothing here imports torch; huggingface_hub is imported when needed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

log = logging.getLogger(__name__)

RepoType = Literal["model", "dataset"]
DEFAULT_REVISION = "main"
# Tests (and operators) count real downloads: one line per fetch is appended to this file.
FETCH_LOG_ENV = "SMOLVLA_RAY_HUB_FETCH_LOG"
MODEL_FILES = ("config.json", "model.safetensors")
DATASET_MARKER = "meta/info.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_DATASET_URL = re.compile(r"^hf://datasets/([^/@]+/[^/@]+?)(?:@([^/]+))?/?$")
T = TypeVar("T")


class HubIdError(FileNotFoundError):
    """A hub repo or revision that does not exist, or (offline) is not in the local cache."""


def is_hub_id(value: str | None) -> bool:
    """`owner/name` that is not an existing local path (and not a URL)."""
    if not value or "://" in value or value.startswith((".", "/", "~")):
        return False
    return bool(_REPO_ID.match(value)) and not os.path.exists(value)


def dataset_repo(uri: str) -> tuple[str, str | None] | None:
    """(repo id, revision in the URL) when `uri` names a hub dataset: `owner/name` or
    `hf://datasets/owner/name[@revision]`; None for any other path or URL."""
    if is_hub_id(uri):
        return uri, None
    match = _HF_DATASET_URL.match(uri)
    if match is None:
        return None
    return match.group(1), match.group(2)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache of this process, read from the environment at call time
    (huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _endpoint() -> str | None:
    """`HF_ENDPOINT` at call time (a mirror or a test's local Hub); None = huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or None


def is_offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: only the local cache is used."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.upper() in {"1", "ON", "YES", "TRUE"}


def _repo_folder(repo_id: str, repo_type: RepoType) -> Path:
    return hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _describe(repo_id: str, repo_type: RepoType, revision: str) -> str:
    field = "policy.pretrained" if repo_type == "model" else "data.uri"
    rev = "policy.revision" if repo_type == "model" else "data.revision"
    return f"{field}={repo_id!r} at {rev}={revision!r}"


def _not_cached(repo_id: str, repo_type: RepoType, revision: str) -> HubIdError:
    return HubIdError(
        f"{_describe(repo_id, repo_type, revision)} is not in the Hugging Face cache "
        f"{hub_cache_dir()} and HF_HUB_OFFLINE is set. Download it once with network "
        f"(huggingface-cli download {repo_id} --revision {revision}"
        + (" --repo-type dataset" if repo_type == "dataset" else "")
        + "), point HF_HOME at a cache that has it, or unset HF_HUB_OFFLINE"
    )


def _cached_ref(repo_id: str, repo_type: RepoType, revision: str) -> str | None:
    """The commit a branch or tag pointed to when it was last resolved into the cache."""
    ref = _repo_folder(repo_id, repo_type) / "refs" / revision
    with contextlib.suppress(OSError):
        commit = ref.read_text().strip()
        if _COMMIT.match(commit):
            return commit
    return None


def _write_ref(repo_id: str, repo_type: RepoType, revision: str, commit: str) -> None:
    """Record revision -> commit as huggingface_hub does (`refs/<revision>` holds the
    commit), so a later offline run can resolve the same revision name."""
    if _cached_ref(repo_id, repo_type, revision) == commit:
        return
    ref = _repo_folder(repo_id, repo_type) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=".ref-")
        with os.fdopen(fd, "w") as handle:
            handle.write(commit)
        os.replace(tmp, ref)
    except OSError as err:  # a read-only cache still works; only offline reuse is lost
        log.warning("could not record %s -> %s in %s: %s", revision, commit, ref, err)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of the HTTP client huggingface_hub talks through: httpx for
    huggingface_hub 1.x (LeRobot 0.6.1's), httpx2 for 2.x; whichever are installed."""
    errors: list[type[BaseException]] = []
    for client in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _hub_call(repo_id: str, repo_type: RepoType, revision: str, call: Callable[[], T]) -> T:
    """Run a huggingface_hub call, turning a missing repo or revision into HubIdError and
    an unreachable Hub into ConnectionError, each naming the spec field and the fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = _describe(repo_id, repo_type, revision)
    try:
        return call()
    except RepositoryNotFoundError as err:
        kind = "dataset" if repo_type == "dataset" else "model"
        raise HubIdError(
            f"{what}: no such {kind} repo on the Hub (or it is private or gated: set HF_TOKEN), "
            f"and no local directory {repo_id!r} exists. Check the id or the path"
        ) from err
    except RevisionNotFoundError as err:
        raise HubIdError(
            f"{what}: the repo has no such revision. Give an existing branch, tag or commit "
            "(default: main)"
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{what}: {err}") from err
    except (*_transport_errors(), HfHubHTTPError, OfflineModeIsEnabled) as err:
        raise ConnectionError(
            f"{what}: cannot reach the Hugging Face Hub ({type(err).__name__}: {err}). Check "
            "the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the local cache; "
            f"no local directory {repo_id!r} exists either"
        ) from err


def resolve_commit(repo_id: str, repo_type: RepoType, revision: str | None) -> str:
    """The commit `revision` (branch, tag or commit; None = main) names.

    A commit is taken as it is when the cache holds its snapshot; otherwise (and for
    branches and tags) the Hub answers, and offline the cache's `refs/<revision>` does.
    Raises HubIdError for a missing repo or revision (offline: missing from the cache)."""
    rev = revision or DEFAULT_REVISION
    is_commit = bool(_COMMIT.match(rev))
    if is_commit and (_repo_folder(repo_id, repo_type) / "snapshots" / rev).is_dir():
        return rev
    if is_offline():
        cached = rev if is_commit else _cached_ref(repo_id, repo_type, rev)
        if cached is None or not (_repo_folder(repo_id, repo_type) / "snapshots" / cached).is_dir():
            raise _not_cached(repo_id, repo_type, rev)
        return cached
    from huggingface_hub import HfApi

    def ask() -> str:
        info = HfApi(endpoint=_endpoint()).repo_info(repo_id, repo_type=repo_type, revision=rev)
        return str(info.sha)

    try:
        commit = _hub_call(repo_id, repo_type, rev, ask)
    except ConnectionError:
        cached = None if is_commit else _cached_ref(repo_id, repo_type, rev)
        if cached is None:
            raise
        log.warning(
            "the Hub is unreachable; %s resolves to cached commit %s",
            _describe(repo_id, repo_type, rev),
            cached,
        )
        return cached
    if not is_commit:
        _write_ref(repo_id, repo_type, rev, commit)
    return commit


def _record_fetch(repo_type: RepoType, repo_id: str, commit: str, what: str) -> None:
    line = f"{repo_type} {repo_id} {commit} {what} host={socket.gethostname()} pid={os.getpid()}"
    log.info("fetched from the Hub: %s", line)
    path = os.environ.get(FETCH_LOG_ENV)
    if path:
        with open(path, "a") as handle:  # one short O_APPEND write per line: no interleaving
            handle.write(line + "\n")


@contextlib.contextmanager
def _node_lock(repo_id: str, repo_type: RepoType, commit: str):
    """One downloader per repo and commit among the processes of this node."""
    from filelock import FileLock

    locks = hub_cache_dir() / ".locks" / "smolvla_ray"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{repo_type}s--{repo_id.replace('/', '--')}--{commit}.lock")):
        yield


def _cached_snapshot(
    repo_id: str, repo_type: RepoType, commit: str, required: tuple[str, ...]
) -> Path | None:
    """The cached snapshot folder of `commit` when it holds `required` (and, when
    huggingface_hub recorded the commit's file list, every listed file)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=commit,
                cache_dir=hub_cache_dir(),
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:  # includes an incomplete snapshot
        return None
    # A snapshot that only single-file downloads wrote has no file list to check against.
    return folder if all((folder / name).is_file() for name in required) else None


def model_snapshot(repo_id: str, *, revision: str | None = None) -> Path:
    """The local snapshot of a model repo at `revision`, downloaded into the Hugging Face
    cache at most once per node (a file lock; later callers find it cached)."""
    commit = resolve_commit(repo_id, "model", revision)
    found = _cached_snapshot(repo_id, "model", commit, MODEL_FILES)
    if found is not None:
        return found
    if is_offline():
        raise _not_cached(repo_id, "model", revision or DEFAULT_REVISION)
    from huggingface_hub import snapshot_download

    with _node_lock(repo_id, "model", commit):
        found = _cached_snapshot(repo_id, "model", commit, MODEL_FILES)
        if found is not None:  # another process of this node fetched it meanwhile
            return found
        path = _hub_call(
            repo_id,
            "model",
            revision or DEFAULT_REVISION,
            lambda: snapshot_download(
                repo_id, revision=commit, cache_dir=hub_cache_dir(), endpoint=_endpoint()
            ),
        )
        _record_fetch("model", repo_id, commit, "snapshot")
    return Path(path)


def model_file(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """One file of a model repo (e.g. config.json for the pre-start checks) without the
    weights: from the cache, else downloaded into it once per node."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    commit = resolve_commit(repo_id, "model", revision)
    cache = hub_cache_dir()

    def local() -> Path | None:
        with contextlib.suppress(LocalEntryNotFoundError):
            return Path(
                hf_hub_download(
                    repo_id, filename, revision=commit, cache_dir=cache, local_files_only=True
                )
            )
        return None

    found = local()
    if found is not None:
        return found
    if is_offline():
        raise _not_cached(repo_id, "model", revision or DEFAULT_REVISION)
    with _node_lock(repo_id, "model", commit):
        found = local()
        if found is not None:
            return found
        path = _hub_call(
            repo_id,
            "model",
            revision or DEFAULT_REVISION,
            lambda: hf_hub_download(
                repo_id, filename, revision=commit, cache_dir=cache, endpoint=_endpoint()
            ),
        )
        _record_fetch("model", repo_id, commit, filename)
    return Path(path)


def dataset_url(uri: str, revision: str | None = None) -> str:
    """Where to read `data.uri` from: itself for a path or URL; for a hub dataset, its
    cached snapshot folder when the cache holds it, else `hf://datasets/<id>@<commit>`."""
    repo = dataset_repo(uri)
    if repo is None:
        return uri
    repo_id, in_url = repo
    if in_url is not None and revision is not None and in_url != revision:
        raise ValueError(
            f"data.uri={uri!r} names revision {in_url!r} but data.revision={revision!r}; "
            "give the revision in one place"
        )
    rev = in_url or revision
    commit = resolve_commit(repo_id, "dataset", rev)
    found = _cached_snapshot(repo_id, "dataset", commit, (DATASET_MARKER,))
    if found is not None:
        return str(found)
    if is_offline():
        raise _not_cached(repo_id, "dataset", rev or DEFAULT_REVISION)
    return f"hf://datasets/{repo_id}@{commit}"


_SNAPSHOT = re.compile(
    r"/datasets--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$"
)


def canonical_dataset_url(url: str) -> str:
    """`hf://datasets/owner/name@commit` for a dataset snapshot in a Hugging Face cache
    (whatever `HF_HOME` it sits in), else `url` unchanged: the identity of a hub dataset
    does not depend on where a node keeps its cache."""
    match = _SNAPSHOT.search(url)
    if match is None:
        return url
    return f"hf://datasets/{match['owner']}/{match['name']}@{match['commit']}"


def model_commit(pretrained: str | None, revision: str | None) -> str | None:
    """The commit a hub `policy.pretrained` resolves to; None for a path, URL or preset."""
    if not is_hub_id(pretrained):
        return None
    return resolve_commit(str(pretrained), "model", revision)
