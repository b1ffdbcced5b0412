"""RouterRetriever in the router table: its settings, so ``compose(encoder, experts,
router="router_retriever", ...)`` validates them like any router's and builds a
:class:`~moerge.composer.encoder.ComposedEncoder` (the method itself:
:mod:`moerge.retrieval.router_retriever`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from moerge.routers.base import Router, RouterConfig, Routing, register_router


class RouterRetrieverConfig(RouterConfig):
    """``agg``: mean similarity to an expert's pilots (paper) or the max (released code);
    ``sim``: cosine (default) or dot product (the code's); ``ties``: drop queries whose best
    expert is tied or scores 0 (spec) or give them to the first expert (the code's bias);
    ``rebuild``: recompute every dataset's pilots (else only datasets without stored pilots)."""

    agg: Literal["mean", "max"] = "mean"
    sim: Literal["cos", "dot"] = "cos"
    ties: Literal["drop", "first"] = "drop"
    rebuild: bool = False
    batch_size: int = 64


@register_router("router_retriever")
class RouterRetrieverRouter(Router):
    """The registry entry for RouterRetriever: ``compose`` builds a :class:`ComposedEncoder` (an
    embedding model, not a generator) when it sees this router."""

    config_cls = RouterRetrieverConfig
    granularity = "sequence"
    modality: ClassVar[str] = "embedding"

    def _wrong_use(self) -> TypeError:
        return TypeError(
            "router_retriever routes queries of an embedding model: use compose(encoder, experts, "
            "router='router_retriever', data=...) and its embed/route/explain"
        )

    def load(self, records: Sequence[Any], loras: Sequence[Any], ctx: Any) -> None:
        raise self._wrong_use()

    def route(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        raise self._wrong_use()
