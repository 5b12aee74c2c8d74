"""Memory per device, planned from the composed config before a cluster job is submitted
(``tools/plan_memory.py``; ``--trace`` checks it against a traced step, ``olmo_mini.bench.trace``;
``olmo_mini.bench.memory`` measures it on real processes). Per device, at the step's peak, which
for every shipped job is the chunked LM-head loss at the end of a forward:

- parameters: fp32 (bf16 under ``bf16-true``), divided by the world size under FSDP;
- gradients: as the parameters (FSDP2 reduce-scatters them into shards; from the second
  micro-batch of a global batch on, they exist during the forward);
- optimizer state: AdamW's two fp32 moments per parameter, sharded like the parameters;
- FSDP working set: what FSDP2 holds unsharded at that point, in the compute dtype: the root
  module's parameters (embedding, final norm, LM head; the root stays unsharded from forward to
  backward) and one block's all-gather buffer;
- activations saved for backward, per block ``B*T*(4*d + 3*q + 3*kv + 4*h)`` values in the
  compute dtype (block input, q and k before and after QK-norm and RoPE, v, the attention
  output, the o_proj and MLP outputs, the residual after attention, the four SwiGLU tensors;
  ``q``/``kv`` the query/key widths), the fp32 statistics (four RMSNorm rstds and attention's
  log-sum-exp per head, per token) and the RoPE tables, which FSDP2 casts to the compute dtype
  per block (``cast_forward_inputs``); plus the final norm's input and output. With activation checkpointing each block keeps only its input and RoPE tables, and
  one block's activations exist again while it is recomputed (after the loss's memory is gone);
- the chunked LM-head loss (``kernels/linear_cross_entropy.py``): its fp32 ``[V, d]`` weight
  gradient, computed in the forward and kept for backward, plus, at its peak, one chunk's
  matmul result and its fp32 copy (``grad_weight += (g.t() @ h).float()``), one chunk of fp32
  softmax ``[rows, V]`` with its compute-dtype copy, and the ``[B*T, d]`` hidden-state gradient.

Not counted: the CUDA caching allocator's slack and cuBLAS/NCCL workspaces (GPU memory reserved
beyond the tensors), and ``model.compile`` (a compiled block may save less than eager). The terms
are those of FSDP jobs (``tools/plan_memory.py --trace`` checks them); on one device under
``bf16-mixed`` autocast also caches a bf16 copy of every weight during the forward and the
residual stream stays fp32 (the embedding's output is fp32 without FSDP2's bf16 parameters),
which the plan does not count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass

import torch

from olmo_mini.config import TrainConfig, compose_or_exit, compose_unchecked
from olmo_mini.kernels.linear_cross_entropy import DEFAULT_CHUNK_ROWS
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
    lm_head_loss: int
    total_without_checkpointing: int
    total_with_checkpointing: int
    total: int  # the one of the two the config runs

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
    working = (root + block) * compute_bytes if shards > 1 else 0
    tokens, d, h = data.micro_batch_size * data.seq_len, arch.d_model, arch.mlp_hidden_size
    q, kv = arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    # RoPE's cos and sin [T, head_dim]: a bf16 copy per block under FSDP2 mixed precision.
    cast_per_block = shards > 1 and precision == "bf16-mixed"
    rope = 2 * data.seq_len * arch.head_dim * compute_bytes if cast_per_block else 0
    stats = tokens * 4 * (4 + arch.n_heads)  # fp32 rstd of four norms, log-sum-exp per head
    per_block = tokens * (4 * d + 3 * q + 3 * kv + 4 * h) * compute_bytes + stats + rope
    residual = tokens * d * compute_bytes
    outside = 2 * residual  # the final norm's input and output (block 0's input is counted)
    activations = arch.n_layers * per_block + outside
    checkpointed = arch.n_layers * (residual + rope) + outside
    loss = lm_head_loss_bytes(arch.vocab_size, d, tokens, compute_bytes)
    fixed = 2 * params + optimizer + working + loss
    without = fixed + activations
    # With checkpointing the peak is the loss or one block recomputed, whichever is larger.
    with_checkpointing = fixed + checkpointed + max(0, per_block - loss)
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
        lm_head_loss=loss,
        total_without_checkpointing=without,
        total_with_checkpointing=with_checkpointing,
        total=with_checkpointing if trainer.activation_checkpointing else without,
    )


def lm_head_loss_bytes(vocab: int, d_model: int, tokens: int, compute_bytes: int) -> int:
    """Peak bytes of the chunked LM-head loss's forward (see the module docstring)."""
    rows = min(DEFAULT_CHUNK_ROWS, tokens)
    mixed = compute_bytes != 4  # casts between the compute dtype and fp32 make copies
    # The fp32 gradient, a chunk's matmul result and (mixed) its fp32 copy.
    weight_grad = vocab * d_model * (4 + compute_bytes + (4 if mixed else 0))
    # A chunk's fp32 softmax and (mixed) its compute-dtype copy; the hidden-state gradient.
    chunk = rows * vocab * (4 + (compute_bytes if mixed else 0))
    return weight_grad + chunk + tokens * d_model * compute_bytes


