"""Memory per device: a planner from the composed config, and a benchmark that measures it.

The planner (``tools/plan_memory.py``) sizes a cluster job before it is submitted. Per device:

- parameters: fp32 (bf16 under ``bf16-true``), divided by the world size under FSDP;
- gradients: as the parameters (FSDP2 reduce-scatters them into shards);
- optimizer state: AdamW's two fp32 moments per parameter, sharded like the parameters;
- FSDP working set: what FSDP2 unshards for compute, in the compute dtype: the root module's
  parameters (embedding, final norm, LM head; the root stays unsharded from forward to backward)
  and two blocks (the one running and the prefetched one), plus their unsharded gradients
  before the reduce-scatter;
- activations saved for backward: about ``B*T*(13*d + 4*h)`` values per block (inputs of the
  projections, q/k/v before and after QK-norm and RoPE, the attention output, the four SwiGLU
  tensors, the residual stream) in the compute dtype, plus ``B*T*d`` for the final norm. With
  activation checkpointing each block keeps only its input ``B*T*d``, and one block's
  activations exist again while it is recomputed. The chunked LM-head loss never holds logits.

The benchmark (``tools/bench_memory.py``) starts N processes (gloo on CPU, NCCL on GPU), builds
the model exactly as the trainer does (``training.parallel.build_model``), optionally runs one
forward/backward and one AdamW step on random tokens, and reports per rank as JSON lines: peak
RSS (CPU) or ``max_memory_allocated`` (GPU), the RSS still in use after the stage, and the bytes
of the rank's parameter, gradient and optimizer-state tensors (what the planner's states count).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

import torch

from olmo_mini.config import ConfigError, TrainConfig, compose_config
from olmo_mini.model import OLMo2
from olmo_mini.model.shards import release_freed_memory
from olmo_mini.training.optim import build_optimizer
from olmo_mini.training.parallel import build_model
from olmo_mini.training.perf import default_precision

STAGES = ("init", "backward", "step")
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32


# ---------------------------------------------------------------- resident memory (Linux)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} (peak RSS needs Linux)")


def rss_bytes() -> int:
    """This process's resident memory now."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Restart the peak at the current RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------- the planner


