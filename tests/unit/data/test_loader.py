"""Sharding, ordering and exact resumption of the loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

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
            assert len(shards[0] | shards[1]) == n - n % 8  # the rows after the last global batch
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


class _Rows(Dataset):
    """`n` rows whose sample is its row number: the loader's order without any decoding."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> dict:
        return {"index": torch.tensor(row)}


def _global_batches(
    world_size: int,
    num_batches: int,
    *,
    global_batch: int = 8,
    cursor: dict | None = None,
    drop_last: bool = True,
    n: int = 75,
) -> tuple[list[list[int]], dict]:
    """The next `num_batches` global batches of `world_size` ranks sharing `global_batch`
    (from `cursor`): each the rows of all ranks, put back in the epoch's order (rank r holds
    every world_size-th row from the r-th); and the cursor after them (the same on every
    rank)."""
    settings = {"seed": 9, "drop_last": drop_last, "cursor": cursor}
    per_worker = global_batch // world_size
    loaders = [
        ShardedLoader(_Rows(n), batch_size=per_worker, rank=r, world_size=world_size, **settings)
        for r in range(world_size)
    ]
    per_rank = [_indices(loader, num_batches) for loader in loaders]
    batches = []
    for b in range(num_batches):
        rows = [-1] * global_batch
        for rank in range(world_size):
            rows[rank::world_size] = per_rank[rank][b]
        batches.append(rows)
    cursors = [loader.cursor() for loader in loaders]
    assert all(c == cursors[0] for c in cursors)
    return batches, json.loads(json.dumps(cursors[0]))  # as a checkpoint stores it


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_global_step_holds_the_same_rows_on_1_2_and_4_workers(drop_last: bool) -> None:
    """75 rows, a global batch of 8 (8 x 1, 4 x 2, 2 x 4 workers): 9 batches an epoch, the 3
    rows after the last whole batch go to nobody (with drop_last; without it the order wraps
    to fill a 10th), whatever the world size. Steps of 2 micro-batches (gradient
    accumulation) then hold the same rows too, with drop_last the step that straddles the
    epoch's end (its 9th batch and the next epoch's 1st) included."""
    per_epoch = 9 if drop_last else 10
    total = 2 * per_epoch + 3  # across two epoch boundaries
    reference, _ = _global_batches(1, total, drop_last=drop_last)
    for world_size in (2, 4):
        batches, _ = _global_batches(world_size, total, drop_last=drop_last)
        assert batches == reference, world_size
    # Batch b of an epoch is the contiguous block b of the epoch's order.
    loader = ShardedLoader(_Rows(75), batch_size=2, world_size=4, seed=9, drop_last=drop_last)
    assert loader.batches_per_epoch == per_epoch
    for position, rows in enumerate(reference):
        epoch, batch = divmod(position, per_epoch)
        order = np.resize(loader.epoch_order(epoch), per_epoch * 8)
        block = order[batch * 8 : (batch + 1) * 8].tolist()
        assert rows == block == loader.global_batch_rows(epoch, batch).tolist()
    epoch_rows = {row for rows in reference[:per_epoch] for row in rows}
    assert len(epoch_rows) == (72 if drop_last else 75)  # no row twice (drop_last), or all
    steps = [sorted(reference[i] + reference[i + 1]) for i in range(0, total - 1, 2)]
    for world_size in (2, 4):
        batches, _ = _global_batches(world_size, total, drop_last=drop_last)
        assert [sorted(batches[i] + batches[i + 1]) for i in range(0, total - 1, 2)] == steps


@pytest.mark.parametrize(("written", "read"), [(2, 1), (1, 4), (4, 2), (2, 2)])
def test_a_cursor_written_on_one_world_size_resumes_on_another(written: int, read: int) -> None:
    """The cursor is (epoch, global offset): a checkpoint of 2 workers resumes on 1 (or 4)
    with the global batch that would have come next, mid-epoch, at an epoch's end and in the
    next epoch."""
    total = 21
    reference, _ = _global_batches(1, total)
    for stop in (3, 9, 11):
        first, cursor = _global_batches(written, stop)
        assert cursor["epoch"] == stop // 9 and cursor["offset"] == stop % 9 * 8
        rest, _ = _global_batches(read, total - stop, cursor=cursor)
        assert first + rest == reference, (written, read, stop)


def test_a_version_1_cursor_resumes_on_another_world_size() -> None:
    """Cursors of checkpoints written before cursors were global: (epoch, batch of that
    world size)."""
    reference, _ = _global_batches(1, 21)
    old = {"version": 1, "epoch": 1, "batch": 2, "seed": 9, "world_size": 2, "batch_size": 4,
           "num_samples": 75, "drop_last": True, "shuffle": True}  # fmt: skip
    rest, _ = _global_batches(4, 21 - 11, cursor=old)
    assert rest == reference[11:]


def test_cursor_after_each_batch(dataset: FrameDataset) -> None:
    loader = ShardedLoader(dataset, batch_size=16, seed=0)
    it = iter(loader)
    assert loader.cursor()["epoch"] == 0 and loader.cursor()["offset"] == 0
    for step in range(1, loader.batches_per_epoch + 2):
        next(it)
        epoch, batch = divmod(step, loader.batches_per_epoch)
        assert (loader.cursor()["epoch"], loader.cursor()["offset"]) == (epoch, batch * 16)


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
    with pytest.raises(
        ValueError, match=r"global batches of 4 samples but this loader's is batch_size=8 x"
    ):
        ShardedLoader(dataset, batch_size=8, seed=1, cursor=cursor)
    with pytest.raises(ValueError, match=r"batch_size=4 x world_size=2 = 8; resume with a"):
        ShardedLoader(dataset, batch_size=4, seed=1, world_size=2, cursor=cursor)
    with pytest.raises(ValueError, match=r"seed=1 but this loader has seed=2"):
        ShardedLoader(dataset, batch_size=4, seed=2, cursor=cursor)
    with pytest.raises(ValueError, match=r"offset=6 is invalid \(offsets are multiples of 4"):
        ShardedLoader(dataset, batch_size=4, seed=1, cursor={**cursor, "offset": 6})
    with pytest.raises(ValueError, match="not a version-2 loader cursor"):
        ShardedLoader(dataset, batch_size=4, cursor={"epoch": 1})
    with pytest.raises(ValueError, match="not a version-1 loader cursor"):
        ShardedLoader(dataset, batch_size=4, cursor={"version": 1, "epoch": 1})
    with pytest.raises(ValueError, match="rank=2 must be in 0..world_size-1"):
        ShardedLoader(dataset, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"fewer than one global batch \(batch_size=40 x world"):
        ShardedLoader(dataset, batch_size=40, world_size=2)


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
