"""The memory of one training step, traced at the job's real world size on one CPU process.

``tools/plan_memory.py --trace`` builds the real model and FSDP2 wrapping
(``training.parallel.wrap_model``) on torch's "fake" process group with fake tensors, runs a
micro-batch and the optimizer update as the trainer runs them, and reads rank 0's memory by
category from torch's ``FSDPMemTracker`` beside the analytic plan (``olmo_mini.sizing.memory``).
What the trace stands for and what it leaves out (the CPU device standing for the GPU with the
Triton norms, no ``model.compile``, tensor bytes only): docs/scaling.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from olmo_mini import kernels
from olmo_mini.config import TrainConfig, compose_or_exit
from olmo_mini.model import OLMo2
from olmo_mini.sizing.memory import (
    MemoryPlan,
    plan_config,
    plan_memory,
    plan_parser,
    report_plan,
    verdict,
)

# The tracker's categories (``_FSDPRefType`` values) under the planner's terms.
PLANNED_AS = {
    "params": ("Sharded Param",),
    "grads": ("Sharded Grad",),
    "optimizer": ("OptState",),
    "fsdp_working_set": ("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter"),
    "activations": ("Activation", "Temp", "Inputs", "Buffer"),
}


@dataclass(frozen=True)
class Job:
    """A shipped model at the size it is meant to train at (see docs/scaling.md)."""

    model: str
    world_size: int
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool

    def overrides(self) -> list[str]:
        # Global batch 1024 sequences (OLMo 2's 4M tokens at 4096): every job accumulates.
        return [
            f"model={self.model}",
            "trainer=fsdp",
            f"trainer.devices={self.world_size}",
            "trainer.precision=bf16-mixed",
            f"trainer.activation_checkpointing={str(self.activation_checkpointing).lower()}",
            f"data.micro_batch_size={self.micro_batch_size}",
            f"data.seq_len={self.seq_len}",
            "data.global_batch_size=1024",
        ]


SHIPPED_JOBS = (
    Job("olmo2_tiny", 4, 8, 1024, False),
    Job("olmo2_small", 8, 8, 2048, False),
    Job("olmo2_1b", 8, 4, 4096, False),
    Job("olmo2_7b", 8, 2, 4096, False),
    Job("olmo2_7b", 8, 2, 4096, True),
    Job("olmo2_13b", 32, 2, 4096, True),
    Job("olmo2_32b", 64, 1, 4096, True),
)


@dataclass
class MemoryTrace:
    """Rank 0's tensor bytes at the step's peak, by tracker category, and the trace's cost."""

    world_size: int
    precision: str
    activation_checkpointing: bool
    accumulating: bool  # the traced micro-batch found the step's earlier gradients
    categories: dict[str, int]
    peak: int
    seconds: float

    def term(self, name: str) -> int:
        """The traced bytes of the planner term ``name`` (a ``PLANNED_AS`` key)."""
        return sum(self.categories.get(c, 0) for c in PLANNED_AS[name])


