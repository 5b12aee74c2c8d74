"""``OLMo2Config``: every architectural choice of the decoder, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QK_NORMS = ("full", "head", "none")
BLOCKS = ("reordered", "pre")
NORM_BACKENDS = ("auto", "torch", "triton")


@dataclass
class OLMo2Config:
    """Architecture of an OLMo 2-style decoder.

    Defaults are OLMo 2's choices (RoPE theta 500k, eps 1e-6, full-width QK-norm,
    reordered norm, init std 0.02) on a tiny shape; the named sizes live in
    ``configs/model/*.yaml``. ``n_kv_heads=None`` means plain multi-head attention.
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
    qk_norm: str = "full"
    block: str = "reordered"
    init_std: float = 0.02
    norm_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "mlp_hidden_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OLMo2Config.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"OLMo2Config.{name} must be a positive number, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"OLMo2Config.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"OLMo2Config.n_heads ({self.n_heads}) must be divisible by "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"OLMo2Config.head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE"
            )
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        _check_choice("block", self.block, BLOCKS)
        _check_choice("norm_backend", self.norm_backend, NORM_BACKENDS)

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

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"OLMo2Config.{name} must be one of {list(choices)}, got {value!r}")
