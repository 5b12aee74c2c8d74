"""Hugging Face ``Olmo2ForCausalLM`` folders <-> olmo-mini: key map and config translation.

Written without transformers: a folder is ``config.json`` plus safetensors files, so
conversion works wherever safetensors does. ``rms_norm_eps`` and ``rope_theta`` are always
written explicitly because transformers' Olmo2Config defaults (1e-5, 10000) differ from
the released models (1e-6, 500000).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from olmo_mini.model.config import OLMo2Config

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
_MAX_SHARD_BYTES = 4 * 1024**3
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
    for ours, theirs in _TOP_KEYS.items():
        if name == theirs:
            return ours
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match:
        for ours, theirs in _LAYER_KEYS.items():
            if match.group(2) == theirs:
                return f"blocks.{match.group(1)}.{ours}"
    raise KeyError(f"unexpected tensor {name!r} in a Hugging Face Olmo2 checkpoint")


def config_from_hf(hf: dict) -> OLMo2Config:
    """Translate an HF Olmo2 ``config.json`` mapping; refuses what Olmo2 cannot express."""
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
        max_seq_len=_context_length(hf.get("max_position_embeddings")),
        rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-5),  # transformers' class default when absent
        qk_norm="full",
        block="reordered",
        init_std=hf.get("initializer_range", 0.02),
    )


def _context_length(value: object) -> int:
    """``max_position_embeddings``, or :data:`DEFAULT_CONTEXT` where a peer wrote none (OLMo-core
    writes -1; RoPE has no learned positions, so any length loads)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    log.warning(
        "config.json: max_position_embeddings is %r; using max_seq_len=%d (OLMo 2's)",
        value,
        DEFAULT_CONTEXT,
    )
    return DEFAULT_CONTEXT


def generation_config(special_tokens: dict[str, int | None] | None) -> dict:
    """``generation_config.json`` content (what transformers' ``GenerationConfig`` writes): the
    special token ids, so that ``generate`` and OLMo-core's ``load_hf_model`` find them."""
    return {
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **(special_tokens or {}),
    }


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
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **(special_tokens or {}),
    }


def load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (one safetensors file or a sharded index), HF names."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """``safetensors``' ``save_file``, with the permissions of any other file written here:
    safetensors creates its files 0600, unreadable to the rest of a group sharing a folder."""
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def save_hf_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors, sharded with an index above 4 GiB, like transformers."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], path / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, path / filename)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
