"""The shared config checks: the field's annotation decides what a value may be."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from olmo_mini.validation import ConfigError, at_least, in_range, one_of, positive


@dataclass
class Example:
    steps: int = 1
    rate: float = 0.5
    cap: float | None = None
    mode: str | None = None


@pytest.mark.parametrize(
    ("values", "check", "message"),
    [
        (
            {"steps": True},
            lambda c: positive("g", c, "steps"),
            "g.steps must be a positive integer, got True",
        ),
        (
            {"steps": 2.0},
            lambda c: positive("g", c, "steps"),
            "g.steps must be a positive integer, got 2.0",
        ),
        (
            {"rate": float("nan")},
            lambda c: positive("g", c, "rate"),
            "g.rate must be a positive number, got nan",
        ),
        (
            {"steps": 0},
            lambda c: at_least("g", c, 1, "steps"),
            "g.steps must be an integer ≥ 1, got 0",
        ),
        (
            {"rate": 1.0},
            lambda c: in_range("g", c, 0, 1, "rate", open_high=True),
            "g.rate must be a number in [0, 1), got 1.0",
        ),
        (
            {"rate": 3.0},
            lambda c: in_range("g", c, 0, "steps", "rate"),
            "g.rate must be a number in [0, g.steps (1)], got 3.0",
        ),
        (
            {"mode": "x"},
            lambda c: one_of("g", c, "mode", ("a",)),
            "g.mode must be one of ['a'], got 'x'",
        ),
        (
            {"cap": "big"},
            lambda c: positive("g", c, "cap"),
            "g.cap must be a positive number, got 'big'",
        ),
    ],
)
def test_a_broken_rule_names_the_field_and_the_value(values, check, message):
    with pytest.raises(ConfigError) as info:
        check(Example(**values))
    assert str(info.value) == message


def test_none_passes_only_where_the_field_is_optional():
    config = Example()
    positive("g", config, "cap")
    one_of("g", config, "mode", ("a",))
    with pytest.raises(ConfigError, match="g.steps must be a positive integer, got None"):
        positive("g", Example(steps=None), "steps")  # type: ignore[arg-type]
