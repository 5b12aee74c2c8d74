"""``StabilityConfig``: the ``stability`` config group, kept free of torch and Lightning so that
the config schema (``olmo_mini.config``) imports in well under a second."""

from __future__ import annotations

from dataclasses import dataclass

from olmo_mini.validation import at_least, in_range, positive


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
        at_least("stability", self, 1, "every_n_steps")
        at_least("stability", self, 2, "spike_window")
        positive("stability", self, "spike_sigma")
        in_range("stability", self, 2, "spike_window", "spike_min_history")
