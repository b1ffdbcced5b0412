"""Serving an embedding model with LoRA experts (issue 14): ``POST /v1/embeddings`` in OpenAI's
shape and ``POST /v1/search`` over served indexes, on Ray.

* :class:`EmbeddingService` — what one worker does, in plain Python (unit-tested without Ray):
  it keeps the encoder and every expert resident, queues the texts of concurrent requests for
  ``max_wait_s`` (or until ``max_batch`` texts), routes the batch's ``auto`` texts with one base
  forward (RouterRetriever's stored pilots), then embeds the whole batch in **one forward with
  a per-row expert** through the multi-expert layer — batched by assigned expert, like
  generation, not one adapter switch per request.
* ``EmbeddingWorker`` — that service as a Ray actor (``num_cpus``/``num_gpus`` each).
* :class:`EmbeddingServer` — the FastAPI ingress (a Serve deployment): validates, authenticates,
  spreads requests over the workers (least outstanding), says the truth on ``/healthz``.

``model`` is an expert's name, ``__base__`` (the encoder alone) or ``auto`` (routed per text).
An unknown model is a 404 naming it, with the models there are.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' ``Request``
annotations at runtime, as in :mod:`moerge.serving.app`.)
"""

import asyncio
import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moerge.serving.app import Deployment, WorkerIngress, _json, _parse, start_app
from moerge.serving.batching import WindowBatcher
from moerge.serving.types import BASE, BadRequest, Limits, ServingError, Unavailable, UnknownExpert

AUTO = ("auto", "moerge")


@dataclass
class EmbeddingSettings:
    """What an embedding app serves: the registry's LoRA experts of one sentence encoder."""

    registry: str
    #: the sentence-transformers encoder (folder or hub id); None = the bundled MiniLM
    encoder: str | None = None
    #: expert names (None: every LoRA expert in the registry registered for this encoder)
    experts: list[str] | None = None
    #: index name → BEIR folder whose corpus /v1/search searches (index built with the encoder once)
    search: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    max_batch: int = 64
    max_wait_s: float = 0.01
    num_cpus: float | None = None
    gpus_per_worker: float = 0.0
    threads: int | None = None
    device: str = "auto"
    request_timeout_s: float = 60.0
    api_key: str | None = None
    limits: Limits = Limits()
    max_k: int = 100


def _pick_experts(settings: EmbeddingSettings) -> list[str]:
    from moerge.registry import Registry
    from moerge.retrieval.encoder import encoder_experts

    if settings.experts is not None:
        return list(settings.experts)
    return encoder_experts(Registry(settings.registry), settings.encoder)


def model_names(experts: Sequence[str], routed: bool) -> list[str]:
    """What ``model`` may name: an expert, the base, and ``auto`` when there are pilots to route by."""
    return [*experts, BASE, *(["auto"] if routed else [])]


def check_model(model: str, experts: Sequence[str], routed: bool) -> None:
    """A 503 for ``auto`` without pilots, a 404 naming an unknown model (with the closest)."""
    if model in AUTO:
        if not routed:
            raise Unavailable(
                "model 'auto' needs RouterRetriever pilots for these experts, and the registry has none: "
                "compose(encoder, experts, router='router_retriever', data=...) once to store them"
            )
        return
    known = model_names(experts, routed)
    if model not in known:
        from moerge.hints import did_you_mean

        raise UnknownExpert(f"unknown model {model!r}{did_you_mean(model, known)}; this server has {known}")


@dataclass
class _Job:
    texts: list[str]
    model: str


