"""Serving a Symbolic-MoE composition (issue 15): ``model="symbolic-moe"`` in ``POST
/v1/generate`` and ``POST /v1/completions``, on Ray.

* :class:`SymbolicService` — what the worker does, in plain Python (unit-tested without Ray):
  it profiles the pool once at start (stored profiles are loaded, not recomputed), then collects
  the questions of concurrent requests for a **batch window** (``max_wait_s``, or until
  ``max_batch`` questions), recruits them together and answers them batch-by-model — each
  recruited model is loaded once per window, then the aggregator once — and answers every
  request of the window. Requests asking for different generation settings in one window are
  answered in one sub-batch per setting.
* ``SymbolicWorker`` — that service as a Ray actor (``num_cpus``/``num_gpus``).
* :class:`SymbolicServer` — the FastAPI ingress (a Serve deployment): validation, the API key,
  the request timeout, drain, ``/healthz`` and ``/readyz`` that ping the worker, ``/v1/models``,
  ``/v1/stats`` (windows, questions, model loads).

Streaming is refused (400): the final answer exists only after the aggregation pass.

(No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime.)
"""

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moerge.serving.app import CompletionBody, Deployment, WorkerIngress, _json, _parse, start_app, stop_cut
from moerge.serving.batching import WindowBatcher
from moerge.serving.types import BadRequest, Limits, UnknownExpert

MODEL = "symbolic-moe"
TEMPLATES = ("paper", "compact")


@dataclass
class SymbolicSettings:
    """A Symbolic-MoE composition to serve: a registry of whole-model experts, the validation
    set their profiles come from, how questions are annotated and how answers are aggregated."""

    registry: str
    #: JSONL rows {"id", "question", "answer"[, "keywords"]}, or those rows as {id: row}
    validation: str | dict[str, dict[str, Any]]
    #: the recruitable models (None: every kind-model expert but the aggregator)
    models: list[str] | None = None
    #: the aggregator (None: chosen at start by the synthetic benchmark among the models)
    aggregator: str | None = None
    #: annotator: a skill vocabulary (MiniLM nearest skills), a registered instruction-tuned
    #: model (the paper's LLM annotator), or neither: the nearest validation questions' keywords
    skills: list[str] | None = None
    annotator: str | None = None
    #: with the nearest-question annotator: embed only the text before this separator
    instruction_sep: str | None = None
    #: "paper": the paper's synthesis prompt; "compact": the zoo aggregator's (question, responses by " : ")
    aggregate_template: str = "paper"
    max_new_tokens: int = 16
    k: int = 3
    seed: int = 0
    #: a batch window: questions collected for up to max_wait_s, at most max_batch of them
    max_batch: int = 64
    max_wait_s: float = 0.05
    num_cpus: float | None = None
    gpus_per_worker: float = 0.0
    threads: int | None = None
    device: str = "auto"
    #: "auto": bfloat16 on a CUDA card, float32 on the CPU
    dtype: str = "auto"
    request_timeout_s: float = 120.0
    api_key: str | None = None
    limits: Limits = Limits()
    replicas: int = 1


