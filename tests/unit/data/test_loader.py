"""Sharding, ordering and exact resumption of the loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.samples import FrameDataset

from .conftest import Demo


@pytest.fixture(scope="module")
def dataset(demo_v30: Demo) -> FrameDataset:
    return FrameDataset(demo_v30.root, episodes=range(4), chunk_size=8)  # 75 frames


def _indices(loader: ShardedLoader, num_batches: int) -> list[list[int]]:
    it = iter(loader)
    return [next(it)["index"].tolist() for _ in range(num_batches)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_are_disjoint_and_cover_the_epoch(dataset: FrameDataset, drop_last: bool) -> None:
    n = len(dataset)
    assert n % 2 == 1  # an odd count exercises the remainder
    loaders = [
        ShardedLoader(dataset, batch_size=4, rank=r, world_size=2, seed=3, drop_last=drop_last)
        for r in range(2)
    ]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch
    for epoch in (0, 1):
        shards = [set(loader.shard(epoch).tolist()) for loader in loaders]
        if drop_last:
            assert shards[0].isdisjoint(shards[1])
            assert len(shards[0] | shards[1]) == n - 1  # only the remainder row is left out
        else:
            assert shards[0] | shards[1] == set(range(n))  # every row, one wraps around
    # And the batches themselves: rank 0 and rank 1 of epoch 0 share no sample.
    per_epoch = loaders[0].batches_per_epoch
    seen = [[i for batch in _indices(loader, per_epoch) for i in batch] for loader in loaders]
    if drop_last:
        assert set(seen[0]).isdisjoint(seen[1])


def test_order_is_set_by_seed_and_epoch(dataset: FrameDataset) -> None:
    a = ShardedLoader(dataset, batch_size=4, seed=1)
    b = ShardedLoader(dataset, batch_size=4, seed=1)
    c = ShardedLoader(dataset, batch_size=4, seed=2)
    np.testing.assert_array_equal(a.shard(0), b.shard(0))
    assert not np.array_equal(a.shard(0), c.shard(0))
    assert not np.array_equal(a.shard(0), a.shard(1))
    assert sorted(a.epoch_order(5).tolist()) == list(range(len(dataset)))


def test_resume_continues_exactly_across_epochs(dataset: FrameDataset) -> None:
    per_epoch = ShardedLoader(dataset, batch_size=8, seed=7).batches_per_epoch
    total = per_epoch + 5  # crosses an epoch boundary
    reference = _indices(ShardedLoader(dataset, batch_size=8, seed=7), total)
    for stop in (0, 3, per_epoch - 1, per_epoch, per_epoch + 2):
        loader = ShardedLoader(dataset, batch_size=8, seed=7, num_workers=2)
        first = _indices(loader, stop)
        cursor = json.loads(json.dumps(loader.cursor()))  # what a checkpoint stores
        resumed = ShardedLoader(dataset, batch_size=8, seed=7, num_workers=1, cursor=cursor)
        assert first + _indices(resumed, total - stop) == reference, stop
    assert reference[per_epoch] != reference[0]  # the second epoch is reshuffled


def test_cursor_after_each_batch(dataset: FrameDataset) -> None:
    loader = ShardedLoader(dataset, batch_size=16, seed=0)
    it = iter(loader)
    assert loader.cursor()["epoch"] == 0 and loader.cursor()["batch"] == 0
    for step in range(1, loader.batches_per_epoch + 2):
        next(it)
        expected = divmod(step, loader.batches_per_epoch)
        assert (loader.cursor()["epoch"], loader.cursor()["batch"]) == expected


def test_background_workers_give_the_same_batches(dataset: FrameDataset) -> None:
    a = iter(ShardedLoader(dataset, batch_size=4, seed=5, num_workers=0))
    b = iter(ShardedLoader(dataset, batch_size=4, seed=5, num_workers=2))
    for _ in range(6):
        x, y = next(a), next(b)
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key]


def test_batch_transform_runs_in_the_main_process(dataset: FrameDataset) -> None:
    calls = []  # a closure over a local list does not pickle: it must not need to

    def transform(batch: dict) -> dict:
        calls.append(len(batch["task"]))
        return {**batch, "marker": torch.ones(1)}

    loader = ShardedLoader(dataset, batch_size=4, num_workers=2, batch_transform=transform)
    batch = next(iter(loader))
    assert "marker" in batch and calls == [4]


def test_bad_cursor_and_settings_are_rejected(dataset: FrameDataset) -> None:
    cursor = ShardedLoader(dataset, batch_size=4, seed=1).cursor()
    with pytest.raises(ValueError, match=r"batch_size=4 but this loader has batch_size=8"):
        ShardedLoader(dataset, batch_size=8, seed=1, cursor=cursor)
    with pytest.raises(ValueError, match=r"world_size=1 but this loader has world_size=2"):
        ShardedLoader(dataset, batch_size=4, seed=1, world_size=2, cursor=cursor)
    with pytest.raises(ValueError, match="not a version-1 loader cursor"):
        ShardedLoader(dataset, batch_size=4, cursor={"epoch": 1})
    with pytest.raises(ValueError, match="rank=2 must be in 0..world_size-1"):
        ShardedLoader(dataset, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ShardedLoader(dataset, batch_size=10_000)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from smolvla_ray.data.loader import ShardedLoader
    from smolvla_ray.data.samples import FrameDataset
    root, steps, cursor = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    loader = ShardedLoader(FrameDataset(root, chunk_size=8), batch_size=8, seed=11,
                           num_workers=1, cursor=cursor or None)
    it = iter(loader)
    batches = [next(it)["index"].tolist() for _ in range(steps)]
    print(json.dumps({"batches": batches, "cursor": loader.cursor()}))
    """
)


def test_resume_in_a_new_process(demo_v30: Demo) -> None:
    """A killed job restarts in a fresh process from the checkpointed cursor."""

    def run(steps: int, cursor: dict | None) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, demo_v30.root, str(steps), json.dumps(cursor or {})],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole = run(9, None)
    first = run(4, None)
    rest = run(5, first["cursor"])
    assert first["batches"] + rest["batches"] == whole["batches"]
    assert rest["cursor"] == whole["cursor"]
