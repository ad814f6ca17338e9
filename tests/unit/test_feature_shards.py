"""Reading the feature cache's shards through a node's bounded LRU file cache
(smolvla_ray/cache/store.py): one download per node however many processes read a shard,
and a shard evicted and fetched again reads the same, from real safetensors files."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import torch
from safetensors.torch import save, save_file

from smolvla_ray.cache.store import CachedFeatures, FeatureShards, shard_name
from smolvla_ray.data.storage import FileCache, Storage
from smolvla_ray.keys import FEATURES_SUFFIX

CAMERA = "observation.images.top"


def features(episode: int, frames: int = 3) -> torch.Tensor:
    """Episode `episode`'s cached features: (frames, tokens, hidden), distinct per episode."""
    return torch.arange(frames * 2 * 4, dtype=torch.float32).reshape(frames, 2, 4) + 100 * episode


def frame_rows(episode: int, frames: int = 3) -> list[dict[str, torch.Tensor]]:
    """What a video-free FrameDataset yields for `episode`, as far as CachedFeatures reads."""
    return [
        {"episode_index": torch.tensor(episode), "frame_index": torch.tensor(f)}
        for f in range(frames)
    ]


@contextlib.contextmanager
def http_storage(root: Path) -> Iterator[tuple[str, Counter[str]]]:
    """`root` served over HTTP on loopback (remote storage to fsspec), counting the GETs."""
    gets: Counter[str] = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            gets[self.path] += 1
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gets
    finally:
        server.shutdown()
        server.server_close()


def _read_episode(args: tuple[str, str]) -> torch.Tensor:
    """A loader process of the node: reads every frame of episode 7 through the node cache."""
    url, node = args
    shards = FeatureShards(Storage(url), FileCache(Path(node) / "features"))
    dataset = CachedFeatures(frame_rows(7), shards, [CAMERA])  # type: ignore[arg-type]
    return torch.stack([dataset[i][f"{CAMERA}{FEATURES_SUFFIX}"] for i in range(3)])


def test_the_processes_of_a_node_download_a_shard_once(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    save_file({CAMERA: features(7)}, str(remote / shard_name(7)))
    with (
        http_storage(remote) as (url, gets),
        multiprocessing.get_context("spawn").Pool(4) as pool,
    ):
        results = pool.map(_read_episode, [(url, str(tmp_path / "node"))] * 8)
    assert gets[f"/{shard_name(7)}"] == 1, gets
    for result in results:
        torch.testing.assert_close(result, features(7), rtol=0, atol=0)
    held = list((tmp_path / "node" / "features").rglob("*.safetensors"))
    assert len(held) == 1 and held[0].read_bytes() == (remote / shard_name(7)).read_bytes()


def test_a_shard_evicted_and_fetched_again_reads_the_same(tmp_path: Path) -> None:
    # A bound that holds one shard of two: reading episode 1 evicts episode 0's shard, which
    # this process still holds open; reading episode 0 again fetches it anew.
    url = f"memory://feature-shards-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for episode in (0, 1):
        fs.pipe(f"{url}/{shard_name(episode)}", save({CAMERA: features(episode)}))
    size = len(fs.cat(f"{url}/{shard_name(0)}"))
    cache = FileCache(tmp_path / "features", max_bytes=size * 3 // 2)
    shards = FeatureShards(Storage(url), cache)
    dataset = CachedFeatures([*frame_rows(0), *frame_rows(1)], shards, [CAMERA])  # type: ignore[arg-type]
    key = f"{CAMERA}{FEATURES_SUFFIX}"

    def read(row: int) -> torch.Tensor:
        return dataset[row][key]

    assert shards.warm([0, 1], max_bytes=size - 1) == 0  # within a budget (a mixture's)
    assert cache.total_bytes() == 0
    assert shards.warm([0, 1]) == size  # warming stops at the bound: episode 0 held
    first = shards.path(0)
    inode = first.stat().st_ino
    assert torch.equal(read(0), features(0)[0])
    assert torch.equal(read(4), features(1)[1])  # episode 1 in, episode 0 evicted
    assert not first.exists() and cache.total_bytes() <= cache.max_bytes
    assert torch.equal(read(2), features(0)[2])  # fetched again, under the same name
    assert first.exists() and first.stat().st_ino != inode
    assert list(dataset._open) == [0]  # the handles of evicted files were let go
    assert cache.total_bytes() <= cache.max_bytes


def test_a_local_cache_is_read_in_place(tmp_path: Path) -> None:
    save_file({CAMERA: features(3)}, str(tmp_path / shard_name(3)))
    node = tmp_path / "node"
    shards = FeatureShards(Storage(str(tmp_path)), FileCache(node))
    assert shards.warm([3]) == 0  # nothing held on the node: read in place
    assert shards.path(3) == tmp_path / shard_name(3)
    dataset = CachedFeatures(frame_rows(3), shards, [CAMERA])  # type: ignore[arg-type]
    assert torch.equal(dataset[1][f"{CAMERA}{FEATURES_SUFFIX}"], features(3)[1])
    assert not node.exists()  # nothing copied