@dataclass
class MemoryPlan:
    """Bytes per device; ``total`` counts activations as the config runs them."""

    devices: int
    shards: int
    precision: str
    param_count: int
    params: int
    grads: int
    optimizer: int
    fsdp_working_set: int
    activations: int
    activations_checkpointed: int
    total: int

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer state: what sharding divides."""
        return self.params + self.grads + self.optimizer


def model_sizes(model: OLMo2) -> tuple[int, int, int]:
    """Parameter count, parameters of the root module (outside blocks), and of one block."""
    total = model.num_params()
    block = sum(p.numel() for p in model.blocks[0].parameters()) if len(model.blocks) else 0
    return total, total - block * len(model.blocks), block


def plan_memory(config: TrainConfig, device_type: str = "cuda") -> MemoryPlan:
    """Per-device memory of training ``config`` (see the module docstring for each term)."""
    trainer, data, arch = config.trainer, config.data, config.model
    precision = trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if device_type == "cuda" else default_precision(device_type)
    with torch.device("meta"):
        model = OLMo2(arch)
    count, root, block = model_sizes(model)
    state_bytes = 2 if precision == "bf16-true" else 4
    compute_bytes = 4 if precision == "32-true" else 2
    shards = trainer.world_size if trainer.strategy == "fsdp" else 1
    params = -(-count * state_bytes // shards)
    optimizer = -(-count * ADAM_STATE_BYTES // shards)
    working = 0
    if trainer.strategy == "fsdp" and shards > 1:
        unsharded = (root + 2 * block) * compute_bytes
        working = 2 * unsharded  # the parameters and their gradients before reduce-scatter
    tokens = data.micro_batch_size * data.seq_len
    per_block = tokens * (13 * arch.d_model + 4 * arch.mlp_hidden_size) * compute_bytes
    residual = tokens * arch.d_model * compute_bytes
    activations = arch.n_layers * per_block + residual
    checkpointed = arch.n_layers * residual + per_block + residual
    used = checkpointed if trainer.activation_checkpointing else activations
    return MemoryPlan(
        devices=trainer.world_size,
        shards=shards,
        precision=precision,
        param_count=count,
        params=params,
        grads=params,
        optimizer=optimizer,
        fsdp_working_set=working,
        activations=activations,
        activations_checkpointed=checkpointed,
        total=2 * params + optimizer + working + used,
    )


def format_plan(plan: MemoryPlan, activation_checkpointing: bool) -> str:
    """The plan as a small table, GiB per device."""

    def gib(n: int) -> str:
        return f"{n / 2**30:10.2f} GiB"

    using = "with" if activation_checkpointing else "without"
    rows = [
        f"{plan.param_count / 1e9:.3f} B parameters, {plan.precision}, {plan.devices} device(s), "
        f"states sharded {plan.shards} way(s); per device:",
        f"  parameters                      {gib(plan.params)}",
        f"  gradients                       {gib(plan.grads)}",
        f"  optimizer state (AdamW)         {gib(plan.optimizer)}",
        f"  FSDP working set (unsharded)    {gib(plan.fsdp_working_set)}",
        f"  activations, no checkpointing   {gib(plan.activations)}",
        f"  activations, checkpointing      {gib(plan.activations_checkpointed)}",
        f"  total ({using} checkpointing)    {gib(plan.total)}",
    ]
    return "\n".join(rows)


def plan_main(argv: list[str] | None = None) -> int:
    """``tools/plan_memory.py``: Hydra-style overrides in, the per-device table out."""
    parser = argparse.ArgumentParser(
        description="Per-device memory of a training config (python train.py's overrides).",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device precision=auto resolves for (default: cuda)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", help="e.g. model=olmo2_7b trainer=fsdp")
    args = parser.parse_args(argv)
    config = _compose(args.overrides)
    plan = plan_memory(config, args.device)
    if args.json:
        print(json.dumps({**asdict(plan), "states": plan.states}))
    else:
        print(format_plan(plan, config.trainer.activation_checkpointing))
    return 0


def _compose(overrides: list[str]) -> TrainConfig:
    try:
        return compose_config(overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # Hydra's own errors (an unknown group or key): their first line
        raise SystemExit(f"error: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- the benchmark


def _bench_worker(rank: int, world: int, port: int, stage: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    config = compose_config(overrides)
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cuda else "cpu"
    precision = config.trainer.precision
    if precision == "auto":
        precision = default_precision(device_type)
    mesh = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (world,))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        baseline = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        model = build_model(config.model, config.seed, config.trainer, precision, mesh)
        if mesh is None:
            model.to(device)
        params = list(model.parameters())
        result = {
            "rank": rank,
            "world_size": world,
            "stage": stage,
            "precision": precision,
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "largest_param_bytes": max(p.numel() * p.element_size() for p in params),
            "local_param_bytes": sum(_local(p).numel() * p.element_size() for p in params),
        }
        optimizer = None
        if stage != "init":
            optimizer = _train_step(model, config, device, precision, stage == "step")
        result["state_bytes"] = _state_bytes(params, optimizer)
        if cuda:
            torch.cuda.synchronize()
            result["peak_bytes"] = torch.cuda.max_memory_allocated()
        else:
            result["peak_bytes"] = peak_rss_bytes()
            result["baseline_rss_bytes"] = baseline
            release_freed_memory()  # what stays resident is what is still in use
            result["rss_bytes"] = rss_bytes()
        result["seconds"] = round(time.perf_counter() - start, 2)
        # One write(2) per line: ranks share stdout, and a pipe keeps a write under PIPE_BUF
        # whole, where print's separate writes of text and newline could interleave.
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (json.dumps(result) + "\n").encode())
    finally:
        if mesh is not None:
            dist.destroy_process_group()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _train_step(
    model: OLMo2, config: TrainConfig, device: torch.device, precision: str, optimizer_step: bool
) -> torch.optim.Optimizer | None:
    """One forward/backward on random tokens as ``training_step`` runs it; then AdamW if asked."""
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.data.micro_batch_size, config.data.seq_len + 1)
    tokens = torch.randint(config.model.vocab_size, shape, generator=generator).to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
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
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def bench_main(argv: list[str] | None = None) -> int:
    """``tools/bench_memory.py``: N processes, one JSON line per rank."""
    parser = argparse.ArgumentParser(
        description="Measure per-rank memory of building (and one step of) a training config.",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) to start")
    parser.add_argument(
        "--stop-after",
        choices=STAGES,
        default="init",
        help="init: build + init; backward: + one forward/backward; step: + one AdamW step",
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=olmo2_1b")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {args.nproc}")
    config = _compose(args.overrides)
    strategy = config.trainer.strategy
    if args.nproc > 1 and strategy != "fsdp":
        raise SystemExit(
            f"error: --nproc {args.nproc} needs trainer=fsdp (trainer.strategy is {strategy!r})"
        )
    if config.trainer.precision == "bf16-true":
        raise SystemExit("error: trainer.precision=bf16-true is not measured by bench_memory")
    import torch.multiprocessing as mp

    if args.nproc > 1 and torch.cuda.is_available() and torch.cuda.device_count() < args.nproc:
        raise SystemExit(
            f"error: --nproc {args.nproc} but only {torch.cuda.device_count()} GPU(s) visible"
        )
    # The processes are the world: trainer.devices follows --nproc, as a launcher would set it.
    overrides = [*args.overrides, f"trainer.devices={args.nproc}", "trainer.num_nodes=1"]
    mp.start_processes(
        _bench_worker,
        args=(args.nproc, _free_port(), args.stop_after, overrides),
        nprocs=args.nproc,
        start_method="spawn",
    )
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(bench_main())