def read_validation(source: str | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A validation set from a JSONL file (``id``, ``question``, ``answer``[, ``keywords``]) or as given."""
    from moerge.symbolic.moe import read_questions

    return read_questions(source, need_answer=True)


def build_moe(settings: SymbolicSettings, progress: bool | None = False) -> Any:
    """The :class:`~moerge.symbolic.SymbolicMoE` the settings describe, profiled (stored profiles
    loaded) and with its aggregator chosen."""
    from moerge.device import resolve_device
    from moerge.registry import Registry
    from moerge.symbolic import SymbolicMoE
    from moerge.symbolic.execute import aggregate_prompt
    from moerge.symbolic.moe import make_annotator

    if settings.aggregate_template not in TEMPLATES:
        raise ValueError(f"aggregate_template must be one of {TEMPLATES}, got {settings.aggregate_template!r}")
    reg = Registry(settings.registry)
    validation = read_validation(settings.validation)
    names = settings.models or [r.name for r in reg.list(kind="model") if r.name not in (settings.aggregator, settings.annotator)]
    if not names:
        raise ValueError(f"registry {reg.root} has no whole-model experts to recruit (registry add --kind model)")
    device = str(resolve_device(settings.device))
    annotator = make_annotator(reg, validation, settings.skills, settings.annotator, settings.instruction_sep, device)
    if settings.aggregate_template == "compact":
        from moerge.symbolic.execute import compact_aggregate_prompt

        template: Any = compact_aggregate_prompt
    else:
        template = aggregate_prompt
    moe = SymbolicMoE(reg, names, annotator, aggregator=settings.aggregator, k=settings.k, seed=settings.seed,
                      aggregate_template=template, device=device, dtype=settings.dtype,
                      max_new_tokens=settings.max_new_tokens)  # fmt: skip
    moe.profile(validation, progress=progress)
    if moe.aggregator is None:
        moe.select_aggregator(progress=progress)
    return moe


@dataclass
class _Job:
    prompts: list[str]
    gen: tuple[int, float, int]


@dataclass
class WindowStats:
    windows: int = 0
    questions: int = 0
    model_loads: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class SymbolicService:
    """One worker: a profiled Symbolic-MoE and a batch window over concurrent requests."""

    def __init__(self, settings: SymbolicSettings, index: int = 0) -> None:
        from transformers import AutoTokenizer

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings, self.index = settings, index
        self.moe = build_moe(settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.moe.registry.model_folder(self.moe.aggregator))
        self.batcher = WindowBatcher(self.run_window, settings.max_batch, settings.max_wait_s)
        self.stats = WindowStats()

    async def answer(
        self, prompts: Sequence[str], max_new_tokens: int | None = None, temperature: float = 0.0, seed: int = 0
    ) -> list[dict[str, Any]]:
        """Each prompt's Symbolic-MoE answer (final text, recruited experts, their answers, the
        majority vote, where the final came from, the window's loads), answered together with
        every request that arrives within the batch window."""
        gen = (int(max_new_tokens or self.settings.max_new_tokens), float(temperature), int(seed))
        return await self.batcher.submit(_Job(list(prompts), gen), len(prompts))

    def run_window(self, jobs: Sequence[_Job]) -> list[list[dict[str, Any]]]:
        """One window: its questions recruited together and answered batch-by-model, one
        sub-batch per generation setting; returns each job's results in order."""
        by_gen: dict[tuple[int, float, int], list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            for i in range(len(job.prompts)):
                by_gen.setdefault(job.gen, []).append((j, i))
        out: list[list[dict[str, Any]]] = [[{} for _ in job.prompts] for job in jobs]
        loads = distinct = 0
        for (max_new, temperature, seed), members in by_gen.items():
            questions = {f"{j}:{i}": jobs[j].prompts[i] for j, i in members}
            self.moe.generation = {**self.moe.generation, "max_new_tokens": max_new, "temperature": temperature, "seed": seed}
            run = self.moe.run(questions, progress=False)
            loads += run["model_loads"]
            distinct += run["distinct_models"]
            window = {"questions": len(questions), "model_loads": run["model_loads"], "distinct_models": run["distinct_models"]}
            for j, i in members:
                r = run["results"][f"{j}:{i}"]
                out[j][i] = {
                    "text": r["final"],
                    "experts": [{"name": m, "weight": round(r["experts"].count(m) / len(r["experts"]), 6)}
                                for m in dict.fromkeys(r["experts"])],
                    "recruited": r["experts"], "how": r["how"], "keywords": r["keywords"], "answers": r["answers"],
                    "majority": r["majority"], "final_from": r["final_from"], "aggregator": run["aggregator"],
                    "window": window,
                    "prompt_tokens": len(self.tokenizer(jobs[j].prompts[i])["input_ids"]),
                    "completion_tokens": len(self.tokenizer(r["final"], add_special_tokens=False)["input_ids"]),
                }  # fmt: skip
        n = sum(len(job.prompts) for job in jobs)
        self.stats.windows += 1
        self.stats.questions += n
        self.stats.model_loads += loads
        self.stats.last = {"questions": n, "requests": len(jobs), "model_loads": loads, "distinct_models": distinct,
                           "sub_batches": len(by_gen)}  # fmt: skip
        return out

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "models": self.moe.models,
            "aggregator": self.moe.aggregator,
            "windows": self.stats.windows,
            "questions": self.stats.questions,
            "model_loads": self.stats.model_loads,
            "last_window": self.stats.last,
        }

    def ping(self) -> int:
        return self.index


# ------------------------------------------------------------------------------ HTTP ingress


class SymbolicGenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompts: list[str] | None = None
    model: str = Field(MODEL, description="'symbolic-moe'")
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False


def _check_texts(texts: list[str], limits: Limits, what: str) -> list[str]:
    if not texts:
        raise BadRequest(f"'{what}' is empty")
    if len(texts) > limits.max_prompts:
        raise BadRequest(f"{len(texts)} prompts in one request; the limit is {limits.max_prompts}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise BadRequest(f"{what}[{i}] is empty")
        if len(t) > limits.max_prompt_chars:
            raise BadRequest(f"{what}[{i}] has {len(t)} characters; the limit is {limits.max_prompt_chars}")
    return texts


def _check_request(model: str, stream: bool, top_p: float, max_new: int | None, temperature: float, limits: Limits) -> None:
    if model != MODEL:
        from moerge.hints import did_you_mean

        raise UnknownExpert(f"unknown model {model!r}{did_you_mean(model, [MODEL])}; this server has ['{MODEL}']")
    if stream:
        raise BadRequest(f"'stream' is not supported for {MODEL!r}: its answer exists only after the aggregation pass")
    if top_p != 1.0:
        raise BadRequest(f"top_p={top_p} is not supported for {MODEL!r} (greedy, or temperature sampling)")
    if max_new is not None and not 1 <= max_new <= limits.max_new_tokens:
        raise BadRequest(f"max tokens must be between 1 and {limits.max_new_tokens}, got {max_new}")
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"temperature must be between 0 and 2, got {temperature}")


sym_api = FastAPI(title="moerge symbolic-moe", description="Symbolic-MoE over whole-model experts, batched by model, on Ray")


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(sym_api)
class SymbolicServer(WorkerIngress):
    def __init__(self, settings: SymbolicSettings) -> None:
        self._start_workers(SymbolicService, settings)  # profiled here: a bad registry or validation set fails

    @sym_api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return await self._healthz()

    @sym_api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        return await self._readyz()

    @sym_api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "moerge",
                                                "experts": self.info["models"], "aggregator": self.info["aggregator"]}]}  # fmt: skip

        return await self._guard(handler, request)

    @sym_api.get("/v1/stats")
    async def stats(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            infos = await asyncio.gather(*(w.info.remote() for w in self.workers))
            return {"workers": infos, "errors": self.errors}

        return await self._guard(handler, request)

    @sym_api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            limits = self.settings.limits
            body = _parse(SymbolicGenerateBody, await _json(request, limits.max_body_bytes))
            if (body.prompt is None) == (body.prompts is None):
                raise BadRequest("give exactly one of 'prompt' or 'prompts'")
            texts = _check_texts([body.prompt] if body.prompt is not None else list(body.prompts or []), limits, "prompts")
            _check_request(body.model, body.stream, body.top_p, body.max_new_tokens, body.temperature, limits)
            results = await self._call("answer", texts, body.max_new_tokens, body.temperature, body.seed or 0)
            return {"id": f"gen-{uuid.uuid4().hex[:12]}", "model": MODEL, "results": results}

        return await self._guard(handler, request)

    @sym_api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            limits = self.settings.limits
            body = _parse(CompletionBody, await _json(request, limits.max_body_bytes))
            if body.n != 1:
                raise BadRequest(f"n={body.n} is not supported; send n=1")
            texts = _check_texts([body.prompt] if isinstance(body.prompt, str) else list(body.prompt), limits, "prompt")
            _check_request(body.model, body.stream, body.top_p, body.max_tokens, body.temperature, limits)
            results = await self._call("answer", texts, body.max_tokens, body.temperature, body.seed or 0)
            stops = body.stops()
            choices = []
            for i, r in enumerate(results):
                text, reason = r["text"], "stop"
                cut, _ = stop_cut(text, stops, final=True)
                if cut >= 0:
                    text = text[:cut]
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason, "experts": r["experts"],
                                "symbolic": {k: r[k] for k in ("recruited", "how", "answers", "majority", "final_from", "window")}})  # fmt: skip
            prompt_tokens = sum(r["prompt_tokens"] for r in results)
            completion_tokens = sum(r["completion_tokens"] for r in results)
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": MODEL,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },  # fmt: skip
            }

        return await self._guard(handler, request)


