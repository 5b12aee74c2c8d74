"""``StabilityConfig``: the ``stability`` config group, kept free of torch and Lightning so that
the config schema (``olmo_mini.config``) imports in well under a second."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StabilityConfig:
    """The ``stability`` config group."""

    enabled: bool = True
    # Measure on step 1 and every this many optimizer steps.
    every_n_steps: int = 10
    # OLMo 2's spike score: values >= spike_sigma std from the mean of the last spike_window.
    spike_window: int = 1000
    spike_sigma: float = 7.0
    # Values are scored once this many earlier ones exist.
    spike_min_history: int = 10

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"stability.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.spike_window < 2:
            raise ValueError(f"stability.spike_window must be >= 2, got {self.spike_window}")
        if self.spike_sigma <= 0:
            raise ValueError(f"stability.spike_sigma must be positive, got {self.spike_sigma}")
        if not 2 <= self.spike_min_history <= self.spike_window:
            raise ValueError(
                f"stability.spike_min_history must be in [2, stability.spike_window], "
                f"got {self.spike_min_history}"
            )
