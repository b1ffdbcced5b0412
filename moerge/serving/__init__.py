"""Serving: workers that keep experts resident and batch requests by assigned expert (one
``generate`` per mixed batch through the multi-expert layer), a dispatcher that places
requests on workers with affinity, and a Ray Serve HTTP application.

The scheduling logic (:mod:`moerge.serving.batching`) and the engine
(:mod:`moerge.serving.engine`) run without Ray; Ray is imported only by the actor and app
modules."""

from moerge.serving.batching import BatchQueue, Placement, Residency, group_requests, select_batch
from moerge.serving.types import (
    BASE,
    BadRequest,
    GenerationParams,
    Limits,
    ServeRequest,
    ServeResult,
    ServingError,
    Unavailable,
    UnknownExpert,
)

_LAZY = {
    "ExpertEngine": "moerge.serving.engine",  # torch: loads where a model runs, not in the HTTP front
    "ExpertPool": "moerge.serving.workers",
    "ExpertWorker": "moerge.serving.workers",
    "WorkerConfig": "moerge.serving.workers",
    "composition_spec": "moerge.serving.workers",
    "deploy": "moerge.serving.app",
    "Deployment": "moerge.serving.app",
    "ServeSettings": "moerge.serving.app",
}


def __getattr__(name: str):  # noqa: ANN202 — Ray and FastAPI load only when serving is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moerge.serving' has no attribute {name!r}")


__all__ = [
    "BASE",
    "Deployment",
    "ExpertPool",
    "ExpertWorker",
    "ServeSettings",
    "WorkerConfig",
    "composition_spec",
    "deploy",
    "BadRequest",
    "BatchQueue",
    "ExpertEngine",
    "GenerationParams",
    "Limits",
    "Placement",
    "Residency",
    "ServeRequest",
    "ServeResult",
    "ServingError",
    "Unavailable",
    "UnknownExpert",
    "group_requests",
    "select_batch",
]
