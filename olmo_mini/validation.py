"""The checks every config dataclass runs in ``__post_init__``, written once. The field's
annotation decides what a value may be: ``int`` takes integers only (not ``True``), ``float``
any number, ``X | None`` also ``None`` (which passes). A failure is one ``ConfigError`` naming
the field as the user writes it. Imports nothing of the package, so the model may use it."""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterable, Sequence


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field."""


def one_of(group: str, config: object, name: str, choices: Iterable[object]) -> None:
    """``choices`` may be an ``Enum`` class: a value matches a member equal to it."""
    value, choices = getattr(config, name), list(choices)
    if value not in choices and not (value is None and type(None) in _types(type(config), name)):
        raise ConfigError(f"{group}.{name} must be one of {list(choices)}, got {value!r}")


def positive(group: str, config: object, *names: str) -> None:
    _check(group, config, names, lambda v: v > 0, "a positive {noun}")


def at_least(group: str, config: object, minimum: float, *names: str) -> None:
    _check(group, config, names, lambda v: v >= minimum, f"{{a_noun}} ≥ {minimum}")


def in_range(
    group: str, config: object, low: float, high: float | str, *names: str, open_high: bool = False
) -> None:
    """``low ≤ value ≤ high`` (``< high`` if ``open_high``); a ``str`` high names another field."""
    top = getattr(config, high) if isinstance(high, str) else high
    shown = f"{group}.{high} ({top})" if isinstance(high, str) else high
    rule = f"{{a_noun}} in [{low}, {shown}{')' if open_high else ']'}"
    _check(group, config, names, lambda v: low <= v and (v < top if open_high else v <= top), rule)


def _check(group: str, config: object, names: Sequence[str], ok: Callable, rule: str) -> None:
    """Raise unless each field is a number of its annotated kind for which ``ok`` holds;
    ``rule`` says what it must be, with ``{noun}`` or ``{a_noun}``."""
    for name in names:
        value, kinds = getattr(config, name), _types(type(config), name)
        integer = int in kinds
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not (number and ok(value)) and not (value is None and type(None) in kinds):
            noun = "integer" if integer else "number"
            what = rule.format(noun=noun, a_noun=f"{'an' if integer else 'a'} {noun}")
            raise ConfigError(f"{group}.{name} must be {what}, got {value!r}")


@functools.cache
def _types(cls: type, name: str) -> tuple[object, ...]:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) or (hint,)
