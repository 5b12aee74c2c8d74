"""Memory per device, planned from the composed config before a cluster job is submitted
(``tools/plan_memory.py``; ``olmo_mini.bench.memory`` measures it). Per device:

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
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from olmo_mini.config import TrainConfig, compose_or_exit
from olmo_mini.model import OLMo2
from olmo_mini.sizing.flops import default_precision

ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32


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


def plan_memory(config: TrainConfig, device_type: str = "cuda") -> MemoryPlan:
    """Per-device memory of training ``config`` (see the module docstring for each term)."""
    trainer, data, arch = config.trainer, config.data, config.model
    precision = trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if device_type == "cuda" else default_precision(device_type)
    with torch.device("meta"):
        model = OLMo2(arch)
    count = model.num_params()
    block = sum(p.numel() for p in model.blocks[0].parameters()) if len(model.blocks) else 0
    root = count - block * len(model.blocks)  # embedding, final norm, LM head
    state_bytes = 2 if precision == "bf16-true" else 4
    compute_bytes = 4 if precision == "32-true" else 2
    shards = trainer.world_size if trainer.strategy == "fsdp" else 1
    params = -(-count * state_bytes // shards)
    optimizer = -(-count * ADAM_STATE_BYTES // shards)
    # The root and two blocks unsharded: their parameters, and gradients before reduce-scatter.
    working = 2 * (root + 2 * block) * compute_bytes if shards > 1 else 0
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


def plan_parser() -> argparse.ArgumentParser:
    """The arguments of ``tools/plan_memory.py`` (``olmo_mini.bench.trace`` adds ``--trace``)."""
    description = "Per-device memory of a training config (python train.py's overrides)."
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device precision=auto resolves for (default: cuda)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", help="e.g. model=olmo2_7b trainer=fsdp")
    return parser


def report_plan(args: argparse.Namespace) -> int:
    """Print the plan of ``args.overrides`` as a table or, with ``--json``, one object."""
    config = compose_or_exit(args.overrides)
    plan = plan_memory(config, args.device)
    if args.json:
        print(json.dumps({**asdict(plan), "states": plan.states}))
    else:
        print(format_plan(plan, config.trainer.activation_checkpointing))
    return 0
