"""Lazy package exports, so that light modules (the config schema) import without torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``exports[name]`` (a submodule of
    ``package``) on first access: ``import olmo_mini.config`` then loads neither torch nor
    Lightning, while ``from olmo_mini.data import OLMoDataModule`` still works."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
