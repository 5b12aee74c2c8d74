"""Global batches from a seeded permutation, split by rank, then by loader worker.

Global batch ``g`` is ``perm_e[b·G:(b+1)·G]`` with ``e, b = divmod(g, N // G)`` and ``perm_e`` a
permutation of the ``N`` instances seeded by ``(seed, e)``; the ``N mod G`` instances left at the
end of a permutation are skipped that epoch (other ones the next). Rank ``r`` of ``world`` takes
the contiguous slice ``[r·G/world, (r+1)·G/world)`` and yields it as ``accum`` consecutive
micro-batches; its ``k``-th micro-batch is built by loader worker ``k mod num_workers``, which is
exactly the order in which ``torch.utils.data.DataLoader`` returns an iterable's items. So the
sequence of global batches depends on the seed and the data only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


class Instances(Protocol):
    num_instances: int

    def read(self, ids: np.ndarray) -> np.ndarray: ...


def worker_slot() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current loader process; ``(0, 1)`` in-process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def to_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    """Windows of ``seq_len + 1`` tokens → inputs and next-token labels."""
    tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


class GlobalBatches:
    """The instance ids of each global batch; the current epoch's permutation is kept."""

    def __init__(self, num_instances: int, global_batch_size: int, seed: int, what: str) -> None:
        self.num_instances, self.global_batch_size = num_instances, global_batch_size
        self.seed = seed
        self.batches_per_epoch = num_instances // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{what} has {num_instances} instances, fewer than one global batch "
                f"(data.global_batch_size={global_batch_size}): use more data or a smaller batch"
            )
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, g: int) -> np.ndarray:
        epoch, b = divmod(g, self.batches_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_instances)
            self._epoch = epoch
        return self._perm[b * self.global_batch_size : (b + 1) * self.global_batch_size]


@dataclass(frozen=True)
class RankSlice:
    """Where a rank reads: its share of every global batch, in micro-batches, from global batch
    ``start`` on (the position a resumed run continues from)."""

    global_batch_size: int
    micro_batch_size: int
    rank: int
    world_size: int
    start: int = 0

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def micro_per_step(self) -> int:
        return self.per_rank // self.micro_batch_size


class ShuffledTrainStream(IterableDataset):
    """This rank's micro-batches from global batch ``at.start`` on, endless (epochs roll over)."""

    def __init__(self, instances: Instances, what: str, seed: int, at: RankSlice) -> None:
        self.instances, self.what, self.seed, self.at = instances, what, seed, at

    def __iter__(self):
        worker, num_workers = worker_slot()
        at = self.at
        batches = GlobalBatches(
            self.instances.num_instances, at.global_batch_size, self.seed, self.what
        )
        for k in itertools.count(worker, num_workers):
            g, j = divmod(k, at.micro_per_step)
            lo = at.rank * at.per_rank + j * at.micro_batch_size
            yield to_batch(
                self.instances.read(batches(at.start + g)[lo : lo + at.micro_batch_size])
            )


def fixed_batches(
    windows: np.ndarray, max_instances: int, micro_batch_size: int, rank: int, world_size: int
) -> list[dict[str, torch.Tensor]]:
    """Validation: the first ``max_instances`` held-out windows (rounded down to whole micro-batches
    on every rank), rank ``r`` taking the ``r``-th contiguous share; the same on every call."""
    n = min(len(windows), max_instances)
    per_rank = n // (world_size * micro_batch_size) * micro_batch_size
    mine = windows[rank * per_rank : (rank + 1) * per_rank]
    return [to_batch(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