def deploy_symbolic(
    registry: str | Path,
    validation: str | Path | Mapping[str, Mapping[str, Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "moerge-symbolic",
    route_prefix: str = "/",
    ray_cpus: int | None = None,
    ingress_cpus: float = 0.1,
    **options: Any,
) -> Deployment:
    """Start the Symbolic-MoE app (a local Ray and Serve if none runs; loopback unless ``api_key``).
    ``options``: :class:`SymbolicSettings` fields. The settings are checked here — the models
    exist and are whole models, the validation set reads — before Ray starts."""
    from moerge.registry import Registry
    from moerge.runtime import ensure_ray
    from moerge.serving.types import is_loopback

    val = read_validation(str(validation) if isinstance(validation, (str, Path)) else dict(validation))
    settings = SymbolicSettings(registry=str(registry), validation=val, **options)
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"host {host!r} exposes the server beyond this machine: give api_key=")
    if settings.aggregate_template not in TEMPLATES:
        raise ValueError(f"aggregate_template must be one of {TEMPLATES}, got {settings.aggregate_template!r}")
    reg = Registry(settings.registry)
    for n in [*(settings.models or []), *([settings.aggregator] if settings.aggregator else [])]:
        if reg._resolve(n).kind != "model":
            raise ValueError(f"{n!r} is not a whole-model expert (kind 'model'): Symbolic-MoE serves whole models")
    ensure_ray(ray_cpus)
    handle = start_app(
        SymbolicServer, settings, host=host, port=port, name=name, ingress_cpus=ingress_cpus, route_prefix=route_prefix
    )
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    return Deployment(name=name, url=url, handle=handle, settings=settings)


__all__ = ["MODEL", "SymbolicServer", "SymbolicService", "SymbolicSettings", "build_moe", "deploy_symbolic", "read_validation"]
