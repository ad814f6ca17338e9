"""Sharded, resumable batches with decoding in background processes.

The order of an epoch is a pure function of (seed, epoch): a permutation of the dataset's
rows, dealt round-robin to the `world_size` Ray workers, each rank's share cut into
consecutive batches. Batch b on all ranks together is therefore the contiguous block
[b * G, (b + 1) * G) of the epoch's order, where G = batch_size x world_size is the global
batch: which rows a global batch holds depends on G alone, not on how many ranks share it.
So does the end of an epoch: an epoch is a whole number of global batches (the rows after
the last whole one go to nobody; without drop_last the order wraps around to fill it).

The loader's position is therefore two integers, (epoch, global sample offset), the JSON
cursor that goes into checkpoints: a loader built from a cursor yields exactly the batches
that would have come next, for any world size with the same global batch (4 ranks of 2 or
1 rank of 8), whatever the number of loader processes, because batches are assembled and
yielded in order (torch's DataLoader with an in-order batch sampler). Every rank has the
same number of batches per epoch, so DDP ranks never wait on a rank that ran out of data.

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

CURSOR_VERSION = 2
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
                f"{self.num_samples} samples are fewer than one global batch (batch_size="
                f"{batch_size} x world_size={world_size} = {self.global_batch_size}); lower "
                "batch_size, use more episodes or set drop_last=False"
            )
        self._epoch, self._batch = 0, 0
        if cursor is not None:
            self._epoch, self._batch = self._check_cursor(cursor)

    @property
    def global_batch_size(self) -> int:
        """Samples of one batch on all ranks together (one micro-batch of every worker under
        gradient accumulation): `batch_size x world_size`."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank yields per epoch: equal on every rank, and set by the global
        batch alone, so the epoch ends at the same sample for every world size."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    @property
    def samples_per_rank(self) -> int:
        """Samples of one rank per epoch (equal on every rank)."""
        return self.batches_per_epoch * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset rows of the whole epoch in order (all ranks), set by (seed, epoch); a
        dataset with its own `epoch_order(seed, epoch)` (a mixture, data/mixture.py) sets it."""
        own_order = getattr(self.dataset, "epoch_order", None)
        if own_order is not None:
            return own_order(self.seed, epoch)
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.num_samples)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's rows of `epoch`, in order; disjoint from other ranks' when drop_last.

        The epoch is its first `batches_per_epoch` global batches of the epoch's order. With
        drop_last the `num_samples % global_batch_size` rows at the end of the order go to
        nobody (different ones each epoch); without it the order wraps around to a whole
        last global batch, so every row is covered and fewer than `global_batch_size` rows
        are seen twice. Either way the count depends on the global batch, not the world size.
        """
        total = self.batches_per_epoch * self.global_batch_size
        order = np.resize(self.epoch_order(epoch), total)  # resize repeats the order cyclically
        return order[self.rank :: self.world_size]

    def batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Rows of batch `batch` of `epoch` on this rank."""
        rows = self.shard(epoch)
        return rows[batch * self.batch_size : (batch + 1) * self.batch_size]

    def global_batch_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Rows of batch `batch` of `epoch` on all ranks together, in the epoch's order (rank
        r holds every world_size-th row from the r-th): the same for every world size."""
        total = self.batches_per_epoch * self.global_batch_size
        order = np.resize(self.epoch_order(epoch), total)
        return order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]

    def cursor(self) -> dict[str, Any]:
        """Where the next batch comes from, as (epoch, global sample offset into the epoch's
        order): JSON-serialisable, the same on every rank, and valid for any world size with
        the same global batch."""
        return {
            "version": CURSOR_VERSION,
            "epoch": self._epoch,
            "offset": self._batch * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
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
        cursor = _upgraded(cursor)
        for key in ("seed", "num_samples", "drop_last", "shuffle"):
            if cursor.get(key) != getattr(self, key):
                raise ValueError(
                    f"data cursor has {key}={cursor.get(key)!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data settings, or "
                    "start the data order afresh without a cursor"
                )
        size = cursor.get("global_batch_size")
        if size != self.global_batch_size:
            raise ValueError(
                f"data cursor counts global batches of {size} samples but this loader's is "
                f"batch_size={self.batch_size} x world_size={self.world_size} = "
                f"{self.global_batch_size}; resume with a batch_size and world_size whose "
                f"product is {size}, or start the data order afresh without a cursor"
            )
        epoch, offset = int(cursor["epoch"]), int(cursor["offset"])
        end = self.batches_per_epoch * self.global_batch_size
        if epoch < 0 or not 0 <= offset <= end or offset % self.global_batch_size:
            raise ValueError(
                f"data cursor position epoch={epoch}, offset={offset} is invalid (offsets are "
                f"multiples of {self.global_batch_size} up to {end})"
            )
        return _advance(epoch, offset // self.global_batch_size - 1, self.batches_per_epoch)


def _upgraded(cursor: Any) -> dict[str, Any]:
    """A version-1 cursor (epoch, batch, world_size, batch_size: written before cursors were
    global) as a version-2 one; a version-2 cursor as it is."""
    if isinstance(cursor, dict) and cursor.get("version") == 1:
        try:
            size = int(cursor["batch_size"]) * int(cursor["world_size"])
            offset = int(cursor["batch"]) * size
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"data cursor {cursor!r} is not a version-1 loader cursor") from None
        rest = {k: v for k, v in cursor.items() if k not in ("batch", "batch_size", "world_size")}
        return {**rest, "version": 2, "offset": offset, "global_batch_size": size}
    if not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION:
        raise ValueError(f"data cursor {cursor!r} is not a version-{CURSOR_VERSION} loader cursor")
    return cursor


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
