"""The whole tiny OLMo 2 with ``norm_backend="triton"`` equals ``"torch"``: logits and grads."""

from __future__ import annotations

import pytest
import torch

from olmo_mini import kernels
from olmo_mini.model.config import OLMo2Config
from olmo_mini.model.model import OLMo2

pytestmark = pytest.mark.skipif(kernels.triton_norm is None, reason="triton is not installed")


@pytest.mark.parametrize(
    ("qk_norm", "block"), [("full", "reordered"), ("head", "reordered"), ("full", "pre")]
)
def test_triton_model_matches_torch(qk_norm: str, block: str) -> None:
    def build(backend: str) -> OLMo2:
        config = OLMo2Config(
            vocab_size=97,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_hidden_size=96,
            max_seq_len=8,
            qk_norm=qk_norm,
            block=block,
            norm_backend=backend,
        )
        model = OLMo2(config)
        model.init_weights(seed=0)
        with torch.no_grad():  # trained-looking norm weights, so dW and the weight multiply matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        return model

    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    results = {}
    kernels.triton_norm.LAUNCHES.clear()
    for backend in ("torch", "triton"):
        model = build(backend)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        results[backend] = logits, {n: p.grad for n, p in model.named_parameters()}
    # Every norm ran in Triton: per block two block norms and q, k norms, plus the final
    # norm, forward and backward. A QK launch covers two norms (once the model uses it).
    launches = kernels.triton_norm.LAUNCHES
    for step in ("fwd", "bwd"):
        assert launches[f"rms_norm_{step}"] + 2 * launches[f"qk_rms_norm_{step}"] == 2 * 4 + 1
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
