"""Hugging Face Hub stand-ins for tests, with no network: a cache laid out as huggingface_hub
writes it, and a loopback HTTP server answering the few Hub API calls huggingface_hub makes
to download a snapshot (repo info, tree listing, file resolve), counting the file downloads.

Cache layout (huggingface_hub's): `<cache>/<type>s--<owner>--<name>/` holds `blobs/<etag>`
(git blob sha1, or sha256 for large files as LFS does), `snapshots/<commit>/<path>` as
relative symlinks to the blobs, `refs/<revision>` holding the commit, and
`trees/<commit>.json`, the commit's file listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".mp4", ".parquet", ".bin")


def commit_of(seed: str) -> str:
    """A 40-hex commit id, stable for `seed`."""
    return hashlib.sha1(seed.encode()).hexdigest()


def blob_id(path: str, content: bytes) -> str:
    """The ETag the Hub gives a file: sha256 for LFS files, else the git blob sha1."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def read_tree(root: str | Path) -> dict[str, bytes]:
    """Every file under `root` by its relative POSIX path."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def write_cached_repo(
    cache: str | Path,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    commit: str,
    repo_type: str = "model",
    refs: tuple[str, ...] = ("main",),
    listing: bool = True,
) -> Path:
    """Lay out `files` at `commit` in the hub cache `cache`; returns the snapshot folder.
    `listing=False` leaves out `trees/<commit>.json` (as single-file downloads do)."""
    folder = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    tree = {}
    for path, content in files.items():
        etag = blob_id(path, content)
        blob = folder / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
        entry = {"size": len(content), "blob_id": etag}
        if path.endswith(LFS_SUFFIXES):
            entry.update(lfs_sha256=etag, lfs_size=len(content))
        tree[path] = entry
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes
    if listing:
        (folder / "trees").mkdir(parents=True, exist_ok=True)
        trees = {"format_version": 1, "files": dict(sorted(tree.items()))}
        (folder / "trees" / f"{commit}.json").write_text(json.dumps(trees, indent=1))
    return snapshot


@dataclass
class Repo:
    """A repo on the fake Hub: files per commit and branch/tag -> commit."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """A loopback Hub for huggingface_hub (`HF_ENDPOINT=hub.url`); `downloads` counts file
    bodies served per (repo id, commit, path)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.downloads: Counter[tuple[str, str, str]] = Counter()
        self._server: ThreadingHTTPServer | None = None

    def add(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        commit: str,
        repo_type: str = "model",
        refs: tuple[str, ...] = ("main",),
    ) -> None:
        repo = self.repos.setdefault((repo_type, repo_id), Repo())
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def lookup(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, str] | None:
        """(error code, None) or (None, commit)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return "RepoNotFound", ""
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            return "RevisionNotFound", ""
        return None, commit


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$")
_RESOLVE = re.compile(r"^(?:/(datasets))?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: Mapping[str, str] = {},
            *,
            head: bool = False,
        ) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, code: str, *, head: bool = False) -> None:
            self._send(
                404,
                json.dumps({"error": code}).encode(),
                {"X-Error-Code": code, "Content-Type": "application/json"},
                head=head,
            )

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if match := _API.match(path):
                kind, repo_id, what, revision, _ = match.groups()
                repo_type = kind[:-1]
                error, commit = hub.lookup(repo_type, repo_id, revision)
                if error:
                    return self._error(error, head=head)
                files = hub.repos[(repo_type, repo_id)].commits[commit]
                if what == "revision":
                    body = {
                        "id": repo_id,
                        "sha": commit,
                        "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    }
                else:
                    body = [
                        {"type": "file", "oid": blob_id(p, c), "size": len(c), "path": p}
                        for p, c in sorted(files.items())
                    ]
                return self._send(
                    200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head=head
                )
            if match := _RESOLVE.match(path):
                kind, repo_id, revision, file = match.groups()
                repo_type = "dataset" if kind else "model"
                error, commit = hub.lookup(repo_type, repo_id, revision)
                if error:
                    return self._error(error, head=head)
                files = hub.repos[(repo_type, repo_id)].commits[commit]
                if file not in files:
                    return self._error("EntryNotFound", head=head)
                content = files[file]
                headers = {
                    "X-Repo-Commit": commit,
                    "ETag": f'"{blob_id(file, content)}"',
                    "Content-Type": "application/octet-stream",
                }
                if not head:
                    hub.downloads[(repo_id, commit, file)] += 1
                return self._send(200, content, headers, head=head)
            self._send(404, b"not found")

    return Handler


def iter_lines(path: str | Path) -> Iterator[str]:
    """Lines of a fetch log (none when it was never written)."""
    p = Path(path)
    if p.exists():
        yield from p.read_text().splitlines()
