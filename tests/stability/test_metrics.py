"""Stability metric math against hand-worked numbers and full-matrix references."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_mini.stability.metrics import (
    Reduction,
    SpikeScore,
    attention_logit_statistics,
    finalize_rms,
    rms_statistics,
    spike_score,
)


def test_spike_score_hand_worked_constant_history() -> None:
    # window 3, 2 sigma. Scored from the third value on: 1, 1, 10 (std 0, differs: spike),
    # then 1 against [1, 1, 10] (mean 4, std sqrt(18) = 4.24; |1 - 4| = 3 < 8.5): 1 of 4.
    assert spike_score([1, 1, 1, 1, 10, 1], window=3, sigma=2, min_history=2) == pytest.approx(25.0)


def test_spike_score_hand_worked_alternating_series() -> None:
    # window 4, 3 sigma: the last value 5 against [0, 1, 0, 1] (mean 0.5, std 0.5) is
    # 9 sigma away; the four earlier scored values stay within 1.5 sigma: 1 of 5.
    assert spike_score([0, 1, 0, 1, 0, 1, 5], window=4, sigma=3, min_history=2) == pytest.approx(
        20.0
    )


def test_spike_score_counts_non_finite_values_and_resumes_from_state() -> None:
    tracker = SpikeScore(window=4, sigma=3, min_history=2)
    for value in [0, 1, 0, 1, float("nan")]:
        tracker.update(value)
    assert tracker.spikes == 1 and tracker.scored == 3
    clone = SpikeScore(window=4, sigma=3, min_history=2)
    clone.load_state_dict(tracker.state_dict())
    assert clone.update(5.0) == tracker.update(5.0) is True
    assert clone.score == tracker.score == pytest.approx(50.0)


def test_spike_score_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="window"):
        SpikeScore(window=1)
    with pytest.raises(ValueError, match="sigma"):
        SpikeScore(sigma=0)
    with pytest.raises(ValueError, match="min_history"):
        SpikeScore(window=5, min_history=6)


def test_spike_score_waits_for_min_history() -> None:
    tracker = SpikeScore(window=100, sigma=3, min_history=5)
    for value in [0, 1, 0, 1, 9]:  # 9 would be a spike against [0, 1, 0, 1]
        assert tracker.update(value) is False
    assert tracker.scored == 0 and tracker.update(50) is True


def _full_reference(q: torch.Tensor, k: torch.Tensor, scale: float, cap: float | None):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    max_per_head = logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3))
    used = logits if cap is None else cap * torch.tanh(logits / cap)
    p = used.masked_fill(~causal, -math.inf).softmax(-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    return max_per_head, entropy


@pytest.mark.parametrize("cap", [None, 2.0])
def test_attention_statistics_equal_the_full_matrix(cap: float | None, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = 3 * torch.randn(2, 4, 37, 8, generator=gen), torch.randn(2, 2, 37, 8, generator=gen)
    # Force several query chunks so the chunking itself is tested.
    monkeypatch.setattr("olmo_mini.stability.metrics._PROBE_ELEMENTS", 2 * 4 * 37 * 5)
    stats = Reduction()
    attention_logit_statistics(stats, "a", q, k, scale=8**-0.5, softcap=cap)
    max_ref, entropy_ref = _full_reference(q, k, 8**-0.5, cap)
    torch.testing.assert_close(stats.maxes["a_max_logit_head"], max_ref)
    if cap is None:
        assert "a_max_softcapped_logit_head" not in stats.maxes
    else:  # the logits the softmax sees, below the cap 2 (the raw maxima are 10-14 here)
        assert max_ref.min() > 10
        capped = stats.maxes["a_max_softcapped_logit_head"]
        torch.testing.assert_close(capped, cap * torch.tanh(max_ref / cap))
        assert capped.max() < cap
    entropy = stats.sums["a_entropy_sum"] / stats.sums["a_entropy_count"]
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-5, atol=1e-6)


def test_rms_statistics_both_layouts_and_merging() -> None:
    gen = torch.Generator().manual_seed(1)
    heads = (
        torch.randn(3, 4, 5, 6, generator=gen)
        * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None, None]
    )
    flat = heads.transpose(1, 2).reshape(3, 5, 24)
    a, b = Reduction(), Reduction()
    rms_statistics(a, "q", heads, n_heads=4)
    rms_statistics(b, "q", flat[:1], n_heads=4)
    rms_statistics(b, "q", flat[1:], n_heads=4)  # two batches merge to the same totals
    for stats in (a, b):
        overall, max_head = finalize_rms(stats, "q")
        assert overall == pytest.approx(heads.square().mean().sqrt().item(), rel=1e-5)
        assert max_head == pytest.approx(heads[:, 3].square().mean().sqrt().item(), rel=1e-5)
