"""The OLMo 2 decoder, top to bottom: norm, RoPE, attention, MLP, block, model.

Plain PyTorch; numerics follow transformers' ``Olmo2ForCausalLM`` exactly so that the
same weights give the same logits. Probe modules (``Probe``) are identity hook points
that let the stability monitor see q and k without the model knowing about metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from olmo_mini.kernels import add_rms_norm, rms_norm
from olmo_mini.model import hf
from olmo_mini.model.config import OLMo2Config


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight; fp32 statistics and weight multiply (HF Olmo2RMSNorm)."""

    def __init__(self, size: int, eps: float, backend: str) -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)

    def add(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one fused pass where the backend allows."""
        return add_rms_norm(residual, x, self.weight, self.eps, self.backend)


class Probe(nn.Module):
    """Identity on ``(q, k)``: a stable place for forward hooks to capture them."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate half") RoPE tables, computed in fp32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (exponents / self.head_dim))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``[T, head_dim]`` for integer ``positions`` ``[T]``."""
        freqs = torch.outer(positions.float(), self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` in fp32 and cast back to its dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with optional GQA, QK-norm before RoPE, and SDPA."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.qk_norm = config.qk_norm
        q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, q_size, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.d_model, bias=False)
        if config.qk_norm != "none":
            # "full": one norm over all heads (OLMo 2); "head": one norm of head_dim shared by heads.
            full = config.qk_norm == "full"
            eps, backend = config.norm_eps, config.norm_backend
            self.q_norm = RMSNorm(q_size if full else config.head_dim, eps, backend)
            self.k_norm = RMSNorm(kv_size if full else config.head_dim, eps, backend)
        self.pre_norm_probe = Probe()
        self.logit_probe = Probe()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = self.pre_norm_probe(q, k)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.logit_probe(q, k)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v, mask = cache.update(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class LayerCache:
    """Keys and values of one layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``[B, H, T, D]``; return all keys, values and the causal mask."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of length {self.k.shape[2]} cannot hold {end} positions")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        query_pos = torch.arange(start, end, device=k.device)[:, None]
        mask = torch.arange(end, device=k.device)[None, :] <= query_pos
        return self.k[:, :, :end], self.v[:, :, :end], mask


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer block; ``reordered`` normalizes sublayer outputs, ``pre`` their inputs."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.reordered = config.block == "reordered"
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_backend)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_backend)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if self.reordered:  # OLMo 2: h = x + norm(attn(x)); out = h + norm(mlp(h))
            h = self.attention_norm.add(x, self.attention(x, cos, sin, cache))
            return self.mlp_norm.add(h, self.mlp(h))
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.mlp(self.mlp_norm(h))


class OLMo2(nn.Module):
    """Token embedding, ``n_layers`` blocks, final RMSNorm and an untied LM head."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_backend)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """Truncated normal (std ``init_std``, cut at +-3 std) everywhere; norm weights 1.

        With ``seed`` the result depends on nothing else (a private generator is used).
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(
                    module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator
                )
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Recomputed so that a model materialized from the meta device gets real tables.
        self.rope.inv_freq.copy_(self.rope.frequencies(self.rope.inv_freq.device))

    def rope_tables(self, seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(offset, offset + seq_len, device=self.rope.inv_freq.device)
        return self.rope(positions)

    def hidden_states(
        self, input_ids: torch.Tensor, cache: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, d_model]``, the LM head's input.

        With ``cache`` (from :meth:`new_cache`) the ids continue the cached sequence.
        """
        offset = cache[0].length if cache else 0
        if offset + input_ids.shape[-1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {offset + input_ids.shape[-1]} exceeds "
                f"max_seq_len {self.config.max_seq_len}"
            )
        cos, sin = self.rope_tables(input_ids.shape[-1], offset)
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i] if cache else None)
        return self.norm(x)

    def forward(
        self, input_ids: torch.Tensor, cache: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for token ids ``[B, T]``."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    def new_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        """An empty KV cache, one :class:`LayerCache` per block, for incremental decoding."""
        like = self.embed_tokens.weight
        cfg = self.config
        return [
            LayerCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, like) for _ in self.blocks
        ]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    @classmethod
    def from_hf(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> OLMo2:
        """Build from a Hugging Face Olmo2 folder (``config.json`` + safetensors) on CPU."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: not found; expected a Hugging Face Olmo2 folder")
        config = hf.config_from_hf(json.loads(config_file.read_text()))
        state = {
            hf.from_hf_key(name): tensor.to(dtype)
            for name, tensor in hf.load_hf_state_dict(path).items()
            if not name.endswith("rotary_emb.inv_freq")  # old exports carry this buffer
        }
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.rope.inv_freq = model.rope.frequencies()
        return model

    def save_hf(
        self,
        path: str | Path,
        dtype: torch.dtype | None = None,
        special_tokens: dict[str, int | None] | None = None,
    ) -> None:
        """Write a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

        ``special_tokens`` (``eos_token_id``, ``pad_token_id``, ``bos_token_id``) go into
        ``config.json``; tokenizer files are the caller's to add.
        """
        path = Path(path)
        dtype = dtype or self.embed_tokens.weight.dtype
        hf_config = hf.config_to_hf(self.config, dtype, special_tokens)
        path.mkdir(parents=True, exist_ok=True)
        state = {hf.to_hf_key(k): v.detach().to("cpu", dtype) for k, v in self.state_dict().items()}
        hf.save_hf_state_dict(state, path)
        (path / "config.json").write_text(json.dumps(hf_config, indent=2))
