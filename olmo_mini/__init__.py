"""olmo-mini: small-scale pretraining of OLMo 2-style decoders for training-stability studies."""

from typing import TYPE_CHECKING

from olmo_mini._lazy import lazy_exports

if TYPE_CHECKING:
    from olmo_mini.model import OLMo2, OLMo2Config

__all__ = ["OLMo2", "OLMo2Config"]
__version__ = "0.1.0"
__getattr__ = lazy_exports(__name__, {"OLMo2": ".model", "OLMo2Config": ".model"})