def format_plan(plan: MemoryPlan, activation_checkpointing: bool) -> str:
    """The plan as a small table, GiB per device."""

    def gib(n: int) -> str:
        return f"{n / 2**30:10.2f} GiB"

    this = "  <- this config"
    without, with_ = ("", this) if activation_checkpointing else (this, "")
    rows = [
        f"{plan.param_count / 1e9:.3f} B parameters, {plan.precision}, {plan.devices} device(s), "
        f"states sharded {plan.shards} way(s); per device:",
        f"  parameters                      {gib(plan.params)}",
        f"  gradients                       {gib(plan.grads)}",
        f"  optimizer state (AdamW)         {gib(plan.optimizer)}",
        f"  FSDP working set (unsharded)    {gib(plan.fsdp_working_set)}",
        f"  activations, no checkpointing   {gib(plan.activations)}",
        f"  activations, checkpointing      {gib(plan.activations_checkpointed)}",
        f"  LM-head loss (chunked)          {gib(plan.lm_head_loss)}",
        f"  total, no checkpointing         {gib(plan.total_without_checkpointing)}{without}",
        f"  total, checkpointing            {gib(plan.total_with_checkpointing)}{with_}",
    ]
    return "\n".join(rows)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1.5TiB`` (case and a space ignored) as bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size like 80GiB, 80GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "i" in unit else 1000
    return int(number * base ** ("kmgt".index(unit[0]) + 1))


def verdict(plan: MemoryPlan, device_memory: int, activation_checkpointing: bool) -> str:
    """One line: whether the config fits ``device_memory`` per device, and what would."""
    limit = f"{device_memory / 2**30:.1f} GiB"

    def share(n: int) -> str:
        return f"{n / 2**30:.2f} GiB, {n / device_memory:.0%} of {limit}"

    if plan.total <= device_memory:
        return f"fits: {share(plan.total)} per device"
    if not activation_checkpointing and plan.total_with_checkpointing <= device_memory:
        return (
            f"does not fit: {share(plan.total)} per device; with "
            f"trainer.activation_checkpointing=true it fits ({share(plan.total_with_checkpointing)})"
        )
    return (
        f"does not fit: {share(plan.total)} per device (with checkpointing "
        f"{share(plan.total_with_checkpointing)}); shard over more devices (trainer=fsdp, "
        "trainer.devices) or lower data.micro_batch_size"
    )


def plan_config(overrides: list[str]) -> TrainConfig:
    """The config of ``overrides`` as ``compose_or_exit`` gives it, except that a
    ``data.global_batch_size`` that is no multiple of ``data.micro_batch_size`` × world size
    becomes the nearest one, with a note on stderr: the plan does not depend on it."""
    try:
        raw = compose_unchecked(overrides)
        unit = raw.data.micro_batch_size * raw.trainer.devices * raw.trainer.num_nodes
        batch = raw.data.global_batch_size
    except Exception:  # a bad override: compose_or_exit names it
        return compose_or_exit(overrides)
    if isinstance(batch, int) and isinstance(unit, int) and unit > 0 and batch % unit:
        nearest = max(unit, round(batch / unit) * unit)
        print(
            f"note: data.global_batch_size={batch} is no multiple of data.micro_batch_size × "
            f"world size ({unit}); planned with the nearest that is, {nearest}",
            file=sys.stderr,
        )
        key = "data.global_batch_size"
        overrides = [o for o in overrides if o.lstrip("+").split("=")[0] != key]
        overrides.append(f"{key}={nearest}")
    return compose_or_exit(overrides)


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
    parser.add_argument(
        "--device-memory",
        type=parse_bytes,
        metavar="SIZE",
        help="a device's memory (80GiB, 141GB): add whether the config fits it",
    )
    parser.add_argument("overrides", nargs="*", help="e.g. model=olmo2_7b trainer=fsdp")
    return parser


def report_plan(args: argparse.Namespace) -> int:
    """Print the plan of ``args.overrides`` as a table or, with ``--json``, one object."""
    config = plan_config(args.overrides)
    plan = plan_memory(config, args.device)
    checkpointing = config.trainer.activation_checkpointing
    fits = None if args.device_memory is None else verdict(plan, args.device_memory, checkpointing)
    if args.json:
        print(json.dumps({**asdict(plan), "states": plan.states, "verdict": fits}))
    else:
        print(format_plan(plan, checkpointing))
        if fits is not None:
            print(fits)
    return 0
