"""The OLMo 2 decoder, top to bottom: norm, RoPE, attention, MLP, block, model.

Plain PyTorch; numerics follow transformers' ``Olmo2ForCausalLM`` exactly so that the
same weights give the same logits. Probe modules (``Probe``) are identity hook points
that let the stability monitor see q and k without the model knowing about metrics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from olmo_mini.kernels import add_rms_norm, qk_rms_norm, rms_norm
from olmo_mini.kernels.linear_cross_entropy import LinearCrossEntropyOutput as LossOutput
from olmo_mini.kernels.linear_cross_entropy import linear_cross_entropy
from olmo_mini.model import hf
from olmo_mini.model.config import OLMo2Config, QKNorm
from olmo_mini.model.shards import init_

# The std of a standard normal truncated to [-2, 2] (JAX's truncated_normal initializers divide
# by it so that the truncated distribution has the std asked for).
TRUNCATED_NORMAL_STD = 0.87962566103423978


class Norm(nn.Module):
    """RMSNorm (HF ``Olmo2RMSNorm`` numerics) or bias-free LayerNorm, weight optional.

    Statistics and the weight multiply run in fp32; the result is cast back to the input
    dtype. RMSNorm goes through ``olmo_mini.kernels`` (fused Triton on GPU).
    """

    def __init__(self, size: int, config: OLMo2Config) -> None:
        super().__init__()
        self.kind = config.norm_type
        self.eps = config.norm_eps
        self.backend = config.norm_backend
        self.weight = nn.Parameter(torch.ones(size)) if config.norm_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps, self.backend)
        weight = None if self.weight is None else self.weight.float()
        return F.layer_norm(x.float(), x.shape[-1:], weight, None, self.eps).to(x.dtype)

    def add(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one fused pass where the backend allows."""
        if self.kind == "rms":
            return add_rms_norm(residual, x, self.weight, self.eps, self.backend)
        return residual + self(x)


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


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit L2 norm over its last dim, computed in fp32."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cap: float,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with logits ``cap * tanh(s / cap)`` (Gemma 2).

    Fused SDPA kernels cannot cap, so this is FlexAttention (a ``score_mod``, compiled) on
    CUDA for training, and otherwise a math path that materializes the ``[T, S]`` logits
    of every head: fine for the short sequences of small-scale studies, not for long ones.
    """
    if k.shape[1] != q.shape[1]:  # GQA: repeat each key/value head for its query group
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if q.is_cuda and mask is None:
        return _flex_softcapped_attention(q, k, v, cap, scale)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    logits = cap * torch.tanh(logits / cap)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(dim=-1) @ v.float()).to(q.dtype)


def _flex_softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float, scale: float
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return q_idx >= kv_idx

    def tanh_cap(score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    seq = q.shape[2]
    block_mask = create_block_mask(causal, None, None, seq, seq, device=q.device)
    return _compiled_flex_attention()(
        q, k, v, score_mod=tanh_cap, block_mask=block_mask, scale=scale
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """FlexAttention is only fast compiled; compile it once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    """Causal multi-head attention with optional GQA, QK-norm before RoPE, and SDPA.

    QK-norm (``model.qk_norm``) here: ``full`` (one norm over all heads, before the split into
    heads; OLMo 2), ``head`` (one norm of ``head_dim`` shared by the heads, after the split) or
    ``none``. ``qkv`` and ``l2`` change the computation: :class:`QKVNormAttention` and
    :class:`L2NormAttention` override one step each; :func:`attention` picks the class.
    """

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.softcap = config.attn_logit_softcap
        q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, q_size, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.d_model, bias=False)
        # QK-norm weights: over the whole projection (full, qkv) or one of head_dim for every head.
        self.norm_per_head = config.qk_norm == QKNorm.head
        q_width, kv_width = (self.head_dim,) * 2 if self.norm_per_head else (q_size, kv_size)
        has_qk_norm = config.qk_norm in (QKNorm.full, QKNorm.head, QKNorm.qkv)
        self.q_norm: Norm | None = Norm(q_width, config) if has_qk_norm else None
        self.k_norm: Norm | None = Norm(kv_width, config) if has_qk_norm else None
        self.v_norm: Norm | None = None  # QKVNormAttention's
        self.qk_scale: nn.Parameter | None = None  # L2NormAttention's
        # logits = (q . k) * softmax_scale for the q, k that logit_probe sees.
        self.softmax_scale = config.head_dim**-0.5
        self.pre_norm_probe = Probe()
        self.logit_probe = Probe()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape  # batch size, sequence length, d_model; nh heads of size hs, nkv for k, v
        q = self.q_proj(x)  # (B, T, nh * hs)
        k = self.k_proj(x)  # (B, T, nkv * hs)
        v = self.v_proj(x)  # (B, T, nkv * hs)
        q, k = self.pre_norm_probe(q, k)
        q, k, v = self.normalize_projections(q, k, v)  # full, qkv: all heads at once
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = self.normalize_heads(q, k)  # head, l2: each head on its own
        q, k = self.rotate(q, k, cos, sin)
        q, k = self.logit_probe(q, k)
        mask = None
        if cache is not None:  # k, v (B, nkv, S, hs) for all S positions so far; mask (T, S)
            k, v, mask = cache.update(k, v)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, self.softcap, self.softmax_scale, mask)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.softmax_scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs): the heads side by side
        return self.o_proj(y)

    def normalize_projections(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-width QK-norm, over all heads at once, on ``(B, T, heads * hs)``."""
        if self.q_norm is None or self.norm_per_head:
            return q, k, v
        return *self.normalize_qk(q, k), v

    def normalize_heads(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head QK-norm on ``(B, heads, T, hs)``."""
        return self.normalize_qk(q, k) if self.norm_per_head else (q, k)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm; RMSNorm on q and k runs as one fused launch on the Triton backend."""
        if self.q_norm.kind != "rms":
            return self.q_norm(q), self.k_norm(k)
        norm = self.q_norm
        return qk_rms_norm(q, k, norm.weight, self.k_norm.weight, norm.eps, norm.backend)


class QKVNormAttention(Attention):
    """``qk_norm=qkv`` (QKV-norm, Rybakov et al. 2024): the full-width QK-norm, and v too."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__(config)
        self.v_norm = Norm(config.n_kv_heads * config.head_dim, config)

    def normalize_projections(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().normalize_projections(q, k, v)
        return q, k, self.v_norm(v)


class L2NormAttention(Attention):
    """``qk_norm=l2`` (QKNorm, Henry et al. 2020): unit q and k per head, and after RoPE q times
    a learnable ``qk_scale`` that replaces 1/sqrt(head_dim), so the scale bounds the logits."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__(config)
        # Henry et al. 2020 initialize the scale to log2(L^2 - L) for sequence length L.
        length = config.max_seq_len
        self.initial_qk_scale = math.log2(max(length * length - length, 2))
        self.qk_scale = nn.Parameter(torch.tensor(self.initial_qk_scale))
        self.softmax_scale = 1.0

    def normalize_heads(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return unit(q), unit(k)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = super().rotate(q, k, cos, sin)
        return q * self.qk_scale.to(q.dtype), k


def attention(config: OLMo2Config) -> Attention:
    """The attention class for ``config.qk_norm``."""
    variants = {QKNorm.qkv: QKVNormAttention, QKNorm.l2: L2NormAttention}
    return variants.get(config.qk_norm, Attention)(config)


class LayerCache:
    """Keys and values of one layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(
        self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, like: torch.Tensor
    ):
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


class GeluMLP(nn.Module):
    """``down(gelu(up(x)))`` with the tanh approximation (Wortsman et al.'s JAX default)."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """One transformer block; ``reordered`` normalizes sublayer outputs, ``pre`` their inputs."""

    def __init__(self, config: OLMo2Config) -> None:
        super().__init__()
        self.reordered = config.block == "reordered"
        self.attention = attention(config)
        self.mlp = MLP(config) if config.mlp == "swiglu" else GeluMLP(config)
        self.attention_norm = Norm(config.d_model, config)
        self.mlp_norm = Norm(config.d_model, config)

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
        self.norm = Norm(config.d_model, config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """OLMo 2's truncated normal (std ``init_std``, cut at +-3 std) everywhere, or with
        ``init="wortsman"`` N(0, 1) embeddings and truncated normals of std 1/sqrt(fan_in); norm
        weights 1.

        With ``seed`` the result depends on nothing else (a private generator is used), not even
        on FSDP2 sharding: sharded parameters are drawn whole on the CPU, one at a time, and each
        rank keeps its part (``shards.init_``).
        """
        generator = None
        if seed is not None:
            weight = self.embed_tokens.weight
            device = "cpu" if isinstance(weight, DTensor) else weight.device
            generator = torch.Generator(device=device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                init_(module.weight, self._weight_init(module, generator))
            elif isinstance(module, Norm) and module.weight is not None:
                nn.init.ones_(module.weight)
            elif isinstance(module, L2NormAttention):
                module.qk_scale.data.fill_(module.initial_qk_scale)
        # Recomputed so that a model materialized from the meta device gets real tables.
        self.rope.inv_freq.copy_(self.rope.frequencies(self.rope.inv_freq.device))

    def _weight_init(
        self, module: nn.Linear | nn.Embedding, generator: torch.Generator | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The in-place initializer of ``module``'s weight under ``config.init``."""
        if self.config.init == "olmo2":
            std, cut = self.config.init_std, 3.0
        elif isinstance(module, nn.Embedding):
            return functools.partial(nn.init.normal_, mean=0.0, std=1.0, generator=generator)
        else:  # a normal cut at ±2σ has std 0.8796σ: widen σ so the result has 1/sqrt(fan_in)
            std, cut = module.in_features**-0.5 / TRUNCATED_NORMAL_STD, 2.0
        return functools.partial(
            nn.init.trunc_normal_, mean=0.0, std=std, a=-cut * std, b=cut * std, generator=generator
        )

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

    @overload
    def forward(
        self, input_ids: torch.Tensor, cache: list[LayerCache] | None = None
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: None = None,
        *,
        labels: torch.Tensor,
        z_loss: float = 0.0,
    ) -> LossOutput: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: list[LayerCache] | None = None,
        *,
        labels: torch.Tensor | None = None,
        z_loss: float = 0.0,
    ) -> torch.Tensor | LossOutput:
        """Logits ``[B, T, vocab_size]`` for token ids ``[B, T]``; with ``labels`` ``[B, T]``
        (``IGNORE_INDEX`` where a position does not count) the loss instead.

        The loss is mean cross-entropy plus ``z_loss * logsumexp(logits)**2``, computed by the
        chunked LM-head kernel: the full fp32 logits never exist, which saves memory and
        passes over them (a fifth of the fp32 training step on CPU). It lives in ``forward`` so that wrappers that hook the
        forward call (FSDP2's unsharding, ``torch.compile``) cover the LM head too.
        """
        hidden = self.hidden_states(input_ids, cache)
        if labels is None:  # soft-capped when final_logit_softcap is set
            logits, cap = self.lm_head(hidden), self.config.final_logit_softcap
            return logits if cap is None else cap * torch.tanh(logits / cap)
        if cache is not None:
            raise ValueError("labels and cache are exclusive: the loss is for training")
        return linear_cross_entropy(
            hidden, self.lm_head.weight, labels, z_loss, self.config.final_logit_softcap
        )

    def new_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        """An empty KV cache, one :class:`LayerCache` per block, for incremental decoding."""
        like = self.embed_tokens.weight
        cfg = self.config
        return [LayerCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, like) for _ in self.blocks]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Every parameter; with ``exclude_embeddings`` the non-embedding count: all but the token
        embedding and the LM head, Kaplan et al.'s N (docs/model.md), the one the console, the
        configs and the docs state."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n

    @classmethod
    def from_hf(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> OLMo2:
        """Build from a Hugging Face Olmo2 folder (``config.json`` + safetensors) on CPU."""
        path = Path(path)
        with torch.device("meta"):
            model = cls(hf.read_config(path))
        state = {name: tensor.to(dtype) for name, tensor in hf.tensors(path)}
        model.load_state_dict(state, strict=True, assign=True)
        model.rope.inv_freq = model.rope.frequencies()
        return model

    def save_hf(
        self,
        path: str | Path,
        dtype: torch.dtype | None = None,
        special_tokens: dict[str, int | None] | None = None,
    ) -> None:
        """Write a folder that transformers loads (:func:`olmo_mini.model.hf.save`)."""
        hf.save(self, path, dtype, special_tokens)
