"""olmo-mini's logits equal transformers' Olmo2ForCausalLM on the same weights, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Olmo2ForCausalLM
from transformers import Olmo2Config as HFOlmo2Config

from olmo_mini import OLMo2, OLMo2Config

SHAPES = {
    "mha": dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=160
    ),
    "gqa": dict(
        vocab_size=320, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, mlp_hidden_size=200
    ),
    "mqa_odd": dict(
        vocab_size=301, d_model=72, n_layers=2, n_heads=3, n_kv_heads=1, mlp_hidden_size=97
    ),
}


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1; perturb them so a swapped or missing norm shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_save_hf_loads_in_transformers_with_same_logits(shape: str, tmp_path: Path) -> None:
    config = OLMo2Config(max_seq_len=64, rope_theta=10_000.0, norm_eps=1e-5, **SHAPES[shape])
    model = OLMo2(config)
    model.init_weights(seed=1)
    _randomize_norms(model, seed=2)
    model.save_hf(tmp_path)

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(hf_model, Olmo2ForCausalLM)
    assert hf_model.config.rms_norm_eps == 1e-5
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_from_hf_matches_transformers_logits(shape: str, tmp_path: Path) -> None:
    s = SHAPES[shape]
    hf_config = HFOlmo2Config(
        vocab_size=s["vocab_size"],
        hidden_size=s["d_model"],
        intermediate_size=s["mlp_hidden_size"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"],
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        initializer_range=0.05,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(3)
    hf_model = Olmo2ForCausalLM(hf_config).eval()
    _randomize_norms(hf_model, seed=4)
    hf_model.save_pretrained(tmp_path)

    model = OLMo2.from_hf(tmp_path)
    assert model.config.rope_theta == 500_000.0 and model.config.norm_eps == 1e-6
    ids = _ids(s["vocab_size"], seed=5)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = OLMo2(OLMo2Config(max_seq_len=32, **SHAPES["gqa"]))
    _randomize_norms(model, seed=0)
    model.save_hf(tmp_path)
    again = OLMo2.from_hf(tmp_path)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_export_refuses_architectures_hf_olmo2_cannot_express(tmp_path: Path) -> None:
    for variant in (dict(qk_norm="head"), dict(qk_norm="none"), dict(block="pre")):
        model = OLMo2(OLMo2Config(max_seq_len=32, **SHAPES["mha"], **variant))
        with pytest.raises(ValueError, match="cannot be exported as Olmo2"):
            model.save_hf(tmp_path / str(variant))


def test_from_hf_names_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        OLMo2.from_hf(tmp_path / "nowhere")
