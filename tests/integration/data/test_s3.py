"""The data path against a real S3-compatible server (moto in server mode on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.meta import load_meta
from smolvla_ray.data.samples import FrameDataset
from smolvla_ray.data.storage import FileCache
from smolvla_ray.data.synthetic import write_demo_dataset

SETTINGS = {"num_episodes": 4, "episode_length": 20}


@pytest.fixture(scope="module")
def datasets(s3_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same content as v3.0 and v2.1, on S3 and on local disk."""
    bucket = s3_server.make_bucket("data")
    local = tmp_path_factory.mktemp("local")
    out = {}
    for version in ("v3.0", "v2.1"):
        out[f"s3-{version}"] = write_demo_dataset(
            s3_server.url(bucket, f"demo-{version}"),
            format=version,
            storage_options=s3_server.storage_options,
            **SETTINGS,
        )
        out[f"local-{version}"] = write_demo_dataset(
            str(local / version), format=version, **SETTINGS
        )
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_s3_samples_equal_local_samples(
    s3_server, datasets: dict[str, str], version: str, tmp_path: Path
) -> None:
    cache = FileCache(tmp_path / "cache")
    remote = FrameDataset(
        datasets[f"s3-{version}"], storage_options=s3_server.storage_options, cache=cache
    )
    local = FrameDataset(datasets[f"local-{version}"])
    assert remote.meta.version == version and len(remote) == len(local)
    for row in [0, 19, 20, 21, len(local) - 1, 33, 7]:
        _assert_same(remote[row], local[row])


def test_v30_and_v21_on_s3_are_identical(s3_server, datasets, tmp_path: Path) -> None:
    options = s3_server.storage_options
    a = FrameDataset(datasets["s3-v3.0"], storage_options=options, cache=FileCache(tmp_path / "a"))
    b = FrameDataset(datasets["s3-v2.1"], storage_options=options, cache=FileCache(tmp_path / "b"))
    for row in range(0, len(a), 5):
        _assert_same(a[row], b[row])


def test_videos_are_downloaded_once(s3_server, datasets, tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "cache")
    url = datasets["s3-v3.0"]
    ds = FrameDataset(url, storage_options=s3_server.storage_options, cache=cache)
    for row in range(len(ds)):  # one epoch
        ds[row]
    files = sorted(p for p in cache.directory.rglob("*.mp4"))
    assert len(files) == 2  # one v3.0 file per camera
    inodes = {p: p.stat().st_ino for p in files}
    # A second epoch, and a second dataset object (another loader process on the node):
    again = FrameDataset(url, storage_options=s3_server.storage_options, cache=cache)
    for row in range(0, len(again), 3):
        again[row]
    assert sorted(cache.directory.rglob("*.mp4")) == files
    assert {p: p.stat().st_ino for p in files} == inodes


def test_sharded_resumable_loader_over_s3(s3_server, datasets, tmp_path: Path) -> None:
    ds = FrameDataset(
        datasets["s3-v3.0"],
        storage_options=s3_server.storage_options,
        cache=FileCache(tmp_path / "cache"),
        chunk_size=10,
    )
    loaders = [
        ShardedLoader(ds, batch_size=4, rank=r, world_size=2, seed=4, num_workers=2)
        for r in range(2)
    ]
    per_epoch = loaders[0].batches_per_epoch
    seen = []
    for loader in loaders:
        it = iter(loader)
        seen.append([i for _ in range(per_epoch) for i in next(it)["index"].tolist()])
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * per_epoch * 4
    # Resume rank 1 mid-epoch from a JSON cursor.
    first = ShardedLoader(ds, batch_size=4, rank=1, world_size=2, seed=4, num_workers=2)
    it = iter(first)
    head = [next(it)["index"].tolist() for _ in range(3)]
    cursor = json.loads(json.dumps(first.cursor()))
    resumed = ShardedLoader(ds, batch_size=4, rank=1, world_size=2, seed=4, cursor=cursor)
    it = iter(resumed)
    tail = [next(it)["index"].tolist() for _ in range(per_epoch - 3)]
    assert [i for b in head + tail for i in b] == seen[1]


def test_missing_dataset_on_s3(s3_server, s3_bucket: str) -> None:
    url = s3_server.url(s3_bucket, "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"nothing-here/meta/info.json does not exist"):
        load_meta(url, storage_options=s3_server.storage_options)


def test_stats_on_s3_equal_local(s3_server, datasets) -> None:
    remote = load_meta(datasets["s3-v2.1"], storage_options=s3_server.storage_options)
    local = load_meta(datasets["local-v3.0"])
    for key in local.stats:
        np.testing.assert_array_equal(remote.stats[key]["mean"], local.stats[key]["mean"])
