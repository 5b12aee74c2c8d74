"""The OLMo 2 decoder and its configuration."""

from olmo_mini.kernels.linear_cross_entropy import IGNORE_INDEX
from olmo_mini.model.config import OLMo2Config
from olmo_mini.model.model import LossOutput, OLMo2

__all__ = ["IGNORE_INDEX", "LossOutput", "OLMo2", "OLMo2Config"]
