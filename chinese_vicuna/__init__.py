"""The Chinese-Vicuna toolkit's package, cut by stage (docs/architecture.md):
args → data → model → train / infer → export. `Engine` is the public Python entry point."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    # Lazy: `import chinese_vicuna` stays cheap (no torch) until the engine is used.
    if name == "Engine":
        from chinese_vicuna.infer.engine import Engine

        return Engine
    raise AttributeError(f"module 'chinese_vicuna' has no attribute {name!r}")
