"""The rules every config dataclass checks in ``__post_init__``, written once.

Each check reads the fields it is given from the dataclass, so the field's annotation decides
what a value may be: ``int`` fields take integers only (not ``True``), ``float`` fields any
number, and ``X | None`` fields also ``None``, which passes every rule. A failure is one
``ConfigError`` naming the field as the user writes it: ``optim.lr must be a positive number,
got 0``. Imports nothing of the package, so the model may use it.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Sequence


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field."""


def one_of(group: str, config: object, name: str, choices: Sequence[object]) -> None:
    value = getattr(config, name)
    if value not in choices and not (value is None and _optional(config, name)):
        raise ConfigError(f"{group}.{name} must be one of {list(choices)}, got {value!r}")


def positive(group: str, config: object, *names: str) -> None:
    for name in names:
        _check(group, config, name, lambda v: v > 0, "a positive {noun}")


def at_least(group: str, config: object, minimum: float, *names: str) -> None:
    for name in names:
        _check(group, config, name, lambda v: v >= minimum, f"{{a_noun}} ≥ {minimum}")


def in_range(
    group: str, config: object, low: float, high: float | str, *names: str, open_high: bool = False
) -> None:
    """``low ≤ value ≤ high`` (``< high`` if ``open_high``); a ``str`` high names another field."""
    top = getattr(config, high) if isinstance(high, str) else high
    shown = f"{group}.{high} ({top})" if isinstance(high, str) else high
    rule = f"{{a_noun}} in [{low}, {shown}{')' if open_high else ']'}"
    for name in names:
        _check(
            group, config, name, lambda v: low <= v and (v < top if open_high else v <= top), rule
        )


def _check(group: str, config: object, name: str, ok: Callable[[float], bool], rule: str) -> None:
    """Raise unless the field is a number of its annotated kind (or an optional ``None``) for
    which ``ok`` holds; ``rule`` says what it must be, with ``{noun}`` or ``{a_noun}``."""
    value = getattr(config, name)
    if value is None and _optional(config, name):
        return
    integer = int in _types(type(config), name)
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (number and ok(value)):
        noun = "integer" if integer else "number"
        what = rule.format(noun=noun, a_noun=f"{'an' if integer else 'a'} {noun}")
        raise ConfigError(f"{group}.{name} must be {what}, got {value!r}")


def _optional(config: object, name: str) -> bool:
    return type(None) in _types(type(config), name)


@functools.cache
def _types(cls: type, name: str) -> tuple[object, ...]:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) or (hint,)
