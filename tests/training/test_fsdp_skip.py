"""The device-side skip of a non-finite step (fused AdamW's ``found_inf``) on FSDP2-sharded
parameters: two gloo processes, each holding half of every parameter."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from olmo_mini.config import OptimConfig
from olmo_mini.training.optim import build_optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        optimizer = build_optimizer(model, OptimConfig(lr=0.1))
        first = optimizer.param_groups[0]["params"][0]

        def step(skip: bool) -> list[torch.Tensor]:
            model(torch.randn(3, 8)).sum().backward()
            optimizer.found_inf = torch.tensor(float(skip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return [p.full_tensor().clone() for p in model.parameters()]

        before = [p.full_tensor().clone() for p in model.parameters()]
        after_skip = step(skip=True)
        after_step = step(skip=False)
        results[rank] = (
            all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)),
            not any(torch.equal(a, b) for a, b in zip(before, after_step, strict=True)),
            int(optimizer.state[first]["step"]),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_found_inf_skips_the_update_of_sharded_parameters() -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    # Skipped: weights untouched. Then applied: every weight moves, and AdamW counts one step.
    assert dict(results) == {0: (True, True, 1), 1: (True, True, 1)}
