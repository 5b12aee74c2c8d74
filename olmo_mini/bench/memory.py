"""Measured per-rank memory of building (and one step of) a training config, against what
``olmo_mini.sizing.memory``'s planner predicts (``tools/bench_memory.py``; usage and the
measurements: docs/scaling.md). N processes (gloo on CPU, NCCL on GPU) build the model exactly as
the trainer does (``training.parallel.build_model``) and print one JSON line per rank.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from olmo_mini.bench.harness import json_line, parser, peak_bytes, reset_peak, rss_bytes
from olmo_mini.config import TrainConfig, compose_config, compose_or_exit
from olmo_mini.model import OLMo2
from olmo_mini.model.shards import release_freed_memory
from olmo_mini.sizing.flops import default_precision
from olmo_mini.training.optim import build_optimizer
from olmo_mini.training.parallel import build_model

STAGES = ("init", "backward", "step")


@dataclass
class MemoryRow:
    """One rank after ``stage``. Bytes: ``param_bytes`` the whole model, ``largest_param_bytes``
    its largest tensor, ``local_param_bytes`` this rank's shards, ``state_bytes`` this rank's
    parameter, gradient and optimizer-state tensors (what the planner's states count),
    ``peak_bytes`` the peak RSS (CPU) or ``max_memory_allocated`` (GPU); on CPU also the RSS
    before the build (Python, torch, Lightning) and after the stage (freed heap returned first)."""

    rank: int
    world_size: int
    stage: str
    precision: str
    param_bytes: int
    largest_param_bytes: int
    local_param_bytes: int
    state_bytes: int
    peak_bytes: int
    baseline_rss_bytes: int | None
    rss_bytes: int | None
    seconds: float


def _worker(rank: int, world: int, port: int, stage: str, overrides: list[str]) -> None:
    config = compose_config(overrides)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    precision = config.trainer.precision
    if precision == "auto":
        precision = default_precision(device.type)
    mesh = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        mesh = init_device_mesh(device.type, (world,))
    try:
        baseline = reset_peak(device)
        start = time.perf_counter()
        model = build_model(config.model, config.seed, config.trainer, precision, mesh)
        if mesh is None:
            model.to(device)
        params = list(model.parameters())
        optimizer = None
        if stage != "init":
            optimizer = _train_step(model, config, device, precision, stage == "step")
        peak = peak_bytes(device)
        if not cuda:
            release_freed_memory()  # what stays resident is what is still in use
        sizes = [p.numel() * p.element_size() for p in params]
        row = MemoryRow(
            rank=rank,
            world_size=world,
            stage=stage,
            precision=precision,
            param_bytes=sum(sizes),
            largest_param_bytes=max(sizes),
            local_param_bytes=_bytes(params),
            state_bytes=_state_bytes(params, optimizer),
            peak_bytes=peak,
            baseline_rss_bytes=None if cuda else baseline,
            rss_bytes=None if cuda else rss_bytes(),
            seconds=round(time.perf_counter() - start, 2),
        )
        # One write(2) per line: ranks share stdout, and a pipe keeps a write under PIPE_BUF
        # whole, where print's separate writes of text and newline could interleave.
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (json_line(row) + "\n").encode())
    finally:
        if mesh is not None:
            dist.destroy_process_group()


def _bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of this rank's part of ``tensors`` (the local shard of a DTensor)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _train_step(
    model: OLMo2, config: TrainConfig, device: torch.device, precision: str, optimizer_step: bool
) -> torch.optim.Optimizer | None:
    """One forward/backward on random tokens as ``training_step`` runs it; then AdamW if asked."""
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.data.micro_batch_size, config.data.seq_len + 1)
    tokens = torch.randint(config.model.vocab_size, shape, generator=generator).to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
        out = model(tokens[:, :-1], labels=tokens[:, 1:], z_loss=config.optim.z_loss)
    out.loss.backward()
    if not optimizer_step:
        return None
    optimizer = build_optimizer(model, config.optim)
    optimizer.step()
    return optimizer


def _state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state tensors (local shards)."""
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    states = optimizer.state.values() if optimizer is not None else ()
    tensors += [v for state in states for v in state.values() if isinstance(v, torch.Tensor)]
    return _bytes(tensors)


def main(argv: list[str] | None = None) -> int:
    """``tools/bench_memory.py``: N processes, one JSON line per rank."""
    cli = parser("Measure per-rank memory of building (and one step of) a training config.")
    cli.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start")
    cli.add_argument(
        "--stop-after",
        choices=STAGES,
        default="init",
        help="init: build + init; backward: + one forward/backward; step: + one AdamW step",
    )
    cli.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=olmo2_1b")
    args = cli.parse_args(argv)
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {args.nproc}")
    config = compose_or_exit(args.overrides)
    strategy = config.trainer.strategy
    if args.nproc > 1 and strategy != "fsdp":
        raise SystemExit(
            f"error: --nproc {args.nproc} needs trainer=fsdp (trainer.strategy is {strategy!r})"
        )
    if config.trainer.precision == "bf16-true":
        raise SystemExit("error: trainer.precision=bf16-true is not measured by bench_memory")
    if args.nproc > 1 and torch.cuda.is_available() and torch.cuda.device_count() < args.nproc:
        raise SystemExit(
            f"error: --nproc {args.nproc} but only {torch.cuda.device_count()} GPU(s) visible"
        )
    # The processes are the world: trainer.devices follows --nproc, as a launcher would set it.
    overrides = [*args.overrides, f"trainer.devices={args.nproc}", "trainer.num_nodes=1"]
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _worker,
        args=(args.nproc, port, args.stop_after, overrides),
        nprocs=args.nproc,
        start_method="spawn",
    )
    return 0
