"""RouterRetriever's pilot-embedding library and routing rule (Lee et al., AAAI 2025;
``shared/docs/methods/router-retriever.md`` §2.2–2.4), over an :class:`ExpertEncoder` whose
experts are LoRAs on the query encoder and a document index built once with the base encoder.

Algorithm 1 — for each training dataset D_i and each of its training queries x: score every
expert on x (nDCG@10 of its retrieval on D_i's corpus, from trec_eval); x's best expert is the
argmax. Queries whose best score is 0, or tied between experts, are dropped (the released code
gave them to the first expert in dict order, biasing its pilots — spec pitfall 6; ``ties="first"``
reproduces it). Group D_i's queries by best expert; each non-empty group's pilot is the centroid
of its queries' *base* embeddings (k = 1, the paper's best). An expert may get pilots from any
dataset.

Routing — embed the query with the base encoder; score each expert by the **mean** similarity to
its pilots (paper; ``agg="max"``: the code's max over single pilots); cosine by default (``sim="dot"``:
the code's dot product, which favours tight clusters — pitfall 7); hard top-1. The routed query is
then embedded by its expert, in mixed-expert batches.

Pilots never come from test queries: :meth:`build` takes training splits only (pitfall 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from moerge.retrieval.evaluate import evaluate
from moerge.retrieval.index import Index

Agg = Literal["mean", "max"]
Sim = Literal["cos", "dot"]
Ties = Literal["drop", "first"]


@dataclass
class Dataset:
    """One domain's training data: its corpus's index (base encoder), queries and qrels."""

    index: Index
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@dataclass
class PilotLibrary:
    """Pilot embeddings per expert, with where each came from (dataset, group size)."""

    pilots: dict[str, torch.Tensor] = field(default_factory=dict)
    provenance: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def add(self, expert: str, centroid: torch.Tensor, dataset: str, size: int) -> None:
        old = self.pilots.get(expert)
        self.pilots[expert] = centroid[None] if old is None else torch.cat([old, centroid[None]])
        self.provenance.setdefault(expert, []).append({"dataset": dataset, "queries": size})

    def without(self, dataset: str) -> PilotLibrary:
        """The library less the pilots that came from ``dataset`` (to recompute it)."""
        out = PilotLibrary(dropped={k: v for k, v in self.dropped.items() if k != dataset})
        for e, rows in self.provenance.items():
            for row, p in zip(rows, self.pilots[e], strict=True):
                if row["dataset"] != dataset:
                    out.add(e, p, row["dataset"], row["queries"])
        return out


def dataset_fingerprint(data: Dataset) -> str:
    """What a dataset's pilots depend on: its corpus (through the index), queries and qrels."""
    import hashlib
    import json

    h = hashlib.sha256(getattr(data.index, "fingerprint", "").encode())
    h.update(json.dumps([data.queries, data.qrels], sort_keys=True).encode())
    return h.hexdigest()[:16]


def best_experts(scores: Mapping[str, Mapping[str, float]], experts: Sequence[str], ties: Ties = "drop") -> dict[str, str]:
    """Per query, the expert with the highest score (``scores[expert][query]``). With
    ``ties="drop"`` a query whose best score is 0 or shared by several experts gets none."""
    out: dict[str, str] = {}
    queries = next(iter(scores.values())).keys() if scores else []
    for q in queries:
        row = [(float(scores[e].get(q, 0.0)), e) for e in experts]
        top = max(s for s, _ in row)
        winners = [e for s, e in row if s == top]
        if ties == "drop" and (top <= 0.0 or len(winners) > 1):
            continue
        out[q] = winners[0]
    return out


