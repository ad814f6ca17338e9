"""The node-local video cache: one download shared by processes, LRU eviction under a bound."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from smolvla_ray.data.storage import FileCache, Storage


def _fetch(args: tuple[str, str, str]) -> tuple[str, int]:
    cache_dir, url, relative = args
    path = FileCache(Path(cache_dir)).local_path(Storage(url), relative)
    return str(path), path.stat().st_ino


def test_processes_share_one_download(tmp_path: Path) -> None:
    source = tmp_path / "remote"
    (source / "videos").mkdir(parents=True)
    payload = os.urandom(3_000_000)
    (source / "videos/a.mp4").write_bytes(payload)
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch, [(str(cache), f"file://{source}", "videos/a.mp4")] * 8)
    assert len({path for path, _ in results}) == 1
    assert len({inode for _, inode in results}) == 1  # nobody replaced it after the first
    assert Path(results[0][0]).read_bytes() == payload
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and p.name.startswith(".part")]
    assert leftovers == []


def test_lru_eviction_keeps_recent_entries(tmp_path: Path) -> None:
    url = f"memory://cache-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in "abcd":
        fs.pipe(f"{url[len('memory://') :]}/{name}.mp4", bytes([ord(name)]) * 1000)
    storage = Storage(url)
    cache = FileCache(tmp_path / "cache", max_bytes=2500)
    a = cache.local_path(storage, "a.mp4")
    b = cache.local_path(storage, "b.mp4")
    os.utime(a, (1, 1))  # a is the least recently used
    c = cache.local_path(storage, "c.mp4")
    assert not a.exists() and b.exists() and c.exists()
    assert cache.total_bytes() <= 2500
    assert cache.local_path(storage, "b.mp4") == b  # a hit, no new copy
    d = cache.local_path(storage, "d.mp4")
    assert d.read_bytes() == b"d" * 1000 and cache.total_bytes() <= 2500


def test_changed_remote_file_is_a_new_entry(tmp_path: Path) -> None:
    url = f"memory://cache-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url[len('memory://') :]}/v.mp4", b"old")
    cache = FileCache(tmp_path / "cache")
    first = cache.local_path(Storage(url), "v.mp4")
    fs.pipe(f"{url[len('memory://') :]}/v.mp4", b"newer")
    # Another reader of the same node cache (the next run): one reader asks a file's size
    # once, so a file changed under a reader is seen by the next one.
    second = FileCache(tmp_path / "cache").local_path(Storage(url), "v.mp4")
    assert first != second and second.read_bytes() == b"newer"


def test_a_remote_file_size_is_asked_once_per_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every frame read goes through local_path: the remote size (a HEAD request on S3) must
    # not be asked each time.
    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://sizes-{uuid.uuid4().hex}"
    MemoryFileSystem().pipe_file(f"{url}/videos/a.mp4", b"x" * 100)
    asked: list[str] = []
    size = MemoryFileSystem.size
    monkeypatch.setattr(MemoryFileSystem, "size", lambda fs, p: asked.append(p) or size(fs, p))
    cache, storage = FileCache(tmp_path / "cache"), Storage(url)
    paths = {cache.local_path(storage, "videos/a.mp4") for _ in range(5)}
    assert len(paths) == 1 and next(iter(paths)).read_bytes() == b"x" * 100
    assert len(asked) == 1, asked
