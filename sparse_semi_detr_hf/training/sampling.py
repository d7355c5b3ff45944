"""Deterministic, resumable data order for training: every draw is a pure function of (seed, position).

Position ``p`` of process ``r`` (of ``w``) takes element ``p * w + r`` of the endless concatenation of seeded
permutations of the dataset, so the order does not depend on DataLoader workers, and a resumed run continues
exactly where it stopped by starting at ``p = consumed``. The position is also handed to the dataset, which
seeds the example's random views with it.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
