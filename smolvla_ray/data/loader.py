"""Sharded, resumable batches with decoding in background processes.

The order of an epoch is a pure function of (seed, epoch): a permutation of the dataset's
rows, dealt round-robin to the `world_size` Ray workers, cut into batches. The loader's
position is therefore two integers (epoch, batch), the JSON cursor that goes into
checkpoints: a loader built from a cursor yields exactly the batches that would have come
next, whatever the number of loader processes, because batches are assembled and yielded in
order (torch's DataLoader with an in-order batch sampler). Every rank has the same number of
batches per epoch, so DDP ranks never wait on a rank that ran out of data.

The batch sampler hands each row to the loader processes together with its epoch, so a
per-sample transform (image augmentation) can be keyed by (epoch, sample) and stays exact on
resume, whatever the number of loader processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from smolvla_ray.data.samples import collate_samples

CURSOR_VERSION = 1
Batch = dict[str, Any]
Sample = dict[str, Any]


class ShardedLoader:
    """Endless batches of one rank's share of each epoch, resumable from `cursor()`.

    `sample_transform(sample, epoch)` (e.g. image augmentation) runs on each sample in the
    loader processes, so it must pickle when `num_workers` > 0. `batch_transform` (e.g. the
    policy processor: normalization and tokenization) runs on each collated batch in the
    calling process, so it need not pickle. `pin_memory` collates into page-locked memory
    (for a CUDA device: faster, asynchronous copies); tensors the batch transform makes anew
    are not pinned, those it passes through (images) are.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        cursor: dict[str, Any] | None = None,
        sample_transform: Callable[[Sample, int], Sample] | None = None,
        batch_transform: Callable[[Batch], Batch] | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 or more")
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.sample_transform = sample_transform
        self.batch_transform = batch_transform
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} samples over world_size={world_size} give rank {rank} "
                f"fewer than batch_size={batch_size} samples per epoch; lower batch_size, use "
                "more episodes or set drop_last=False"
            )
        self._epoch, self._batch = 0, 0
        if cursor is not None:
            self._epoch, self._batch = self._check_cursor(cursor)

    @property
    def samples_per_rank(self) -> int:
        """Samples of one rank per epoch (equal on every rank)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank yields per epoch (equal on every rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset rows of the whole epoch in order (all ranks), set by (seed, epoch)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.num_samples)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's rows of `epoch`, in order; disjoint from other ranks' when drop_last.

        With drop_last the `num_samples % world_size` rows at the end of the epoch's order go
        to nobody (different ones each epoch); without it the order wraps around so every row
        is covered and at most `world_size - 1` rows are seen twice.
        """
        order = self.epoch_order(epoch)
        total = self.samples_per_rank * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        return order[:total][self.rank :: self.world_size]

    def batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Rows of batch `batch` of `epoch` on this rank."""
        rows = self.shard(epoch)
        return rows[batch * self.batch_size : (batch + 1) * self.batch_size]

    def cursor(self) -> dict[str, Any]:
        """Where the next batch comes from: JSON-serialisable, the same on every rank."""
        return {
            "version": CURSOR_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._epoch

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches forever from the cursor; `cursor()` advances as each is yielded."""
        start = (self._epoch, self._batch)
        loader = DataLoader(
            _EpochRows(self.dataset, self.sample_transform),
            batch_sampler=_BatchSampler(self, start),
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
            persistent_workers=False,
        )
        positions = _positions(start, self.batches_per_epoch)
        for batch in loader:
            epoch, index = next(positions)
            self._epoch, self._batch = _advance(epoch, index, self.batches_per_epoch)
            if self.batch_transform is not None:
                batch = self.batch_transform(batch)
            yield batch

    def _check_cursor(self, cursor: dict[str, Any]) -> tuple[int, int]:
        if not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION:
            raise ValueError(
                f"data cursor {cursor!r} is not a version-{CURSOR_VERSION} loader cursor"
            )
        for key in ("seed", "world_size", "batch_size", "num_samples", "drop_last", "shuffle"):
            if cursor.get(key) != getattr(self, key):
                raise ValueError(
                    f"data cursor has {key}={cursor.get(key)!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data settings and "
                    "number of workers, or start the data order afresh without a cursor"
                )
        epoch, batch = int(cursor["epoch"]), int(cursor["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"data cursor position epoch={epoch}, batch={batch} is invalid")
        return _advance(epoch, batch - 1, self.batches_per_epoch)


def _advance(epoch: int, batch: int, per_epoch: int) -> tuple[int, int]:
    """The position after (epoch, batch)."""
    return (epoch + 1, 0) if batch + 1 >= per_epoch else (epoch, batch + 1)


def _positions(start: tuple[int, int], per_epoch: int) -> Iterator[tuple[int, int]]:
    epoch, batch = start
    while True:
        yield epoch, batch
        epoch, batch = _advance(epoch, batch, per_epoch)


class _EpochRows(Dataset):
    """`dataset` indexed by (epoch, row): the sample of `row`, through `transform` with its
    epoch. The epoch travels with the row because loader processes cannot know it otherwise
    (they prefetch ahead of the batches the training loop has taken)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Sample, int], Sample] | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, row = key
        sample = self.dataset[row]
        return sample if self.transform is None else self.transform(sample, epoch)


class _BatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """(epoch, row) lists in cursor order; runs in the main process, so order never depends
    on workers."""

    def __init__(self, loader: ShardedLoader, start: tuple[int, int]) -> None:
        self.loader = loader
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        shard_epoch, shard = -1, np.empty(0, dtype=np.int64)
        for epoch, batch in _positions(self.start, self.loader.batches_per_epoch):
            if epoch != shard_epoch:
                shard_epoch, shard = epoch, self.loader.shard(epoch)
            size = self.loader.batch_size
            yield [(epoch, row) for row in shard[batch * size : (batch + 1) * size].tolist()]
