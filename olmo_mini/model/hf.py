"""Hugging Face ``Olmo2ForCausalLM`` folders <-> olmo-mini, both directions: the key map, the
config translation, reading folders one tensor at a time and writing them. ``OLMo2.from_hf``
builds a model from what this reads; ``OLMo2.save_hf`` is :func:`save`.

Written without transformers: a folder is ``config.json`` plus safetensors files (one, or shards
with an index), so conversion works wherever safetensors does. ``rms_norm_eps`` and
``rope_theta`` are always written explicitly because transformers' Olmo2Config defaults (1e-5,
10000) differ from the released models (1e-6, 500000).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from olmo_mini.model.config import OLMo2Config

if TYPE_CHECKING:
    from olmo_mini.model.model import OLMo2

# olmo-mini name (with {i} for the layer) -> HF Olmo2ForCausalLM name.
_LAYER_KEYS = {
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp_norm.weight": "post_feedforward_layernorm.weight",
}
_TOP_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# OLMo 2's context, for folders whose config gives none (OLMo-core writes -1).
DEFAULT_CONTEXT = 4096
log = logging.getLogger(__name__)


def to_hf_key(name: str) -> str:
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_KEYS:
        return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_key(name: str) -> str:
    top = {theirs: ours for ours, theirs in _TOP_KEYS.items()}
    layer = {theirs: ours for ours, theirs in _LAYER_KEYS.items()}
    if name in top:
        return top[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in layer:
        return f"blocks.{match.group(1)}.{layer[match.group(2)]}"
    raise KeyError(f"unexpected tensor {name!r} in a Hugging Face Olmo2 checkpoint")


def config_from_hf(hf: dict, source: str = "config.json") -> OLMo2Config:
    """Translate an HF Olmo2 ``config.json`` mapping (read from ``source``); refuses what Olmo2
    cannot express."""
    if hf.get("model_type") != "olmo2":
        raise ValueError(f"expected model_type 'olmo2', got {hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings"):
        raise ValueError("tied word embeddings are not part of OLMo 2; refusing to convert")
    if hf.get("attention_bias"):
        raise ValueError("attention biases are not part of OLMo 2; refusing to convert")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"RoPE scaling is not supported: {hf.get('rope_scaling') or rope}")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        raise ValueError("head_dim other than hidden_size // num_attention_heads is not supported")
    return OLMo2Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        mlp_hidden_size=hf["intermediate_size"],
        max_seq_len=_context_length(hf.get("max_position_embeddings"), source),
        rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-5),  # transformers' class default when absent
        qk_norm="full",
        block="reordered",
        init_std=hf.get("initializer_range", 0.02),
    )


def _context_length(value: object, source: str) -> int:
    """``max_position_embeddings``, or :data:`DEFAULT_CONTEXT` where a peer wrote none (OLMo-core
    writes -1; RoPE has no learned positions, so any length loads)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    _warn_default_context(source, repr(value))
    return DEFAULT_CONTEXT


@functools.cache
def _warn_default_context(source: str, value: str) -> None:
    """Once per file and process: a tool reads one folder's config several times."""
    log.warning(
        "%s: max_position_embeddings is %s; using max_seq_len=%d (OLMo 2's)",
        source,
        value,
        DEFAULT_CONTEXT,
    )


def generation_config(special_tokens: dict[str, int | None] | None) -> dict:
    """``generation_config.json`` content (what transformers' ``GenerationConfig`` writes): the
    special token ids, so that ``generate`` and OLMo-core's ``load_hf_model`` find them."""
    return dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")) | (special_tokens or {})


def config_to_hf(
    config: OLMo2Config,
    torch_dtype: torch.dtype = torch.float32,
    special_tokens: dict[str, int | None] | None = None,
) -> dict:
    """HF ``config.json`` content; ``special_tokens`` maps e.g. ``eos_token_id`` to an id."""
    if not config.is_olmo2:
        raise ValueError(
            "Hugging Face Olmo2 is block='reordered', qk_norm='full', norm_type='rms' with "
            f"weights and no soft-capping; this model has block={config.block!r}, "
            f"qk_norm={config.qk_norm!r}, norm_type={config.norm_type!r}, "
            f"norm_affine={config.norm_affine}, attn_logit_softcap={config.attn_logit_softcap}, "
            f"final_logit_softcap={config.final_logit_softcap} and cannot be exported as Olmo2"
        )
    return {
        "architectures": ["Olmo2ForCausalLM"],
        "model_type": "olmo2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": config.init_std,
        "use_cache": True,
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
        "dtype": str(torch_dtype).removeprefix("torch."),
        # Unset ids would otherwise default to GPT-NeoX's (50279), wrong for any other tokenizer.
        **generation_config(special_tokens),
    }


def read_config(path: Path) -> OLMo2Config:
    """The architecture of an HF folder, from its ``config.json``; errors name that file."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; expected a Hugging Face Olmo2 folder")
    try:
        return config_from_hf(json.loads(config_file.read_text()), str(config_file))
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{config_file}: not a convertible Hugging Face Olmo2 model: {e}"
        ) from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF folder: the shards its index names, or the one file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def stream_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of safetensors files, one whole tensor at a time."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
        except SafetensorError as e:  # a truncated or overwritten file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        for key in keys:
            # Opened per tensor: the file is memory-mapped while open, and every page read
            # stays resident until it is closed, which would add up to the whole file.
            with safe_open(str(file), framework="pt") as f:
                yield key, f.get_tensor(key)


def tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(olmo-mini name, tensor)`` of an HF folder's weights, one at a time."""
    for name, tensor in stream_safetensors(weight_files(path)):
        if not name.endswith("rotary_emb.inv_freq"):  # old exports carry this buffer
            try:
                key = from_hf_key(name)
            except KeyError as e:  # not an Olmo2 folder after all
                raise ValueError(f"{path}: {e.args[0]}") from None
            yield key, tensor


def save(
    model: OLMo2,
    path: str | Path,
    dtype: torch.dtype | None = None,
    special_tokens: dict[str, int | None] | None = None,
) -> None:
    """Write a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Weights are sharded with an index as transformers shards them (``huggingface_hub``);
    ``special_tokens`` (``eos_token_id``, ``pad_token_id``, ``bos_token_id``) go into
    ``config.json`` and ``generation_config.json``; tokenizer files are the caller's to add.
    """
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    dtype = dtype or model.embed_tokens.weight.dtype
    config = config_to_hf(model.config, dtype, special_tokens)
    path.mkdir(parents=True, exist_ok=True)
    state = {to_hf_key(k): v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    save_torch_state_dict(state, path)
    # safetensors creates its files 0600, unreadable to the rest of a group sharing a folder.
    umask = os.umask(0)
    os.umask(umask)
    for file in weight_files(path):
        file.chmod(0o666 & ~umask)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps(generation_config(special_tokens), indent=2)
    )
