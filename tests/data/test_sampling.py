"""Global batches: exactly once per epoch, the same for every layout, exact resume."""

from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from olmo_mini.data import DataConfig, OLMoDataModule
from olmo_mini.data.sampling import RankSlice, ShuffledTrainStream

SEQ, GLOBAL, MICRO = 16, 12, 2
LAYOUTS = [(world, workers) for world in (1, 2, 3) for workers in (0, 2)]


def module(
    shard_dir: Path, rank: int, world: int, workers: int = 0, seed: int = 0, **kwargs
) -> OLMoDataModule:
    config = DataConfig(
        source="shards",
        shards=str(shard_dir),
        seq_len=SEQ,
        global_batch_size=GLOBAL,
        micro_batch_size=MICRO,
        num_workers=workers,
        **kwargs,
    )
    dm = OLMoDataModule(config, seed=seed, rank=rank, world_size=world)
    dm.setup()
    return dm


def global_batches(
    shard_dir: Path, world: int, workers: int, count: int, state: dict | None = None, start: int = 0
) -> list[torch.Tensor]:
    """Reassemble ``count`` global batches (windows of seq_len+1 tokens) from every rank's loader."""
    accum = GLOBAL // (MICRO * world)
    per_rank = []
    for rank in range(world):
        dm = module(shard_dir, rank, world, workers)
        dm.consumed_global_batches = start
        if state is not None:
            dm.load_state_dict(state)
        micro = list(islice(dm.train_dataloader(), count * accum))
        per_rank.append([torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in micro])
    return [
        torch.cat([per_rank[r][g * accum + j] for r in range(world) for j in range(accum)])
        for g in range(count)
    ]


def test_labels_are_inputs_shifted(shard_dir: Path) -> None:
    batch = next(iter(module(shard_dir, 0, 1).train_dataloader()))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_every_layout_sees_the_same_batches_each_instance_once(shard_dir: Path) -> None:
    dm = module(shard_dir, 0, 1)
    instances = dm._train.read(np.arange(dm._train.num_instances))
    per_epoch = len(instances) // GLOBAL
    assert per_epoch >= 3, "corpus too small for this test"
    reference = global_batches(shard_dir, 1, 0, per_epoch + 1)
    epoch = torch.cat(reference[:per_epoch]).numpy()
    # The epoch's windows are a sub-multiset of the instances (the permutation's N mod G tail
    # is left out); identity-level coverage is checked in test_exactly_once_by_id.
    seen, available = Counter(map(bytes, epoch)), Counter(map(bytes, instances))
    assert sum(seen.values()) == per_epoch * GLOBAL and not seen - available
    assert not torch.equal(reference[per_epoch], reference[0])  # a new permutation next epoch
    for world, workers in LAYOUTS[1:]:  # the first batches and across the epoch boundary
        for start in (0, per_epoch - 2):
            got = global_batches(shard_dir, world, workers, 3, start=start)
            for g, (a, b) in enumerate(zip(got, reference[start : start + 3], strict=True)):
                assert torch.equal(a, b), f"world {world}, workers {workers}: batch {start + g}"


class NumberedInstances:
    """Instance ``i`` is a window filled with ``i``: batches reveal exactly which ids they hold."""

    num_instances = 4 * GLOBAL

    def read(self, ids: np.ndarray) -> np.ndarray:
        return np.repeat(ids[:, None], SEQ + 1, axis=1)


@pytest.mark.parametrize(("world", "workers"), LAYOUTS)
def test_exactly_once_by_id(world: int, workers: int) -> None:
    per_epoch = NumberedInstances.num_instances // GLOBAL
    accum = GLOBAL // (MICRO * world)
    ranks = []
    for rank in range(world):
        stream = ShuffledTrainStream(
            NumberedInstances(), "numbers", 0, RankSlice(GLOBAL, MICRO, rank, world, start=0)
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        ranks.append([b["input_ids"][:, 0] for b in islice(loader, 2 * per_epoch * accum)])
    order = torch.cat(
        [
            ranks[r][g * accum + j]
            for g in range(2 * per_epoch)
            for r in range(world)
            for j in range(accum)
        ]
    )
    n = NumberedInstances.num_instances
    for epoch in (order[:n], order[n:]):
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(order[:n], order[n:])
    rng = [np.random.default_rng([0, e]).permutation(n) for e in (0, 1)]
    assert order.tolist() == np.concatenate(rng).tolist()  # the documented order


def test_seed_changes_the_order(shard_dir: Path) -> None:
    a = next(iter(module(shard_dir, 0, 1, seed=0).train_dataloader()))
    b = next(iter(module(shard_dir, 0, 1, seed=1).train_dataloader()))
    assert not torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_resume_mid_epoch_is_exact(shard_dir: Path, world: int, workers: int) -> None:
    uninterrupted = global_batches(shard_dir, world, workers, 5)
    saved = module(shard_dir, 0, world, workers)
    saved.consumed_global_batches = 2
    state = saved.state_dict()
    resumed = global_batches(shard_dir, world, workers, 3, state=state)
    for a, b in zip(resumed, uninterrupted[2:], strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_other_data(shard_dir: Path) -> None:
    state = module(shard_dir, 0, 1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        module(shard_dir, 0, 1, seed=7).load_state_dict(state)
    pending = OLMoDataModule(
        DataConfig(
            source="shards",
            shards=str(shard_dir),
            seq_len=8,
            global_batch_size=GLOBAL,
            micro_batch_size=MICRO,
        ),
        seed=0,
        rank=0,
        world_size=1,
    )
    pending.load_state_dict(state)  # before setup, as when Lightning restores early
    with pytest.raises(ValueError, match="seq_len"):
        pending.setup()


def test_val_batches_are_fixed_and_sharded(shard_dir: Path) -> None:
    dm = module(shard_dir, 0, 1, val_batches=1)
    first = [b["input_ids"] for b in dm.val_dataloader()]
    assert len(first) == GLOBAL // MICRO
    assert all(
        torch.equal(a, b["input_ids"]) for a, b in zip(first, dm.val_dataloader(), strict=True)
    )
    shards = [
        [b["input_ids"] for b in module(shard_dir, r, 2, val_batches=1).val_dataloader()]
        for r in range(2)
    ]
    assert torch.equal(torch.cat(shards[0] + shards[1]), torch.cat(first))
