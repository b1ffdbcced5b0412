"""moerge: a registry of independently fine-tuned experts, and the means to combine them at
inference time — merge their weights, route tokens or requests to them — and serve the result."""

from __future__ import annotations

import logging

from moerge.composer import ComposedModel, compose, load_composition, merge, merge_from_config
from moerge.evaluation import evaluate
from moerge.registry import Registry

__version__ = "0.1.0"
__all__ = ["ComposedModel", "Registry", "__version__", "compose", "evaluate", "load_composition", "merge", "merge_from_config"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
