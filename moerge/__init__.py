"""moerge: a registry of independently fine-tuned experts, and the means to combine them at
inference time — merge their weights, route tokens or requests to them — and serve the result.

The names below load on first use (PEP 562), so ``import moerge`` — and the command line, the
registry and a server's front processes, which need no model — does not import torch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moerge.composer import ComposedModel, adamerging, compose, load_composition, lorahub, merge, merge_from_config
    from moerge.evaluation import evaluate
    from moerge.registry import Registry

__version__ = "0.1.0"
__all__ = [
    "ComposedModel",
    "Registry",
    "adamerging",
    "__version__",
    "compose",
    "evaluate",
    "load_composition",
    "lorahub",
    "merge",
    "merge_from_config",
]

_LAZY = {
    "ComposedModel": "moerge.composer",
    "compose": "moerge.composer",
    "load_composition": "moerge.composer",
    "lorahub": "moerge.composer",
    "adamerging": "moerge.composer",
    "merge": "moerge.composer",
    "merge_from_config": "moerge.composer",
    "evaluate": "moerge.evaluation",
    "Registry": "moerge.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


logging.getLogger(__name__).addHandler(logging.NullHandler())
