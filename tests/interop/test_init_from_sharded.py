"""``model.init_from`` a sharded (DCP) checkpoint: DCP reads straight into the parameters, on one
process or into the shards of two (resharded from the saving run)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo_mini.interop import checkpoint_state
from olmo_mini.training.parallel import build_model
from tests.interop.conftest import RUN
from tests.training.helpers import compose_config


def _build(step: str, *overrides: str, mesh=None):
    config = compose_config(*RUN, *overrides, f"model.init_from={step}")
    return build_model(config.model, config.seed + 1, config.trainer, "32-true", mesh)


def _worker(rank: int, port: int, step: str, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _build(
            step, "trainer=fsdp", "trainer.devices=2", mesh=init_device_mesh("cpu", (2,))
        )
        results[rank] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_from_a_sharded_checkpoint_on_one_process(fsdp_run) -> None:
    step = fsdp_run / "checkpoints" / "step_2"
    saved = checkpoint_state(step)
    model = _build(str(step))
    assert {n: p.detach() for n, p in model.named_parameters()}.keys() == saved.keys()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), saved[name]), name


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_into_two_shards(fsdp_run) -> None:
    step = fsdp_run / "checkpoints" / "step_2"
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(step), results), nprocs=2, join=True)
    saved = checkpoint_state(step)
    for rank in (0, 1):
        assert results[rank].keys() == saved.keys()
        for name, tensor in results[rank].items():
            assert torch.equal(tensor, saved[name]), (rank, name)
