"""Sizing from the config and the model alone: FLOPs per token, datasheet peaks, the default
precision and the per-device memory plan. Below training: no Lightning, no trainer."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.sizing.flops import default_precision, flops_per_token
    from olmo_mini.sizing.memory import MemoryPlan, plan_memory

__all__ = ["MemoryPlan", "default_precision", "flops_per_token", "plan_memory"]
__getattr__ = lazy_exports(
    __name__,
    {
        "default_precision": ".flops",
        "flops_per_token": ".flops",
        "MemoryPlan": ".memory",
        "plan_memory": ".memory",
    },
)
