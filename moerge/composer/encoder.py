"""``compose(encoder, experts, router="router_retriever")``: a sentence encoder whose queries are
routed, one expert per query, by RouterRetriever's pilot embeddings (issue 14).

The composed encoder embeds with :meth:`ComposedEncoder.embed` (each text by its routed expert,
in one batch per mixed set of experts through the multi-expert layer), says where each text goes
with :meth:`ComposedEncoder.route` (expert and per-expert similarities), and explains one text
with :meth:`ComposedEncoder.explain` (the similarities, the pilots behind them and where they came
from). Pilots are registry artifacts of their experts: a later composition loads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.routers.router_retriever import RouterRetrieverConfig


@dataclass
class EncoderExplanation:
    """Why one text went where it went."""

    text: str
    expert: str
    #: expert → aggregated similarity of the text's base embedding to the expert's pilots
    similarities: dict[str, float]
    #: expert → one row per pilot: the dataset it came from, its group size and the similarity
    pilots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    agg: str = "mean"
    sim: str = "cos"

    def __str__(self) -> str:
        lines = [f"{self.text!r} -> {self.expert}  ({self.agg} {self.sim} similarity to each expert's pilots)"]
        for e, s in sorted(self.similarities.items(), key=lambda kv: -kv[1]):
            src = ", ".join(f"{p['dataset']}:{p['queries']}q={p['similarity']:.3f}" for p in self.pilots.get(e, []))
            lines.append(f"  {'*' if e == self.expert else ' '} {e:20s} {s:7.4f}   pilots {src}")
        return "\n".join(lines)


class ComposedEncoder:
    """An :class:`~moerge.retrieval.encoder.ExpertEncoder` routed by a
    :class:`~moerge.retrieval.router_retriever.RouterRetriever`."""

    def __init__(
        self, router: Any, records: Sequence[Any], registry: Any, config: RouterRetrieverConfig, computed: list[str]
    ) -> None:
        self.router, self.records, self.registry, self.config = router, list(records), registry, config
        #: datasets whose pilots were computed (not loaded) when this was composed
        self.computed = computed

    def __repr__(self) -> str:
        return f"ComposedEncoder(base={self.encoder.base_id!r}, experts={self.experts}, router=router_retriever)"

    @property
    def encoder(self) -> Any:
        return self.router.encoder

    @property
    def experts(self) -> list[str]:
        return list(self.encoder.experts)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def route(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """Per text: ``{"expert": name, "similarities": {expert: score}}``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        experts, sims = self.router.similarities(texts)
        best = sims.argmax(1)
        return [
            {"expert": experts[int(b)], "similarities": dict(zip(experts, map(float, row), strict=True))}
            for b, row in zip(best, sims, strict=True)
        ]

    def embed(self, texts: Sequence[str], experts: Sequence[str | None] | str | None = "auto") -> torch.Tensor:
        """Unit-norm embeddings [n, d]. ``experts="auto"`` routes each text; a name (or
        ``"__base__"``, or one name per text) embeds with that expert instead."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        texts = list(texts)
        if isinstance(experts, str) and experts == "auto":
            return self.router.embed(texts, batch_size=self.config.batch_size)
        return self.encoder.embed(texts, experts, batch_size=self.config.batch_size)

    def explain(self, text: str) -> EncoderExplanation:
        """The routing of one text, with each pilot's similarity and provenance."""
        z = self.encoder.embed([text], None)[0]
        experts, sims = self.router.similarities([text])
        pilots = {}
        for e in experts:
            p = self.router.library.pilots[e]
            if self.config.sim == "cos":
                s = torch.nn.functional.normalize(p, dim=-1) @ torch.nn.functional.normalize(z, dim=0)
            else:
                s = p @ z
            pilots[e] = [{**prov, "similarity": float(v)} for prov, v in zip(self.router.library.provenance[e], s, strict=True)]
        row = dict(zip(experts, map(float, sims[0]), strict=True))
        return EncoderExplanation(text, max(row, key=row.get), row, pilots, self.config.agg, self.config.sim)


def _datasets(data: Mapping[str, Any], encoder: Any, progress: bool | None) -> dict[str, Any]:
    """``data``: dataset name → a :class:`~moerge.retrieval.router_retriever.Dataset` or a BEIR
    folder (its train split; its document index is built with the base encoder once and saved
    in ``<folder>/.moerge-index/``)."""
    from moerge.retrieval import Index, index_folder, load_beir
    from moerge.retrieval.router_retriever import Dataset

    out = {}
    for name, value in data.items():
        if isinstance(value, Dataset):
            out[name] = value
            continue
        if not isinstance(value, (str, Path)):
            raise TypeError(f"data[{name!r}] must be a BEIR folder or a Dataset, got {type(value).__name__}")
        corpus, queries, qrels = load_beir(value, "train")
        index = Index.build_or_load(index_folder(value, encoder.base_id), corpus, encoder.base_id, progress=progress)
        out[name] = Dataset(index, {q: queries[q] for q in qrels}, qrels)
    return out


def compose_encoder(
    base: str | None,
    records: Sequence[Any],
    registry: Any,
    config: RouterRetrieverConfig,
    data: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    device: Any = "cpu",
) -> ComposedEncoder:
    from moerge.retrieval.encoder import ExpertEncoder
    from moerge.retrieval.router_retriever import RouterRetriever

    encoder = ExpertEncoder(base, records, registry=registry, device=device)
    rr = RouterRetriever(encoder, agg=config.agg, sim=config.sim, ties=config.ties)
    if data:
        computed = rr.build_or_load(registry, _datasets(data, encoder, progress), rebuild=config.rebuild)
    else:
        computed = []
        found = rr.load_stored(registry)
        if not found:
            raise ValueError(
                "no stored RouterRetriever pilots for these experts and this encoder: pass data={dataset: BEIR folder "
                "or Dataset} (training queries with qrels) to compute them"
            )
    missing = [e for e in encoder.experts if e not in rr.library.pilots]
    if missing:
        import warnings

        from moerge.registry.importers import MoergeWarning

        warnings.warn(
            f"experts {missing} won no training query, so they have no pilots and are never routed to",
            MoergeWarning,
            stacklevel=3,
        )
    return ComposedEncoder(rr, records, registry, config, computed)
