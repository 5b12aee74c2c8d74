"""Sampling from an ``OLMo2``: temperature, top-k, top-p, seeded, with a KV cache."""

from __future__ import annotations

import torch

from olmo_mini.model.model import OLMo2


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` ``[B, V]``; ``temperature == 0`` is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: OLMo2,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue ``prompt_ids`` ``[B, T]`` by up to ``max_new_tokens``; returns ``[B, T + n]``.

    The same seed gives the same tokens. Without the cache every step re-runs the whole
    sequence (quadratic); it exists to check the cached path. Generation stops early once
    every row has produced ``eos_id``; finished rows are padded with it.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty [batch, length] tensor, got {tuple(prompt_ids.shape)}"
        )
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens = {total} exceeds max_seq_len {model.config.max_seq_len}"
        )
    device = prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(prompt_ids.shape[0], total) if use_cache else None
        ids = next_input = prompt_ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = model(next_input, cache)[:, -1] if use_cache else model(ids)[:, -1]
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_id)
                finished |= next_ids == eos_id
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
            next_input = next_ids[:, None]
        return ids
    finally:
        model.train(was_training)
