"""Shared pieces of the interop tests."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.training.helpers import REPO


def tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module, so that a test calls its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
