"""KV-cached generation equals the uncached path and is deterministic for a seed."""

from __future__ import annotations

import torch

from olmo_mini import OLMo2, OLMo2Config
from olmo_mini.model.generation import generate, sample_next

CONFIG = OLMo2Config(
    vocab_size=200,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    mlp_hidden_size=128,
    max_seq_len=64,
)


def _model() -> OLMo2:
    model = OLMo2(CONFIG)
    model.init_weights(seed=0)
    return model


def test_cached_forward_equals_full_forward() -> None:
    model = _model()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(batch=2, max_len=16)
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :5], cache), model(ids[:, 5:6], cache), model(ids[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_cache_equals_no_cache_and_is_seeded() -> None:
    model = _model()
    prompt = torch.randint(0, 200, (3, 4), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=15, temperature=0.9, top_k=50, top_p=0.95)
    cached = generate(model, prompt, seed=11, **kwargs)
    uncached = generate(model, prompt, seed=11, use_cache=False, **kwargs)
    assert cached.shape == (3, 19)
    assert torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, generate(model, prompt, seed=11, **kwargs))
    assert not torch.equal(cached, generate(model, prompt, seed=12, **kwargs))


def test_greedy_picks_the_argmax() -> None:
    model = _model()
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, max_new_tokens=1, temperature=0)
    with torch.no_grad():
        assert out[0, -1] == model(prompt)[0, -1].argmax()


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    # softmax([4, 3, 2, 1, 0]) = [0.636, 0.234, 0.086, 0.032, 0.012]: 0.8 needs the top two.
    assert set(sample_next(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.6, generator=gen).tolist()) == {0}


def test_generation_stops_when_every_row_hit_eos() -> None:
    model = _model()
    prompt = torch.tensor([[5, 6]])
    greedy_next = generate(model, prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    out = generate(model, prompt, max_new_tokens=10, temperature=0, eos_id=greedy_next)
    assert out.shape == (1, 3)
