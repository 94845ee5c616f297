"""Lazy re-exports for package ``__init__``s.

``from medslim.prune import apply_kept`` still works, but importing ``medslim.prune`` (or one
light submodule of it) no longer imports torch, nnU-Net or pandas: each name is imported from
its submodule on first use. Commands that never touch a name never pay for its imports.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import each of ``exports``
    (``{name: submodule}``) from ``package.submodule`` when first asked for, then cache it."""
    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
