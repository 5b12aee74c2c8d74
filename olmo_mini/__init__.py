"""olmo-mini: small-scale pretraining of OLMo 2-style decoders for training-stability studies."""

from olmo_mini.model import OLMo2, OLMo2Config

__all__ = ["OLMo2", "OLMo2Config"]
__version__ = "0.1.0"
