"""``OLMo2Config``: every architectural choice of the decoder, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from olmo_mini.validation import ConfigError, one_of, positive


class QKNorm(str, Enum):
    """``model.qk_norm``: how attention normalizes q and k (see docs/model.md).

    The one list of allowed values: Hydra's schema checks the YAML against it, ``one_of`` a
    value given in Python. Members are named by their values because OmegaConf reads a YAML
    value as a member name; they print as that value, the spelling the user writes.
    """

    full = "full"
    head = "head"
    none = "none"
    l2 = "l2"
    qkv = "qkv"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


CHOICES = {
    "qk_norm": QKNorm,
    "block": ("reordered", "pre"),
    "norm_type": ("rms", "layer"),
    "norm_backend": ("auto", "torch", "triton"),
    "mlp": ("swiglu", "gelu"),
    "init": ("olmo2", "wortsman"),
}
# The shape: what configs/model/*.yaml name.
SIZES = tuple("vocab_size d_model n_layers n_heads n_kv_heads mlp_hidden_size max_seq_len".split())


@dataclass
class OLMo2Config:
    """Architecture of an OLMo 2-style decoder.

    Defaults are OLMo 2's choices (RoPE theta 500k, eps 1e-6, full-width QK-norm,
    reordered norm, init std 0.02) on a tiny shape; the named sizes live in
    ``configs/model/*.yaml``. ``n_kv_heads=None`` means plain multi-head attention. The
    stability interventions (``qk_norm``, ``norm_type``, ``norm_affine``, the soft-caps, the
    Wortsman et al. 2023 block: ``mlp="gelu"``, ``init="wortsman"``) are all off by default;
    docs/model.md describes every field, and ``olmo_mini.model.model`` each variant.
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_hidden_size: int = 768
    max_seq_len: int = 1024
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    qk_norm: QKNorm = QKNorm.full
    block: str = "reordered"
    init_std: float = 0.02
    norm_backend: str = "auto"
    norm_type: str = "rms"
    norm_affine: bool = True
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    mlp: str = "swiglu"
    init: str = "olmo2"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        softcaps = ("attn_logit_softcap", "final_logit_softcap")
        positive("model", self, *SIZES, "rope_theta", "norm_eps", "init_std", *softcaps)
        for name, divisor in (("d_model", "n_heads"), ("n_heads", "n_kv_heads")):
            if getattr(self, name) % getattr(self, divisor):
                raise ConfigError(
                    f"model.{name} ({getattr(self, name)}) must be divisible by "
                    f"{divisor} ({getattr(self, divisor)})"
                )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE"
            )
        for name, choices in CHOICES.items():
            one_of("model", self, name, choices)
        self.qk_norm = QKNorm(self.qk_norm)
        if self.norm_backend == "triton" and self.norm_type != "rms":
            raise ConfigError("model.norm_backend 'triton' has kernels for norm_type 'rms' only")

    @property
    def is_olmo2(self) -> bool:
        """True when the architecture is exactly OLMo 2 (what HF ``Olmo2ForCausalLM`` expresses)."""
        return (
            self.block == "reordered"
            and self.qk_norm == QKNorm.full
            and self.norm_type == "rms"
            and self.norm_affine
            and self.mlp == "swiglu"
            and self.attn_logit_softcap is None
            and self.final_logit_softcap is None
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OLMo2Config:
        """Build from a mapping (a YAML file, a Hydra node); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "_target_"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"OLMo2Config: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OLMo2Config:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of OLMo2Config fields")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