class EmbeddingService:
    """One worker: the encoder with its experts resident, a micro-batching queue, the indexes."""

    def __init__(self, settings: EmbeddingSettings, index: int = 0) -> None:
        from moerge.device import resolve_device
        from moerge.registry import Registry
        from moerge.retrieval.encoder import ExpertEncoder
        from moerge.retrieval.router_retriever import RouterRetriever

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings, self.index = settings, index
        reg = Registry(settings.registry)
        names = _pick_experts(settings)
        device = str(resolve_device(settings.device))
        self.encoder = ExpertEncoder(settings.encoder, reg.select(names=names) if names else [], registry=reg, device=device)
        self.router = RouterRetriever(self.encoder)
        self.routed_datasets = self.router.load_stored(reg) if names else []
        self.indexes: dict[str, Any] = {}
        self.corpora: dict[str, dict[str, dict[str, str]]] = {}
        for name, folder in settings.search.items():
            from moerge.retrieval import Index, index_folder, load_corpus

            corpus = load_corpus(folder)
            self.indexes[name] = Index.build_or_load(
                index_folder(folder, self.encoder.base_id), corpus, self.encoder.base_id, progress=False
            )
            self.corpora[name] = corpus
        self.batcher = WindowBatcher(self.run_batch, settings.max_batch, settings.max_wait_s)
        self.batches = 0
        self.texts = 0

    # --------------------------------------------------------------------------- models

    @property
    def models(self) -> list[str]:
        return model_names(self.encoder.experts, bool(self.router.library.pilots))

    def check_model(self, model: str) -> None:
        check_model(model, self.encoder.experts, bool(self.router.library.pilots))

    # --------------------------------------------------------------------------- batching

    async def embed(self, texts: Sequence[str], model: str) -> tuple[list[list[float]], list[str]]:
        """Embeddings of ``texts`` by ``model`` (and the expert each text went to), batched with
        every other request that arrives within ``max_wait_s``."""
        self.check_model(model)
        emb, experts = await self.batcher.submit(_Job(list(texts), model), len(texts))
        return emb, experts

    def run_batch(self, jobs: Sequence[_Job]) -> list[tuple[list[list[float]], list[str]]]:
        """One batch: the ``auto`` texts routed with one base forward, then every text embedded
        by its expert in one mixed forward (rows in any order of experts)."""
        texts = [t for job in jobs for t in job.texts]
        experts: list[str | None] = []
        auto = [i for i, job in enumerate(jobs) if job.model in AUTO]
        routed = iter(self.router.route([t for i in auto for t in jobs[i].texts]) if auto else [])
        for job in jobs:
            if job.model in AUTO:
                experts += [next(routed) for _ in job.texts]
            else:
                experts += [None if job.model == BASE else job.model] * len(job.texts)
        emb = (
            self.encoder.embed(texts, experts, batch_size=self.settings.max_batch) if texts else torch.zeros(0, self.encoder.dim)
        )
        self.batches += 1
        self.texts += len(texts)
        out, start = [], 0
        for job in jobs:
            n = len(job.texts)
            out.append((emb[start : start + n].tolist(), [e or BASE for e in experts[start : start + n]]))
            start += n
        return out

    async def search(self, queries: Sequence[str], model: str, index: str, k: int) -> list[dict[str, Any]]:
        if index not in self.indexes:
            from moerge.hints import did_you_mean

            raise UnknownExpert(
                f"unknown index {index!r}{did_you_mean(index, list(self.indexes))}; this server has {list(self.indexes)}"
            )
        emb, experts = await self.embed(queries, model)
        run = self.indexes[index].search({str(i): q for i, q in enumerate(queries)}, k=k, embeddings=torch.tensor(emb))
        corpus = self.corpora[index]
        return [
            {"query": q, "expert": experts[i],
             "hits": [{"id": d, "score": s, "text": corpus[d]["text"]} for d, s in sorted(run[str(i)].items(), key=lambda kv: -kv[1])]}
            for i, q in enumerate(queries)
        ]  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "encoder": self.encoder.base_id,
            "dim": self.encoder.dim,
            "experts": self.encoder.experts,
            "routed": bool(self.router.library.pilots),
            "pilot_datasets": self.routed_datasets,
            "indexes": {n: len(i) for n, i in self.indexes.items()},
            "batches": self.batches,
            "texts": self.texts,
        }

    def ping(self) -> int:
        return self.index


# ------------------------------------------------------------------------------ HTTP ingress