class RouterRetriever:
    """Routes each query to one expert of ``encoder`` by its pilot embeddings."""

    def __init__(self, encoder: Any, agg: Agg = "mean", sim: Sim = "cos", ties: Ties = "drop") -> None:
        if agg not in ("mean", "max") or sim not in ("cos", "dot") or ties not in ("drop", "first"):
            raise ValueError(f"agg must be mean|max, sim cos|dot, ties drop|first; got {agg!r}, {sim!r}, {ties!r}")
        self.encoder, self.agg, self.sim, self.ties = encoder, agg, sim, ties
        self.library = PilotLibrary()

    # ------------------------------------------------------------------ the library

    def score_experts(self, data: Dataset, k: int = 100) -> dict[str, dict[str, float]]:
        """nDCG@10 of every expert on each of ``data``'s training queries."""
        qs = list(data.queries)
        texts = [data.queries[q] for q in qs]
        out = {}
        for e in self.encoder.experts:
            run = data.index.search(data.queries, k=k, embeddings=self.encoder.embed(texts, e))
            out[e] = {q: v["ndcg@10"] for q, v in evaluate(run, data.qrels)["per_query"].items()}
        return out

    def add_dataset(self, name: str, data: Dataset, scores: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, int]:
        """Algorithm 1 for one training dataset (replacing its earlier pilots); returns the
        group sizes. ``scores`` (expert → query → metric) skips the evaluation."""
        scores = scores if scores is not None else self.score_experts(data)
        best = best_experts(scores, self.encoder.experts, self.ties)
        self.library = self.library.without(name)
        self.library.dropped[name] = len(data.queries) - len(best)
        groups: dict[str, list[str]] = {}
        for q, e in best.items():
            groups.setdefault(e, []).append(q)
        for e, qs in sorted(groups.items()):
            base = self.encoder.embed([data.queries[q] for q in qs], None)
            self.library.add(e, base.mean(0), name, len(qs))
        return {e: len(qs) for e, qs in groups.items()}

    def build(
        self, datasets: Mapping[str, Dataset], scores: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None
    ) -> None:
        """The whole library from every training dataset (a full rebuild)."""
        self.library = PilotLibrary()
        for name, data in datasets.items():
            self.add_dataset(name, data, None if scores is None else scores[name])

    # -------------------------------------------------------------- in the registry

    PRODUCER = "router_retriever"

    def _key(self, name: str, data: Dataset) -> dict[str, Any]:
        return {
            "encoder": getattr(self.encoder, "base_id", type(self.encoder).__name__),
            "ties": self.ties,
            "metric": "ndcg@10",
            "dataset": name,
            "fingerprint": dataset_fingerprint(data),
        }

    def save(self, registry: Any, datasets: Mapping[str, Dataset]) -> int:
        """Store the pilots that came from ``datasets`` as artifacts of their experts (one per
        dataset); removing the expert from the registry removes them. Returns how many."""
        n = 0
        for e, rows in self.library.provenance.items():
            for row, pilot in zip(rows, self.library.pilots[e], strict=True):
                if row["dataset"] not in datasets:
                    continue
                data = datasets[row["dataset"]]
                registry.put_artifact(
                    e,
                    self.PRODUCER,
                    self._key(row["dataset"], data),
                    {"pilot": pilot[None].contiguous(), "queries": torch.tensor([row["queries"]])},
                )
                n += 1
        return n

    def load(self, registry: Any, datasets: Mapping[str, Dataset]) -> list[str]:
        """The stored pilots of this encoder's experts for these datasets; returns the datasets
        no expert has pilots for (new ones: :meth:`build_or_load` computes just those)."""
        self.library = PilotLibrary()
        seen = set()
        for name, data in datasets.items():
            key = self._key(name, data)
            for e in self.encoder.experts:
                art = registry.get_artifact(e, self.PRODUCER, key)
                if art is not None:
                    self.library.add(e, art["pilot"][0], name, int(art["queries"][0]))
                    seen.add(name)
        return [n for n in datasets if n not in seen]

    def load_stored(self, registry: Any) -> list[str]:
        """Every stored pilot of this encoder's experts (any dataset, this encoder and tie
        policy): what a composition without ``data`` routes by. Returns the datasets found."""
        self.library = PilotLibrary()
        enc = getattr(self.encoder, "base_id", type(self.encoder).__name__)
        found = set()
        for e in self.encoder.experts:
            for art in sorted(registry.list_artifacts(e), key=lambda a: a["config"].get("dataset", "")):
                key = art["config"]
                if art["producer"] != self.PRODUCER or key.get("encoder") != enc or key.get("ties") != self.ties:
                    continue
                data = registry.get_artifact(e, self.PRODUCER, key)
                self.library.add(e, data["pilot"][0], key["dataset"], int(data["queries"][0]))
                found.add(key["dataset"])
        return sorted(found)

    def build_or_load(
        self,
        registry: Any,
        datasets: Mapping[str, Dataset],
        rebuild: bool = False,
        scores: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    ) -> list[str]:
        """Stored pilots where they exist; the paper's incremental mode for the rest — only the
        datasets without pilots are scored, against every current expert (an added expert with
        its new dataset costs that dataset's queries × experts). ``rebuild``: Algorithm 1 over
        every dataset again (an added expert may then win queries of old datasets). ``scores``
        (dataset → expert → query → metric) skips the evaluation of the datasets it covers.
        Returns the datasets computed now."""
        todo = list(datasets) if rebuild else self.load(registry, datasets)
        if rebuild:
            self.library = PilotLibrary()
        for name in todo:
            self.add_dataset(name, datasets[name], None if scores is None else scores.get(name))
        if todo:
            self.save(registry, {n: datasets[n] for n in todo})
        return todo

    def remove_expert(self, expert: str) -> None:
        """Drop an expert's pilots (its queries are not regrouped; rebuild for that)."""
        self.library.pilots.pop(expert, None)
        self.library.provenance.pop(expert, None)

    # ------------------------------------------------------------------------ routing

    def similarities(self, texts: Sequence[str], base: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
        """(experts with pilots, [n, experts] aggregated similarity of each query's base embedding);
        ``base``: those embeddings when the caller has them already."""
        experts = [e for e in self.encoder.experts if e in self.library.pilots]
        if not experts:
            raise RuntimeError("the pilot library is empty: build it from training datasets first")
        z = self.encoder.embed(list(texts), None) if base is None else base
        cols = []
        for e in experts:
            p = self.library.pilots[e]
            if self.sim == "cos":
                p = torch.nn.functional.normalize(p, dim=-1)
                zz = torch.nn.functional.normalize(z, dim=-1)
            else:
                zz = z
            s = zz @ p.T  # [n, pilots of e]
            cols.append(s.mean(1) if self.agg == "mean" else s.max(1).values)
        return experts, torch.stack(cols, dim=1)

    def route(self, texts: Sequence[str], base: torch.Tensor | None = None) -> list[str]:
        experts, sims = self.similarities(texts, base)
        return [experts[int(i)] for i in sims.argmax(1)]

    def embed(self, texts: Sequence[str], batch_size: int = 64, base: torch.Tensor | None = None) -> torch.Tensor:
        """Each query embedded by its routed expert (mixed-expert batches)."""
        return self.encoder.embed(list(texts), self.route(texts, base), batch_size=batch_size)
