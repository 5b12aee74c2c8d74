"""The OLMo 2 decoder and its configuration."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.kernels.linear_cross_entropy import IGNORE_INDEX
    from olmo_mini.model.config import OLMo2Config
    from olmo_mini.model.model import LossOutput, OLMo2

__all__ = ["IGNORE_INDEX", "LossOutput", "OLMo2", "OLMo2Config"]
__getattr__ = lazy_exports(
    __name__,
    {
        "IGNORE_INDEX": "olmo_mini.kernels.linear_cross_entropy",
        "LossOutput": ".model",
        "OLMo2": ".model",
        "OLMo2Config": ".config",
    },
)
