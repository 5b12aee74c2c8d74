"""How the model is built and spread over devices: strategy, init, AC, compile, FSDP2.

Build order per block follows torchtitan: activation checkpointing, then ``torch.compile``,
then ``fully_shard``; the root is sharded last.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.device_mesh import DeviceMesh

from olmo_mini.config import ModelConfig, TrainerConfig
from olmo_mini.interop import load_init_weights
from olmo_mini.model import OLMo2


def build_strategy(config: TrainerConfig) -> Strategy | str:
    if config.strategy == "fsdp":
        # data_parallel_size must be explicit: "auto" would put the devices into tensor parallel.
        return ModelParallelStrategy(data_parallel_size=config.world_size, tensor_parallel_size=1)
    if config.strategy == "ddp":
        return DDPStrategy()
    return "auto"


def cluster_plugins() -> list[ClusterEnvironment]:
    """Lightning's SLURM environment where Lightning would pick it (torchrun takes precedence),
    without its auto-requeue: ``training.interrupt.StopOnSignal`` saves and requeues itself."""
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def build_model(
    config: ModelConfig,
    seed: int,
    trainer: TrainerConfig,
    precision: str,
    mesh: DeviceMesh | None = None,
) -> OLMo2:
    """An initialized OLMo2, wrapped as ``trainer`` asks; its weights depend on ``seed`` only.

    The model is built on the meta device and wrapped (AC, compile, ``fully_shard``) before any
    memory exists; then each rank materializes only its shards. Init and ``model.init_from``
    produce each parameter whole on the CPU, one at a time, and keep the local part
    (``model.shards``): the peak is the rank's shards plus one parameter and its init scratch,
    and the weights equal the single-device init for any world size (DTensor random ops would
    not). The full tensors are drawn on the CPU with a CPU generator, as on one device.
    """
    with torch.device("meta"):
        model = OLMo2(config)
    wrap_model(model, trainer, precision, mesh, compiled=config.compile)
    model.to_empty(device="cpu" if mesh is None else mesh.device_type)
    model.init_weights(seed)
    if config.init_from is not None:
        load_init_weights(model, config.init_from)
    return model


def wrap_model(
    model: OLMo2,
    trainer: TrainerConfig,
    precision: str,
    mesh: DeviceMesh | None = None,
    compiled: bool = False,
) -> None:
    """Activation checkpointing, ``torch.compile`` (``compiled``) and ``fully_shard`` as
    ``trainer`` asks, in place, on a model without memory yet (``build_model``; the memory
    trace, ``olmo_mini.bench.trace``, wraps a fake-tensor model so)."""
    # One graph for embedding, blocks, final norm and the chunked LM-head loss where nothing
    # wraps the blocks (one device, or DDP, which wraps the LightningModule): per-block graphs
    # leave the loss and the glue eager.
    whole_model_compile = compiled and mesh is None and not trainer.activation_checkpointing
    for block in model.blocks:
        if trainer.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)  # in place: parameter names stay those of the plain model
        if compiled and not whole_model_compile:
            block.compile()
    if whole_model_compile:
        model.compile()  # compiles the module call in place: names and hooks stay
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision == "bf16-mixed":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
