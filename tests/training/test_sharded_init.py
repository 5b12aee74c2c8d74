"""Sharded-from-the-start build under ``trainer=fsdp``: each of two gloo ranks holds only its
share of the model plus one parameter's init scratch, the weights are the single-device init's,
bit for bit, and ``model.init_from`` (a Hugging Face folder, streamed) gives the logits of the
single-process load under the same memory bound."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo_mini.bench.harness import peak_bytes, reset_peak
from olmo_mini.model import OLMo2
from olmo_mini.model.shards import release_freed_memory
from olmo_mini.training.parallel import build_model
from tests.training.helpers import compose_config

# 88 M parameters (352 MB fp32) in many mid-sized matrices: the largest (8.4 MB) is small
# against half the model, so the bound below separates sharded from unsharded builds.
LARGE = [
    "model.vocab_size=2048",
    "model.d_model=1024",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=8",
    "model.mlp_hidden_size=2048",
]
# nn.init.trunc_normal_ (torch 2.13, rejection sampling) holds the tensor, a redraw, the
# torch.where result and a mask at once, and a second round can overlap the first: up to five
# copies of the parameter being drawn. The single-device init needs the same scratch.
INIT_SCRATCH = 5
# Python objects, FSDP2 bookkeeping, allocator slack and the local slice's copy.
FIXED_OVERHEAD = 48 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(model: OLMo2) -> dict[str, str]:
    """sha256 of every parameter's whole value (gathered one at a time under FSDP)."""
    out = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        full = full.detach()
        out[name] = hashlib.sha256(full.contiguous().numpy().tobytes()).hexdigest()
    return out


def _build_measured(*overrides: str, mesh=None) -> tuple[OLMo2, int]:
    """The model ``build_model`` makes, and how far the peak RSS rose while it was made."""
    config = compose_config(*LARGE, *overrides)
    before = reset_peak(torch.device("cpu"))
    model = build_model(config.model, config.seed, config.trainer, "32-true", mesh)
    return model, peak_bytes(torch.device("cpu")) - before


@torch.no_grad()
def _logits(model: OLMo2) -> torch.Tensor:
    ids = torch.randint(2048, (1, 16), generator=torch.Generator().manual_seed(0))
    return model(ids)


def _worker(rank: int, port: int, hf_folder: str, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        fsdp = ("trainer=fsdp", "trainer.devices=2")
        model, grown = _build_measured(*fsdp, mesh=mesh)
        digests = _digests(model)
        del model
        release_freed_memory()  # the next baseline must not count freed, still-mapped pages
        loaded, grown_loading = _build_measured(*fsdp, f"model.init_from={hf_folder}", mesh=mesh)
        results[rank] = (grown, digests, grown_loading, _logits(loaded))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_build_and_init_from_hold_only_the_local_shards_and_equal_one_process(
    tmp_path,
) -> None:
    # Other weights than the seed-0 init, so that a load that did nothing would show.
    hf_folder = tmp_path / "hf"
    _build_measured("seed=1")[0].save_hf(hf_folder)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(hf_folder), results), nprocs=2, join=True)
    single = _build_measured()[0]
    expected_logits = _logits(_build_measured(f"model.init_from={hf_folder}")[0])
    sizes = [p.numel() * p.element_size() for p in single.parameters()]
    param_bytes, largest = sum(sizes), max(sizes)
    assert param_bytes > 300 * 2**20
    bound = param_bytes // 2 + INIT_SCRATCH * largest + FIXED_OVERHEAD
    assert bound < param_bytes  # an unsharded build could not pass
    expected = _digests(single)
    assert not torch.equal(expected_logits, _logits(single))
    for rank in (0, 1):
        grown, digests, grown_loading, logits = results[rank]
        print(
            f"rank {rank}: peak growth {grown / 2**20:.0f} MiB (init), "
            f"{grown_loading / 2**20:.0f} MiB (init_from), bound {bound / 2**20:.0f} MiB"
        )
        assert grown < bound, (rank, grown, bound)
        assert digests == expected, rank
        assert grown_loading < bound, (rank, grown_loading, bound)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
