"""The OLMo 2 decoder and its configuration."""

from olmo_mini.model.config import OLMo2Config
from olmo_mini.model.model import OLMo2

__all__ = ["OLMo2", "OLMo2Config"]
