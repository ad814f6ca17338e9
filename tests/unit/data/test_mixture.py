"""A mixture epoch: drawn by weight (proportions within 3 binomial standard deviations),
fixed by (seed, epoch), each dataset's draws spread over its rows, sharded and resumed by
the same loader cursor as one dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from smolvla_ray.data.loader import ShardedLoader
from smolvla_ray.data.mixture import MixtureDataset, mixture_order
from smolvla_ray.keys import DATASET_INDEX


class Rows(Dataset):
    """`size` samples whose `index` is their row, tagged with a name."""

    def __init__(self, size: int, tag: str) -> None:
        self.size, self.tag = size, tag

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> dict:
        return {"index": torch.tensor(row), "tag": self.tag}


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (0.5, 0.2, 0.3)])
def test_proportions_over_an_epoch_match_the_weights(weights: tuple[float, ...]) -> None:
    """Each dataset's count over an epoch is Binomial(length, p): within 3 standard
    deviations of length x p, for every dataset and each of 5 epochs."""
    sizes = [700, 300, 1000][: len(weights)]
    length = 4000
    p = np.asarray(weights) / sum(weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for epoch in range(5):
        rows = mixture_order(7, epoch, sizes, weights, length)
        counts = np.histogram(rows, bins=offsets)[0]
        for d, count in enumerate(counts):
            sd = math.sqrt(length * p[d] * (1 - p[d]))
            assert abs(count - length * p[d]) <= 3 * sd, (epoch, d, count, length * p[d])


def test_the_order_is_fixed_by_seed_and_epoch_and_spreads_each_dataset() -> None:
    sizes, weights = [50, 20], [1.0, 1.0]
    a = mixture_order(1, 0, sizes, weights, 70)
    np.testing.assert_array_equal(a, mixture_order(1, 0, sizes, weights, 70))
    assert not np.array_equal(a, mixture_order(2, 0, sizes, weights, 70))
    assert not np.array_equal(a, mixture_order(1, 1, sizes, weights, 70))
    # A dataset drawn n times takes n distinct rows while it has them, then starts over.
    second = a[a >= 50] - 50
    first_round = second[:20]
    assert len(set(first_round.tolist())) == len(first_round)
    assert second.min() >= 0 and second.max() < 20


def test_samples_carry_their_dataset_and_are_transformed_by_it() -> None:
    mix = MixtureDataset(
        [Rows(5, "a"), Rows(3, "b")], [1.0, 1.0],
        transforms=[lambda s: {**s, "seen": "A"}, lambda s: {**s, "seen": "B"}],
    )  # fmt: skip
    assert len(mix) == 8
    sample = mix[6]  # dataset b's row 1
    assert (sample["tag"], sample["seen"], int(sample["index"])) == ("b", "B", 1)
    assert int(sample[DATASET_INDEX]) == 1
    assert len(MixtureDataset([Rows(5, "a"), Rows(3, "b")], [1, 1], length=20)) == 20
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        MixtureDataset([Rows(5, "a"), Rows(3, "b")], [1.0, 0.0])


def _global(loader: ShardedLoader, batches: int) -> list[tuple[int, int]]:
    it = iter(loader)
    out = []
    for _ in range(batches):
        batch = next(it)
        out += list(zip(batch[DATASET_INDEX].tolist(), batch["index"].tolist(), strict=True))
    return out


def test_the_loader_shards_and_resumes_a_mixture_exactly() -> None:
    def mix() -> MixtureDataset:
        return MixtureDataset([Rows(13, "a"), Rows(7, "b")], [2.0, 1.0], length=24)

    whole = ShardedLoader(mix(), batch_size=4, seed=5)
    expected = _global(whole, 12)  # two epochs of 6 global batches
    first = ShardedLoader(mix(), batch_size=4, seed=5)
    it = iter(first)
    for _ in range(4):
        next(it)
    cursor = first.cursor()
    assert cursor["num_samples"] == 24 and cursor["offset"] == 16
    resumed = ShardedLoader(mix(), batch_size=4, seed=5, cursor=cursor)
    assert _global(resumed, 8) == expected[16:]
    # On two ranks of 2 the global batches hold the same samples.
    ranks = [ShardedLoader(mix(), batch_size=2, rank=r, world_size=2, seed=5) for r in range(2)]
    per_rank = [_global(loader, 6) for loader in ranks]
    for b in range(6):  # global batch b: both ranks' batch b together, in any order
        together = per_rank[0][2 * b : 2 * b + 2] + per_rank[1][2 * b : 2 * b + 2]
        assert sorted(together) == sorted(expected[4 * b : 4 * b + 4])
