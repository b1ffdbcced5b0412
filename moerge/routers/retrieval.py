"""The retrieval baseline of the PHATGOOSE paper (phatgoose-glider.md §1.7): embed up to N
example inputs per expert with all-MiniLM-L6-v2; embed each query the same way; cosine against
every stored example, max over each expert's examples, argmax → one expert, weight 1, for the
whole sequence and every module (top-1, one-hot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from moerge.adapters.lora import LoraExpert
from moerge.registry.files import config_hash
from moerge.routers.base import ArtifactSpec, PrepareContext, Router, RouterConfig, Routing, register_router
from moerge.routers.embedding import DEFAULT_EMBEDDER, load_embedder
from moerge.routers.glider import instruction_part


class RetrievalConfig(RouterConfig):
    max_examples: int = Field(1000, ge=1, description="examples embedded per expert (paper: 1000)")
    embedder: str = DEFAULT_EMBEDDER
    query_separator: str | None = Field(None, description="embed only the text before this, for examples and queries alike")


@register_router("retrieval")
class RetrievalRouter(Router):
    config_cls = RetrievalConfig
    granularity = "sequence"
    EXAMPLES = "retrieval-examples"

    def _examples(self, record: Any, ctx: PrepareContext) -> list[str]:
        data = ctx.data_for(record.name)
        texts = [d if isinstance(d, str) else d[0] for d in data] if data else list(record.examples)
        if not texts:
            raise ValueError(f"retrieval needs example inputs for expert {record.ref}: register examples= or pass data=")
        return [instruction_part(t, self.config.query_separator) for t in texts[: self.config.max_examples]]

    def _key(self, record: Any, ctx: PrepareContext) -> dict[str, Any]:
        return {"embedder": self.config.embedder, "examples": config_hash(self._examples(record, ctx))}

    def _embed(self, record: Any, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return {"embeddings": load_embedder(self.config.embedder).encode(self._examples(record, ctx))}

    def artifact_specs(self) -> list[ArtifactSpec]:
        return [ArtifactSpec(self.EXAMPLES, self._key, self._embed)]

    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        self.experts = [r.name for r in records]
        embs = [self.artifact(self.EXAMPLES, r, ctx)["embeddings"] for r in records]
        self.bank = torch.cat(embs)
        self.owner = torch.cat([torch.full((len(e),), i) for i, e in enumerate(embs)])

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """Max cosine over each expert's examples → [batch, experts]."""
        q = load_embedder(self.config.embedder).encode([instruction_part(t, self.config.query_separator) for t in texts])
        sims = q @ self.bank.T  # unit vectors: cosine
        out = torch.full((len(texts), len(self.experts)), -2.0)
        return out.scatter_reduce(1, self.owner.expand(len(texts), -1), sims, reduce="amax")

    def route(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        s = self.scores(texts if task is None else ([task] * len(texts) if isinstance(task, str) else list(task)))
        top = s.argmax(1)
        w = torch.zeros_like(s).scatter_(1, top[:, None], 1.0)
        return Routing("sequence", list(self.experts), weights=w, info={"scores": s, "chosen": top})
