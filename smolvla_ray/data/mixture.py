"""A weighted mixture of datasets as one dataset whose epochs are drawn by weight.

An epoch of a mixture is a fixed sequence of `length` global rows, a pure function of
(seed, epoch): each position picks a dataset with probability weight / sum(weights)
(independent draws, so dataset d's count over an epoch is Binomial(length, p_d)), and the
k-th pick of dataset d takes the k-th row of a permutation of d's rows keyed by
(seed, epoch, d) (a fresh permutation each time it runs out, so a dataset drawn more often
than it has rows repeats rows as evenly as it can). A global row is the dataset's offset
plus its row, so rows of different datasets never collide.

`ShardedLoader` takes the order from `MixtureDataset.epoch_order` instead of its own
permutation and shards, batches and resumes it exactly as a single dataset's: the cursor is
still (epoch, global sample offset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from smolvla_ray.keys import DATASET_INDEX

Sample = dict[str, Any]
_MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the loader's own permutation


def mixture_order(
    seed: int, epoch: int, sizes: Sequence[int], weights: Sequence[float], length: int
) -> np.ndarray:
    """The global rows of a mixture epoch (see the module docstring): int64 (length,)."""
    if len(sizes) != len(weights) or not sizes:
        raise ValueError(f"{len(sizes)} dataset sizes but {len(weights)} weights")
    if min(sizes) < 1:
        raise ValueError(f"every mixture dataset needs at least one sample; sizes {list(sizes)}")
    p = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"mixture weights must be finite and > 0; got {list(weights)}")
    rng = np.random.Generator(np.random.PCG64([seed, epoch, _MIX_STREAM]))
    picks = rng.choice(len(sizes), size=length, p=p / p.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rows = np.empty(length, dtype=np.int64)
    for d, size in enumerate(sizes):
        where = np.flatnonzero(picks == d)
        rounds = -(-len(where) // size)
        local = [
            np.random.Generator(np.random.PCG64([seed, epoch, _MIX_STREAM, d, k])).permutation(size)
            for k in range(rounds)
        ]
        taken = np.concatenate(local)[: len(where)] if local else np.empty(0, dtype=np.int64)
        rows[where] = offsets[d] + taken
    return rows


class MixtureDataset(Dataset):
    """Datasets drawn by weight: row `offset[d] + i` is dataset d's sample i, through its
    `transforms[d]` (which makes samples of different datasets collate together), with its
    dataset's position under `dataset_index`. `len()` is the epoch's length: `length`, or
    the datasets' sizes together."""

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float],
        *,
        length: int | None = None,
        transforms: Sequence[Callable[[Sample], Sample]] | None = None,
    ) -> None:
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        self.weights = [float(w) for w in weights]
        self.length = int(length) if length is not None else sum(self.sizes)
        self.transforms = list(transforms) if transforms is not None else None
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        mixture_order(0, 0, self.sizes, self.weights, 0)  # checks sizes and weights

    def __len__(self) -> int:
        return self.length

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The global rows of `epoch`, in order (`mixture_order`)."""
        return mixture_order(seed, epoch, self.sizes, self.weights, self.length)

    def locate(self, row: int) -> tuple[int, int]:
        """(dataset position, its row) of a global row."""
        if not 0 <= row < self.offsets[-1]:
            raise IndexError(f"row {row} is outside the mixture's {self.offsets[-1]} rows")
        d = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return d, int(row - self.offsets[d])

    def __getitem__(self, row: int) -> Sample:
        d, local = self.locate(int(row))
        sample = self.datasets[d][local]
        if self.transforms is not None:
            sample = self.transforms[d](sample)
        sample[DATASET_INDEX] = torch.tensor(d, dtype=torch.int64)
        return sample
