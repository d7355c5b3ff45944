"""Deterministic, resumable data order for training: every draw is a pure function of (seed, position).

Position ``p`` of process ``r`` (of ``w``) takes element ``p * w + r`` of the endless concatenation of seeded
permutations of the dataset, so the order does not depend on DataLoader workers, and a resumed run continues
exactly where it stopped by starting at ``p = consumed``. The position is also handed to the dataset, which
seeds the example's random views with it.

Streamed sets (``datasets.IterableDataset``, see ``training.data.as_streaming``) have no positions: there each
process and each of its DataLoader workers runs its own endless, seeded passes over its shards
(:class:`ResumableStream`), and a resumed run drops what the interrupted one consumed
(:func:`endless_stream_loader`).
"""

import copy
import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


class PositionSampler(Sampler):
    """Endless ``(index, global_position)`` pairs for one process."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perm

    def __iter__(self):
        position = self.start
        while True:
            global_position = position * self.world_size + self.rank
            epoch, offset = divmod(global_position, self.size)
            yield int(self._permutation(epoch)[offset]), global_position
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


class PositionedDataset(Dataset):
    """Wraps a dataset with ``set_epoch`` (see ``training.data``): item ``(index, position)`` seeds the example's
    views with the position, so each draw gets its own, reproducible augmentation."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, position = item
        self.base.set_epoch(position)
        return self.base[index]


def endless_loader(dataset, batch_size: int, collate_fn, seed: int, rank: int, world_size: int,
                   start_batch: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader of endless, deterministic batches starting after ``start_batch`` consumed batches."""
    sampler = PositionSampler(len(dataset), seed, rank, world_size, start=start_batch * batch_size)
    return DataLoader(
        PositionedDataset(dataset), batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
        num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keep the global RNG untouched by loader start-up
    )


class _Rows:
    """One pass over ``stream`` per ``iter``, without its first ``skip`` rows (dropped undecoded). A pass shorter
    than ``skip`` is dropped whole and the rest of ``skip`` carries over to the next pass. ``read`` counts the
    rows of the last pass, dropped ones included."""

    def __init__(self, stream):
        self.stream, self.skip, self.read = stream, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        self.read = 0
        for row in self.stream:
            self.read += 1
            if self.skip > 0:
                self.skip -= 1
                continue
            yield row


class ResumableStream(IterableDataset):
    """Endless items from a ``datasets`` stream, continuing after ``skip_rows`` rows of this process (or worker).

    ``wrap(rows)`` builds the item dataset over an iterable of rows that has ``set_epoch`` (e.g.
    ``functools.partial(UnlabeledPairIterableDataset, transform=..., seed=...)``); pass ``e`` of the endless
    loop calls ``set_epoch(e)`` on it, which reshuffles the stream and changes the per-example view seeds.
    Every ``iter`` works on a private copy that starts at pass 0: ``datasets`` keeps the epoch in shared memory,
    and DataLoader workers that run their passes independently must not move each other's epoch.
    Raises ``RuntimeError`` when a pass has no row (an empty share) or no readable row.
    """

    def __init__(self, stream, wrap: Callable, skip_rows: int = 0):
        self.rows = _Rows(stream)
        self.items = wrap(self.rows)
        self.skip_rows = skip_rows

    def __iter__(self):
        rows, items = copy.deepcopy((self.rows, self.items))
        rows.skip = self.skip_rows
        for epoch in itertools.count():
            items.set_epoch(epoch)
            skip_before, produced = rows.skip, 0
            for item in items:
                produced += 1
                yield item
            if rows.read == 0:
                raise RuntimeError("the streamed dataset has no row for this process / DataLoader worker "
                                   "(fewer rows or shards than processes x workers?)")
            if produced == 0 and rows.read > skip_before - rows.skip:
                raise RuntimeError(f"no readable row in a whole pass of {rows.read} rows (epoch {epoch})")


class SkipBatches:
    """Iterates ``loader`` without its first ``count`` batches (each ``iter`` starts anew)."""

    def __init__(self, loader: DataLoader, count: int = 0):
        self.loader, self.count = loader, count

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.count, None)


def endless_stream_loader(stream, wrap: Callable, batch_size: int, collate_fn, seed: int, start_batch: int = 0,
                          num_workers: int = 0) -> SkipBatches:
    """Endless batches of ``wrap(stream)`` items (see :class:`ResumableStream`), after ``start_batch`` consumed ones.

    ``stream`` is this process's share (``as_streaming`` already split it by node). ``W = min(num_workers,
    stream.num_shards)`` workers split its shards, each running its own endless passes, and the DataLoader takes
    their batches in turn: batch ``j`` comes from worker ``j % W`` (``W = 1`` without workers). The first
    ``(k // W) * W`` of ``k`` consumed batches are ``k // W`` of every worker's, so a resumed loader drops
    ``(k // W) * batch_size`` rows in each worker (undecoded, cheap) and then the next ``k % W`` batches (decoded).
    The result is the uninterrupted sequence when the stream's shuffle is seeded and ``num_workers``, the number
    of processes and the batch size are unchanged. Dropped rows are counted before decoding: if the interrupted
    run skipped unreadable images, the resumed run repeats as many.
    """
    workers = max(0, min(num_workers, stream.num_shards))
    lanes = max(1, workers)
    dataset = ResumableStream(stream, wrap, skip_rows=start_batch // lanes * batch_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),  # keep the global RNG untouched by loader start-up
    )
    return SkipBatches(loader, start_batch % lanes)