def trace_memory(config: TrainConfig) -> MemoryTrace:
    """Trace one steady-state training step of ``config`` on rank 0 of a fake process group."""
    # Here, not at the top: the plan alone (no --trace) should not pay for importing Lightning.
    from olmo_mini.training.optim import build_optimizer
    from olmo_mini.training.parallel import wrap_model

    trainer, data = config.trainer, config.data
    if trainer.strategy != "fsdp":
        raise SystemExit(
            f"error: --trace needs trainer=fsdp (trainer.strategy is {trainer.strategy!r})"
        )
    precision = "bf16-mixed" if trainer.precision == "auto" else trainer.precision
    if precision == "bf16-true":
        raise SystemExit("error: --trace does not trace trainer.precision=bf16-true")
    accumulating = config.grad_accum_steps > 1
    start = time.perf_counter()
    # The CPU stands for the GPU: the norms take their Triton path (fake implementations), as on CUDA.
    use_triton = kernels.triton_norm is not None and config.model.norm_backend != "torch"
    gpu_norms = mock.patch.object(kernels, "_use_triton", lambda backend, x: use_triton)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=trainer.world_size)
    try:
        # The mesh outside the fake mode: its constructor reads real rank tensors.
        mesh = init_device_mesh("cpu", (trainer.world_size,))
        with FakeTensorMode(), gpu_norms:
            with torch.device("meta"):
                model = OLMo2(config.model)
            wrap_model(model, trainer, precision, mesh)
            model.to_empty(device="cpu")  # fake storage: the weights' values do not matter
            optimizer = build_optimizer(model, config.optim)
            shape = (data.micro_batch_size, data.seq_len + 1)
            tokens = torch.randint(config.model.vocab_size, shape)

            def update() -> None:
                torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.optim.grad_clip, foreach=True
                )
                optimizer.step()
                optimizer.zero_grad()

            def earlier_gradients() -> None:
                """Sharded gradients as FSDP2's reduce-scatter leaves them."""
                for param in model.parameters():
                    param.grad = torch.zeros_like(param)

            # An untracked update first: it creates AdamW's state (the traced step is a steady-state
            # one) and fills DTensor's sharding-propagation cache, whose misses build global-shape
            # fake tensors that the tracker would count as the rank's memory.
            earlier_gradients()
            update()
            if accumulating:  # the traced micro-batch adds to the step's earlier ones
                earlier_gradients()
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((tokens,))
            with tracker:
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                    out = model(tokens[:, :-1], labels=tokens[:, 1:], z_loss=config.optim.z_loss)
                out.loss.backward()
                del out
                update()
            snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        dist.destroy_process_group()
    categories = {str(getattr(k, "value", k)): v for k, v in snapshot.items()}
    peak = categories.pop("Total")
    return MemoryTrace(
        world_size=trainer.world_size,
        precision=precision,
        activation_checkpointing=trainer.activation_checkpointing,
        accumulating=accumulating,
        categories=categories,
        peak=peak,
        seconds=round(time.perf_counter() - start, 1),
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def _diff(traced: int, planned: int) -> str:
    return f"{100 * (planned - traced) / traced:+.0f} %" if traced else ""


def format_trace(trace: MemoryTrace, plan: MemoryPlan) -> str:
    """Traced and planned GiB per rank, term by term, and the tracker's own categories."""
    # The tracker counts the LM-head loss's working memory as activations and temporaries.
    planned = {**asdict(plan), "activations": plan.total - plan.states - plan.fsdp_working_set}
    labels = {"activations": "activations + LM-head loss"}
    rows = [
        f"traced {plan.param_count / 1e9:.3f} B parameters, {trace.precision}, rank 0 of "
        f"{trace.world_size}, activation checkpointing {'on' if trace.activation_checkpointing else 'off'}, "
        f"{'accumulating' if trace.accumulating else 'one micro-batch per step'}, "
        f"{trace.seconds:.0f} s; GiB per rank at the peak:",
        f"  {'term':<26}{'traced':>9}{'planned':>9}  plan vs trace",
    ]
    for name in PLANNED_AS:
        rows.append(
            f"  {labels.get(name, name):<26}{_gib(trace.term(name)):>9}{_gib(planned[name]):>9}  "
            f"{_diff(trace.term(name), planned[name])}"
        )
    rows += [
        f"  {'peak (total)':<26}{_gib(trace.peak):>9}{_gib(plan.total):>9}  "
        f"{_diff(trace.peak, plan.total)}",
        "  tracker categories: "
        + ", ".join(f"{k} {_gib(v)}" for k, v in trace.categories.items() if v),
    ]
    return "\n".join(rows)


def shipped_table() -> str:
    """The markdown table of docs/scaling.md: every shipped job traced and planned."""
    lines = [
        "| model | ranks | micro-batch x seq | AC | params | grads | AdamW | FSDP working set "
        "| activations | traced peak | planned | plan vs trace | trace time | load |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for job in SHIPPED_JOBS:
        config = compose_or_exit(job.overrides())
        trace, plan = trace_memory(config), plan_memory(config)
        terms = " | ".join(_gib(trace.term(name)) for name in PLANNED_AS)
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        lines.append(
            f"| {job.model} | {job.world_size} | {job.micro_batch_size} x {job.seq_len} | "
            f"{'on' if job.activation_checkpointing else 'off'} | {terms} | {_gib(trace.peak)} | "
            f"{_gib(plan.total)} | {_diff(trace.peak, plan.total)} | {trace.seconds:.0f} s | {load} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/plan_memory.py``: the plan, or with ``--trace`` the traced step beside it."""
    parser = plan_parser()
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also trace one training step at the config's world size (fake process group "
        "and tensors, one CPU process) and print traced beside planned",
    )
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="trace every shipped model at its intended world size: the markdown table of "
        "docs/scaling.md (ignores the overrides)",
    )
    args = parser.parse_args(argv)
    if args.shipped:
        print(shipped_table())
        return 0
    if not args.trace:
        return report_plan(args)
    config = plan_config(args.overrides)
    trace, plan = trace_memory(config), plan_memory(config)
    checkpointing = config.trainer.activation_checkpointing
    fits = None if args.device_memory is None else verdict(plan, args.device_memory, checkpointing)
    if args.json:
        print(json.dumps({"trace": asdict(trace), "plan": asdict(plan), "verdict": fits}))
    else:
        print(format_trace(trace, plan))
        if fits is not None:
            print(fits)
    return 0
