"""Architecture switches, initialization, named sizes and config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import Olmo2Config as HFOlmo2Config
from transformers import Olmo2ForCausalLM

from olmo_mini import OLMo2, OLMo2Config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
SMALL = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=96, max_seq_len=32)


def _logits(config: OLMo2Config, ids: torch.Tensor) -> torch.Tensor:
    model = OLMo2(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        return model(ids)


def test_forward_shape_and_dtype() -> None:
    ids = torch.randint(0, 128, (3, 11))
    logits = OLMo2(OLMo2Config(**SMALL))(ids)
    assert logits.shape == (3, 11, 128) and logits.dtype == torch.float32


def test_no_biases_and_untied_head() -> None:
    model = OLMo2(OLMo2Config(**SMALL))
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("qk_norm", ["full", "head", "none"])
@pytest.mark.parametrize("block", ["reordered", "pre"])
def test_variants_build_run_and_differ_from_olmo2(qk_norm: str, block: str) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = _logits(OLMo2Config(qk_norm=qk_norm, block=block, **SMALL), ids)
    assert torch.isfinite(logits).all()
    reference = _logits(OLMo2Config(**SMALL), ids)
    if (qk_norm, block) == ("full", "reordered"):
        assert torch.equal(logits, reference)
    else:
        assert (logits - reference).abs().max() > 1e-3


def test_qk_norm_weight_sizes() -> None:
    full = OLMo2(OLMo2Config(**{**SMALL, "n_kv_heads": 2})).blocks[0].attention
    assert full.q_norm.weight.shape == (64,) and full.k_norm.weight.shape == (32,)
    head = OLMo2(OLMo2Config(qk_norm="head", **SMALL)).blocks[0].attention
    assert head.q_norm.weight.shape == (16,) and head.k_norm.weight.shape == (16,)
    none = OLMo2(OLMo2Config(qk_norm="none", **SMALL)).blocks[0].attention
    assert none.q_norm is None and none.k_norm is None


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    """GQA with k/v weights duplicated per group is exactly MHA."""
    gqa = OLMo2(OLMo2Config(qk_norm="head", **{**SMALL, "n_kv_heads": 2}))
    mha = OLMo2(OLMo2Config(qk_norm="head", **SMALL))
    state = gqa.state_dict()
    for i in range(SMALL["n_layers"]):
        for proj in ("k_proj", "v_proj"):
            key = f"blocks.{i}.attention.{proj}.weight"
            heads = state[key].view(2, 16, 64)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_causality() -> None:
    model = OLMo2(OLMo2Config(**SMALL))
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 128
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


def test_init_statistics_match_truncated_normal() -> None:
    config = OLMo2Config(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, mlp_hidden_size=512)
    model = OLMo2(config)
    model.init_weights(seed=0)
    std = config.init_std
    # Std of a normal truncated at +-3 sigma: sigma * sqrt(1 - 2*3*phi(3) / (Phi(3) - Phi(-3))).
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    expected_std = std * math.sqrt(1 - 6 * phi3 / math.erf(3 / math.sqrt(2)))
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        assert param.abs().max() <= 3 * std + 1e-7, name
        if param.numel() >= 2**16:
            assert abs(param.mean().item()) < 3 * expected_std / math.sqrt(param.numel()) * 3, name
            assert param.std().item() == pytest.approx(expected_std, rel=0.02), name


def test_wortsman_init_std_per_parameter() -> None:
    # Embedding N(0, 1); every matrix std 1/sqrt(fan_in), cut at 2 / 0.8796 of it: q/k/v/o,
    # up and the LM head read d_model = 64 (std 1/8), down reads 256 (std 1/16).
    config = OLMo2Config(**{**SMALL, "vocab_size": 1024, "mlp_hidden_size": 256}, init="wortsman")
    model = OLMo2(config)
    model.init_weights(seed=0)
    expected = {"embed_tokens.weight": 1.0, "lm_head.weight": 1 / 8}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        expected[f"blocks.0.attention.{name}.weight"] = 1 / 8
    expected |= {"blocks.1.mlp.up_proj.weight": 1 / 8, "blocks.1.mlp.down_proj.weight": 1 / 16}
    params = dict(model.named_parameters())
    for name, std in expected.items():
        weight = params[name].detach()
        assert weight.std().item() == pytest.approx(std, rel=0.05), name
        assert weight.mean().abs().item() < 0.05 * std, name
        if name != "embed_tokens.weight":  # truncated at ±2σ, σ = std / 0.8796
            bound = 2 * std / 0.87962566103423978
            assert bound * 0.97 < weight.abs().max().item() <= bound, name
    assert params["embed_tokens.weight"].abs().max().item() > 4  # untruncated N(0, 1)
    assert torch.equal(params["blocks.0.attention_norm.weight"], torch.ones(64))


def test_gelu_mlp_shapes_and_values() -> None:
    config = OLMo2Config(**{**SMALL, "mlp_hidden_size": 4 * 64}, mlp="gelu")
    model = OLMo2(config)
    mlp = model.blocks[0].mlp
    shapes = {name: tuple(p.shape) for name, p in mlp.named_parameters()}
    assert shapes == {"up_proj.weight": (256, 64), "down_proj.weight": (64, 256)}
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    hidden = x @ mlp.up_proj.weight.T
    tanh_gelu = (
        0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    )
    torch.testing.assert_close(mlp(x), tanh_gelu @ mlp.down_proj.weight.T)
    assert not config.is_olmo2 and OLMo2Config(**SMALL).is_olmo2


def test_init_is_seeded_and_reproducible() -> None:
    config = OLMo2Config(**SMALL)
    a, b, c = OLMo2(config), OLMo2(config), OLMo2(config)
    a.init_weights(seed=7)
    b.init_weights(seed=7)
    c.init_weights(seed=8)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_meta_device_model_materializes_to_the_seeded_init() -> None:
    config = OLMo2Config(**SMALL)
    with torch.device("meta"):
        lazy = OLMo2(config)
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=3)
    eager = OLMo2(config)
    eager.init_weights(seed=3)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(lazy(ids), eager(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b"])
def test_released_sizes_match_transformers_parameter_counts(name: str) -> None:
    config = OLMo2Config.from_yaml(CONFIGS / f"{name}.yaml")
    hf_config = HFOlmo2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        ours = OLMo2(config).num_params()
        theirs = sum(p.numel() for p in Olmo2ForCausalLM(hf_config).parameters())
    assert ours == theirs
    expected = {"olmo2_1b": 1.48e9, "olmo2_7b": 7.30e9, "olmo2_13b": 13.7e9, "olmo2_32b": 32.2e9}
    assert ours == pytest.approx(expected[name], rel=0.01)


def test_non_embedding_count_leaves_out_the_embedding_and_the_lm_head() -> None:
    """olmo2_small by hand: 12 blocks of attention (4 d^2), SwiGLU (3 d h) and four norms of d
    (q, k, post-attention, post-MLP), plus the final norm; its config comment says 85M."""
    config = OLMo2Config.from_yaml(CONFIGS / "olmo2_small.yaml")
    d, h = 768, 2048
    with torch.device("meta"):
        model = OLMo2(config)
    non_embedding = 12 * (4 * d * d + 3 * d * h + 4 * d) + d
    assert model.num_params(exclude_embeddings=True) == non_embedding == 84_972_288
    assert model.num_params() == non_embedding + 2 * 32768 * d
    assert "(85M non-embedding)" in (CONFIGS / "olmo2_small.yaml").read_text().splitlines()[0]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_file_is_a_valid_flat_mapping(path: Path) -> None:
    config = OLMo2Config.from_yaml(path)
    assert config.vocab_size % 128 == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(d_model=100, n_heads=3), r"d_model \(100\) must be divisible by n_heads \(3\)"),
        (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        (dict(qk_norm="layer"), r"qk_norm must be one of \['full', 'head', 'none', 'l2', 'qkv'\]"),
        (dict(norm_type="batch"), r"norm_type must be one of \['rms', 'layer'\]"),
        (dict(attn_logit_softcap=0.0), r"attn_logit_softcap must be a positive number"),
        (dict(norm_type="layer", norm_backend="triton"), r"norm_backend 'triton' has kernels"),
        (dict(block="post"), r"block must be one of \['reordered', 'pre'\]"),
        (dict(norm_backend="cuda"), r"norm_backend must be one of"),
        (dict(n_layers=0), r"n_layers must be a positive integer"),
        (dict(vocab_size=-5), r"vocab_size must be a positive integer"),
        (dict(norm_eps=0.0), r"norm_eps must be a positive number"),
        (dict(d_model=12, n_heads=4), r"head_dim .* must be even"),
        (dict(mlp="relu"), r"model.mlp must be one of \['swiglu', 'gelu'\]"),
        (dict(init="xavier"), r"model.init must be one of \['olmo2', 'wortsman'\]"),
    ],
)
def test_bad_config_raises_naming_the_field(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OLMo2Config(**{**SMALL, **override})


def test_unknown_field_in_mapping_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['d_modle'\]"):
        OLMo2Config.from_dict({"d_modle": 64})


def test_sequence_longer_than_max_seq_len_is_an_error() -> None:
    model = OLMo2(OLMo2Config(**SMALL))
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
