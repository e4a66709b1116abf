"""Lazy re-exports for packages whose public names live in heavy modules (torch, transformers).

A package lists ``name -> module`` and gets a module ``__getattr__`` that imports the module on the
first use of the name (PEP 562), so that importing the package stays light. This module imports
nothing of ours.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` re-exporting each ``name`` of ``exports`` from its module.

    ``__dir__`` lists the package's ``__all__``.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(getattr(sys.modules[package], "__all__", exports))

    return __getattr__, __dir__
