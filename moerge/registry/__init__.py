"""The expert registry: records, weights (safetensors + sha256), versions and derived artifacts."""

from moerge.registry.files import IntegrityError, UnsafeWeightsError
from moerge.registry.importers import ShapeMismatchError, config_fingerprint
from moerge.registry.schema import ExpertRecord, InvalidNameError, LoraSpec, validate_name
from moerge.registry.store import ExpertNotFoundError, Registry, Selection

__all__ = [
    "ExpertNotFoundError",
    "ExpertRecord",
    "IntegrityError",
    "InvalidNameError",
    "LoraSpec",
    "Registry",
    "Selection",
    "ShapeMismatchError",
    "UnsafeWeightsError",
    "config_fingerprint",
    "validate_name",
]