class EmbeddingsBody(BaseModel):
    """OpenAI's embeddings request (``dimensions`` is refused: these encoders have one size)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str | list[str]
    model: str = "auto"
    index: str | None = None
    k: int = 10


def _texts(value: str | list[str], limits: Limits, what: str = "input") -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise BadRequest(f"'{what}' is empty: send a string or a list of strings")
    if len(texts) > limits.max_prompts * 32:
        raise BadRequest(f"'{what}' has {len(texts)} texts; the limit is {limits.max_prompts * 32} per request")
    for i, t in enumerate(texts):
        if not t.strip():
            raise BadRequest(f"{what}[{i}] is empty")
        if len(t) > limits.max_prompt_chars:
            raise BadRequest(f"{what}[{i}] has {len(t)} characters; the limit is {limits.max_prompt_chars}")
    return texts


def encode_embedding(vector: list[float], fmt: str) -> Any:
    """``float``: the list; ``base64``: little-endian float32 bytes, base64 (what OpenAI's client asks for)."""
    if fmt == "float":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


emb_api = FastAPI(title="moerge embeddings", description="An embedding model with LoRA experts, routed per query, over Ray")


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(emb_api)
class EmbeddingServer(WorkerIngress):
    def __init__(self, settings: EmbeddingSettings) -> None:
        self._start_workers(EmbeddingService, settings)

    def _models(self) -> list[str]:
        return model_names(self.info["experts"], self.info["routed"])

    def _check_model(self, model: str) -> None:
        check_model(model, self.info["experts"], self.info["routed"])

    @emb_api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return await self._healthz()

    @emb_api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        return await self._readyz()

    @emb_api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "moerge"} for m in self._models()]}

        return await self._guard(handler, request)

    @emb_api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            body = _parse(EmbeddingsBody, await _json(request, self.settings.limits.max_body_bytes))
            if body.encoding_format not in ("float", "base64"):
                raise BadRequest(f"encoding_format must be 'float' or 'base64', got {body.encoding_format!r}")
            if body.dimensions is not None and body.dimensions != self.info.get("dim", body.dimensions):
                raise BadRequest(f"dimensions={body.dimensions} is not offered: this encoder's embeddings have one size")
            texts = _texts(body.input, self.settings.limits)
            self._check_model(body.model)
            emb, experts = await self._call("embed", texts, body.model)
            tokens = sum(len(t.split()) for t in texts)
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": encode_embedding(v, body.encoding_format), "expert": e}
                    for i, (v, e) in enumerate(zip(emb, experts, strict=True))
                ],
                "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }

        return await self._guard(handler, request)

    @emb_api.post("/v1/search")
    async def search(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            body = _parse(SearchBody, await _json(request, self.settings.limits.max_body_bytes))
            names = list(self.info["indexes"])
            if not names:
                raise BadRequest("this server has no search index: serve with --search NAME=BEIR_FOLDER")
            index = body.index or names[0]
            if not 1 <= body.k <= self.settings.max_k:
                raise BadRequest(f"k must be between 1 and {self.settings.max_k}, got {body.k}")
            self._check_model(body.model)
            return {
                "index": index,
                "results": await self._call(
                    "search", _texts(body.query, self.settings.limits, "query"), body.model, index, body.k
                ),
            }

        return await self._guard(handler, request)

    @emb_api.get("/v1/stats")
    async def stats(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            infos = await asyncio.gather(*(w.info.remote() for w in self.workers))
            return {"workers": infos, "errors": self.errors}

        return await self._guard(handler, request)


def deploy_embeddings(
    registry: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "moerge-embeddings",
    route_prefix: str = "/",
    ray_cpus: int | None = None,
    ingress_cpus: float = 0.1,
    search: Mapping[str, str | Path] | None = None,
    **options: Any,
) -> Any:
    """Start the embeddings app (a local Ray and Serve if none runs; loopback unless ``api_key``)."""
    from moerge.runtime import ensure_ray
    from moerge.serving.types import is_loopback

    settings = EmbeddingSettings(registry=str(registry), search={k: str(v) for k, v in (search or {}).items()}, **options)
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"host {host!r} exposes the server beyond this machine: give api_key=")
    names = _pick_experts(settings)
    from moerge.registry import Registry

    reg = Registry(settings.registry)
    for n in names:
        reg._resolve(n)  # an unknown name fails here, before Ray starts
    ensure_ray(ray_cpus)
    handle = start_app(
        EmbeddingServer, settings, host=host, port=port, name=name, ingress_cpus=ingress_cpus, route_prefix=route_prefix
    )
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    return Deployment(name=name, url=url, handle=handle, settings=settings)


__all__ = [
    "EmbeddingServer",
    "EmbeddingService",
    "EmbeddingSettings",
    "ServingError",
    "deploy_embeddings",
]
