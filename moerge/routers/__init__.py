"""Routers: per-expert preparation (gate vectors, prototypes, text and example embeddings,
stored as registry artifacts) and the decision — which experts, with which weights, at which
granularity. ``compose(..., router=name)`` picks one by its registered name."""

from moerge.routers.arrow import ArrowConfig, ArrowRouter, arrow_prototypes
from moerge.routers.base import (
    ROUTERS,
    PrepareContext,
    PrepareReport,
    Recorder,
    Router,
    RouterConfig,
    Routing,
    get_router,
    make_router,
    register_router,
)
from moerge.routers.glider import ALPHA_PRESETS, GliderConfig, GliderRouter, HFDescriber
from moerge.routers.phatgoose import GateTraining, PhatgooseConfig, PhatgooseRouter, train_gates
from moerge.routers.retrieval import RetrievalConfig, RetrievalRouter
from moerge.routers.router_retriever import RouterRetrieverConfig, RouterRetrieverRouter
from moerge.routers.twin import TwinConfig, TwinRouter

__all__ = [
    "ALPHA_PRESETS",
    "ROUTERS",
    "ArrowConfig",
    "ArrowRouter",
    "GateTraining",
    "GliderConfig",
    "GliderRouter",
    "HFDescriber",
    "PhatgooseConfig",
    "PhatgooseRouter",
    "PrepareContext",
    "PrepareReport",
    "Recorder",
    "RetrievalConfig",
    "RetrievalRouter",
    "RouterRetrieverConfig",
    "RouterRetrieverRouter",
    "Router",
    "RouterConfig",
    "Routing",
    "TwinConfig",
    "TwinRouter",
    "arrow_prototypes",
    "get_router",
    "make_router",
    "register_router",
    "train_gates",
]
