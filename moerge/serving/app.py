"""The Ray Serve application: an HTTP ingress (FastAPI) over an :class:`ExpertPool` of
:class:`ExpertWorker` actors.

Endpoints: ``POST /v1/generate``, ``POST /v1/route``, ``GET /v1/experts``, ``GET /healthz``,
``GET /v1/stats`` and the OpenAI-style ``POST /v1/completions`` and ``POST /v1/chat/completions``
(``model`` names an expert, a composition, ``__base__``, or ``auto`` for the server's router; a
chat is rendered with the base's chat template and routed on its last user message), so OpenAI
clients work unchanged.

Serve's ``@serve.batch`` batches the routing decisions of concurrent requests (one embedder
call for many prompts). Expert batching happens in the workers, not in Serve: Serve would
split a batch by multiplexed model id, so the expert travels in the payload and each worker
builds one mixed batch (serving-notes §4.3).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from moerge.serving.types import (
    BASE,
    BadRequest,
    GenerationParams,
    Limits,
    ServeRequest,
    ServeResult,
    ServingError,
    Unavailable,
    is_loopback,
)
from moerge.serving.workers import ExpertPool, WorkerConfig

log = logging.getLogger(__name__)

#: example inputs per expert shipped to the ingress for a sequence router (retrieval: paper's N)
MAX_ROUTER_EXAMPLES = 1000
#: ``model`` values (OpenAI API) that mean "let the server's router decide"
AUTO_MODELS = ("auto", "moerge")
#: how often the ingress checks its workers, and how long a ping may take
WATCH_S = 2.0
PING_TIMEOUT_S = 2.0
#: pings missed in a row before a worker counts as unresponsive (before that: slow, still serving)
MISSES_UNRESPONSIVE = 3


@dataclass
class ServeSettings:
    """Everything the app needs to start: the workers' config and how to route."""

    registry: str
    replicas: int = 1
    router: str | None = None
    router_config: dict[str, Any] = field(default_factory=dict)
    #: expert name → example inputs for the sequence router's preparation (retrieval's bank)
    router_data: dict[str, list[str]] | None = None
    compositions: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_composition: str | None = None
    max_resident: int = 8
    max_batch: int = 16
    max_wait_s: float = 0.01
    #: Ray CPUs per worker; None = the cluster's CPUs (less the ingress) shared by the workers, at most 1 each
    num_cpus: float | None = None
    threads: int | None = None
    limits: Limits = Limits()
    #: the workers' device ("auto": the GPU Ray gave each, else the CPU), dtype, GPUs each
    #: asks Ray for (fractions share a card) and compiled decode
    device: str = "auto"
    dtype: str = "auto"
    gpus_per_worker: float = 0.0
    compile: bool = False
    #: the base model (default: the one the registry's LoRA experts name)
    base: str | None = None
    #: seconds a request may take before it is answered 504 (a stream: until it starts)
    request_timeout_s: float = 60.0
    #: required as ``Authorization: Bearer <key>`` on every endpoint but /healthz and /readyz
    api_key: str | None = None
    #: a Jinja chat template for /v1/chat/completions instead of the base tokenizer's own (as
    #: vLLM's --chat-template; for a base without one, or to change it)
    chat_template: str | None = None
    #: serve the registry (and a base folder) to workers on nodes that cannot see it, through Ray
    share_registry: bool = True
    registry_service: Any = None

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            registry=self.registry,
            base=self.base,
            max_resident=self.max_resident,
            max_batch=self.max_batch,
            max_wait_s=self.max_wait_s,
            compositions=self.compositions,
            limits=self.limits,
            threads=self.threads,
            device=self.device,
            dtype=self.dtype,
            gpus=self.gpus_per_worker,
            compile=self.compile,
            registry_service=self.registry_service,
        )


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompts: list[str] | None = None

    def texts(self, limits: Limits) -> list[str]:
        if (self.prompt is None) == (self.prompts is None):
            raise BadRequest("give exactly one of 'prompt' or 'prompts'")
        texts = [self.prompt] if self.prompt is not None else list(self.prompts or [])
        if not texts:
            raise BadRequest("'prompts' is empty")
        if len(texts) > limits.max_prompts:
            raise BadRequest(f"{len(texts)} prompts in one request; the limit is {limits.max_prompts}")
        return texts


class GenerateBody(_Body):
    expert: str | None = Field(None, description="one expert by name (or name@version), or __base__")
    experts: dict[str, float] | None = Field(None, description="several experts with weights (a per-request merge)")
    model: str | None = Field(None, description="a composition (or an expert) by name")
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = Field(False, description="server-sent events: text pieces as the batch decodes, then each result")


class RouteBody(_Body):
    model: str | None = None


class _OpenAIBody(BaseModel):
    """What OpenAI's completions and chat completions requests share; fields we do not use (user,
    logprobs, tools …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_OpenAIBody):
    """OpenAI's completions request."""

    prompt: str | list[str]
    max_tokens: int = 16


class ChatMessage(BaseModel):
    """One message of a chat request; ``content`` as a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_OpenAIBody):
    """OpenAI's chat completions request: the conversation is rendered with the base's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in self.messages]

    def query(self) -> str:
        """What a sequence router reads: the last user message."""
        users = [m.text() for m in self.messages if m.role == "user"]
        if not users:
            raise BadRequest("'messages' holds no user message")
        return users[-1]


def stop_cut(text: str, stops: list[str], final: bool) -> tuple[int, int]:
    """(where a stop sequence cuts ``text``, or -1; how much of ``text`` is safe to send).
    The cut is the earliest stop, as in a non-streamed answer; while the text's tail could
    still grow into a stop that starts earlier, that tail is held back."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    cut = min(found, default=-1)
    pending = None
    if not final:
        longest = max((len(s) for s in stops if s), default=0)
        for q in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[q:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in stops if s):
                pending = q
                break
    if cut >= 0 and (pending is None or cut <= pending):
        return cut, cut
    return -1, len(text) if pending is None else pending


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **extra}}, status_code=status)


class TooLarge(BadRequest):
    status = 413


async def _json(request: Request, limit: int = Limits.max_body_bytes) -> Any:
    """The body as JSON, read no further than ``limit`` bytes (413 beyond: a declared length is
    refused before reading, a chunked body as soon as it passes the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body over the limit of {limit} bytes")
    try:
        return json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None


def _parse(cls: type[BaseModel], data: Any) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadRequest(f"invalid request: {where}") from None


async def respond(handler: Any, errors: dict[int, int]) -> Response:
    """Run an endpoint's handler: its result as JSON, a :class:`ServingError` as its 4xx/503
    with the message, anything else as a 500 carrying an id that is also in the log (the
    exception itself is not shown to the client). ``errors`` counts statuses."""
    try:
        out = await handler()
        return out if isinstance(out, Response) else JSONResponse(out)
    except ServingError as exc:
        errors[exc.status] = errors.get(exc.status, 0) + 1
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error" if exc.status < 500 else "unavailable"
        return _error(exc.status, exc.message, kind)
    except Exception as exc:
        eid = uuid.uuid4().hex[:12]
        log.exception("internal error %s", eid)
        errors[500] = errors.get(500, 0) + 1
        return _error(500, f"internal error ({type(exc).__name__}); quote id {eid} when reporting it", "server_error", id=eid)


api = FastAPI(title="moerge", description="Experts served by assigned expert, over Ray")
#: endpoints that answer without an API key (probes)
OPEN_PATHS = ("/healthz", "/readyz")


def authorised(request: Request, key: str | None) -> bool:
    """With an API key set, every endpoint but the probes needs ``Authorization: Bearer <key>``
    (compared in constant time)."""
    if not key or request.url.path in OPEN_PATHS:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


def refusal(request: Request, api_key: str | None, draining: bool, errors: dict[int, int]) -> JSONResponse | None:
    """The 401 (no or wrong API key) or 503 (shutting down) a request gets before any work, counted."""
    if not authorised(request, api_key):
        errors[401] = errors.get(401, 0) + 1
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
    if draining:
        errors[503] = errors.get(503, 0) + 1
        return _error(503, "the server is shutting down; retry on another replica", "unavailable")
    return None


class WorkerIngress:
    """What the embeddings and Symbolic-MoE ingresses share: ``replicas`` Ray actors of one
    service class (``num_cpus``/``num_gpus`` each, restarted by Ray), least-outstanding dispatch,
    the API-key / drain / timeout guard, and health by pinging every worker. A subclass calls
    :meth:`_start_workers` in its ``__init__`` and defines its own endpoints."""

    def _start_workers(self, service: type, settings: Any) -> None:
        import ray

        from moerge.serving.workers import actor_logging

        actor_logging()
        self.settings = settings
        cls = ray.remote(service)
        opts: dict[str, Any] = {"num_cpus": settings.num_cpus or 1.0, "max_restarts": -1, "max_task_retries": 0}
        if settings.gpus_per_worker:
            opts["num_gpus"] = settings.gpus_per_worker
        self.workers = [cls.options(**opts).remote(settings, i) for i in range(settings.replicas)]
        self.info = ray.get(self.workers[0].info.remote())  # loaded: a bad registry or model fails here
        ray.get([w.ping.remote() for w in self.workers])
        self.outstanding = [0] * len(self.workers)
        self.errors: dict[int, int] = {}
        self.started = time.time()
        self.in_flight = 0
        self.draining = False

    def drain(self) -> int:
        """Stop taking requests (503; ``/healthz`` says draining); how many are still in flight."""
        self.draining = True
        return self.in_flight

    def pending(self) -> int:
        return self.in_flight

    async def _call(self, method: str, *args: Any) -> Any:
        i = min(range(len(self.workers)), key=lambda j: self.outstanding[j])
        self.outstanding[i] += 1
        try:
            return await getattr(self.workers[i], method).remote(*args)
        finally:
            self.outstanding[i] -= 1

    async def _guard(self, handler: Any, request: Request) -> Response:
        refused = refusal(request, self.settings.api_key, self.draining, self.errors)
        if refused is not None:
            return refused
        self.in_flight += 1
        try:
            return await asyncio.wait_for(respond(handler, self.errors), timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            self.errors[504] = self.errors.get(504, 0) + 1
            return _error(504, f"no answer within {self.settings.request_timeout_s:g} s", "timeout")
        finally:
            self.in_flight -= 1

    async def _health(self) -> tuple[int, dict[str, Any]]:
        async def one(i: int) -> dict[str, Any]:
            try:
                await asyncio.wait_for(self.workers[i].ping.remote(), timeout=PING_TIMEOUT_S)
                return {"worker": i, "state": "ok"}
            except Exception as exc:  # noqa: BLE001 - any failure means this worker cannot answer now
                return {"worker": i, "state": "unresponsive", "error": type(exc).__name__}

        workers = await asyncio.gather(*(one(i) for i in range(len(self.workers))))
        ok = sum(w["state"] == "ok" for w in workers)
        status = "draining" if self.draining else "ok" if ok == len(workers) else "degraded" if ok else "unavailable"
        return (200 if ok and not self.draining else 503), {
            "status": status,
            "workers": workers,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def _healthz(self) -> JSONResponse:
        code, body = await self._health()
        return JSONResponse(body, status_code=code)

    async def _readyz(self) -> JSONResponse:
        code, body = await self._health()
        return JSONResponse({"ready": code == 200, "status": body["status"]}, status_code=code)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(api)
class MoergeServer:
    """The HTTP ingress: validates, routes (batched with ``@serve.batch``), dispatches to the pool."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        from moerge.serving.workers import actor_logging

        actor_logging()
        self.pool = ExpertPool(
            settings.worker_config(),
            replicas=settings.replicas,
            router=settings.router,
            router_config=settings.router_config,
            router_data=settings.router_data,
            default_composition=settings.default_composition,
            num_cpus=settings.num_cpus or 1.0,
        )
        self.pool.ready()
        self.started = time.time()
        self.requests = 0
        self.errors: dict[int, int] = {}
        #: requests being answered (a stream counts until its last event); refused while draining
        self.in_flight = 0
        self.draining = False
        #: the workers as last seen by the watcher (every WATCH_S): who can serve
        self.health: list[dict[str, Any]] = [{"worker": i, "state": "ok"} for i in range(len(self.pool.workers))]
        self._misses: dict[int, int] = {}
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------------------ helpers

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _decide(self, prompts: list[str]) -> list[Any]:
        return await asyncio.to_thread(self.pool.decide, prompts)

    def _target(self, name: str | None) -> tuple[tuple[tuple[str, float], ...], str | None, bool]:
        """A ``model``/``expert`` name → (experts, composition, needs routing)."""
        if name is not None and not name.strip():
            raise BadRequest("'expert'/'model' must be a non-empty name (leave it out, or send 'auto', to be routed)")
        if name is None or name in AUTO_MODELS:
            return (), None, True
        if name in self.settings.compositions:
            return (), name, False
        if name == BASE:
            return ((BASE, 1.0),), None, False
        return ((name, 1.0),), None, False

    async def _prepare(self, requests: list[ServeRequest], route: list[bool], resolve: bool = False) -> None:
        """Route the requests that need it (batched across concurrent requests) and check all;
        ``resolve``: also look their experts up now (a stream must fail before it starts)."""
        todo = [i for i, r in enumerate(route) if r]
        if todo:
            decided = await asyncio.gather(*(self._decide(requests[i].query or requests[i].prompt) for i in todo))
            for i, (experts, comp) in zip(todo, decided, strict=True):
                requests[i].experts, requests[i].composition = experts, comp
        for r in requests:
            r.check(self.limits)
        if resolve:
            self.pool.resolve(requests)

    async def _streams(self, requests: list[ServeRequest]) -> Any:
        """Fan in the requests' streams: yields (index, text piece or ServeResult), each
        request's pieces in order, as they come from the workers."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, req: ServeRequest) -> None:
            try:
                async for item in self.pool.astream(req):
                    await queue.put((i, item))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, logged with an id
                eid = uuid.uuid4().hex[:12]
                log.exception("internal error %s (stream)", eid)
                await queue.put(
                    (i, ServeResult(id=req.id, error=f"internal error ({type(exc).__name__}); quote id {eid}", status=500))
                )
            finally:
                await queue.put((i, done))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is done:
                    left -= 1
                    continue
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def _stream_error(self, result: ServeResult, index: int) -> dict[str, Any]:
        self.errors[result.status] = self.errors.get(result.status, 0) + 1
        kind = "invalid_request_error" if result.status < 500 else "server_error"
        return {"error": {"message": f"prompt {index}: {result.error}", "type": kind, "code": result.status}}

    async def _serve(self, requests: list[ServeRequest], route: list[bool]) -> list[ServeResult]:
        await self._prepare(requests, route)
        results = await self.pool.agenerate(requests)
        bad = [(i, r) for i, r in enumerate(results) if r.error]
        if bad:
            i, r = bad[0]
            where = f"prompt {i}: " if len(results) > 1 else ""
            if r.status == 500:
                raise RuntimeError(f"{where}{r.error}")
            err = (Unavailable if r.status >= 500 else BadRequest)(f"{where}{r.error}")  # e.g. 503: died again on retry
            err.status = r.status
            raise err
        return results

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_loop())

    def _judge(self, fresh: list[dict[str, Any]], count: bool = True) -> list[dict[str, Any]]:
        """Pings as states: a worker that missed fewer than MISSES_UNRESPONSIVE pings in a row is
        ``slow`` (busy on a loaded machine: still serving), after that ``unresponsive``.
        ``count``: this round counts toward the misses (the watcher's rounds do; probes do not)."""
        out = []
        for w in fresh:
            i = w["worker"]
            if w["state"] == "unresponsive":
                misses = self._misses.get(i, 0) + (1 if count else 0)
                if count:
                    self._misses[i] = misses
                if misses < MISSES_UNRESPONSIVE:
                    w = {**w, "state": "slow", "missed_pings": misses}
            elif count:
                self._misses[i] = 0
            out.append(w)
        return out

    async def _watch_loop(self) -> None:
        while True:
            try:
                self.health = self._judge(await self.pool.ahealth(timeout_s=PING_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - keep watching; the next round reports
                log.exception("worker health check failed")
            await asyncio.sleep(WATCH_S)

    def _serving_workers(self) -> int:
        return sum(w["state"] in ("ok", "slow") for w in self.health)

    async def _guard(self, handler: Any, request: Request, needs_workers: bool = True) -> Response:
        self._watch()
        refused = refusal(request, self.settings.api_key, self.draining, self.errors)
        if refused is not None:
            return refused
        if needs_workers and not self._serving_workers():
            self.errors[503] = self.errors.get(503, 0) + 1
            states = ", ".join(f"worker {w['worker']} {w['state']}" for w in self.health)
            return _error(
                503, f"no worker can serve now ({states}); they are restarted automatically — retry shortly", "unavailable"
            )
        self.requests += 1
        self.in_flight += 1
        streaming = False
        timeout = self.settings.request_timeout_s
        try:
            try:
                out = await asyncio.wait_for(respond(handler, self.errors), timeout=timeout)
            except asyncio.TimeoutError:
                self.errors[504] = self.errors.get(504, 0) + 1
                return _error(
                    504,
                    f"no answer within the {timeout:g} s deadline (request_timeout_s, --request-timeout); "
                    "a worker may be overloaded, stuck or restarting",
                    "timeout",
                )
            if isinstance(out, StreamingResponse):
                streaming = True
                out.body_iterator = self._counted(out.body_iterator)
            return out
        finally:
            if not streaming:
                self.in_flight -= 1

    async def _counted(self, events: Any) -> Any:
        try:
            async for event in events:
                yield event
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------------------ control

    def drain(self) -> int:
        """Stop taking requests (new ones get 503, ``/healthz`` says ``draining``); returns
        how many are still being answered."""
        self.draining = True
        return self.in_flight

    def pending(self) -> int:
        return self.in_flight

    # ---------------------------------------------------------------------------- endpoints

    async def _probe(self) -> tuple[int, dict[str, Any]]:
        self._watch()
        self.health = self._judge(await self.pool.ahealth(timeout_s=PING_TIMEOUT_S), count=False)  # pinged now
        serving = self._serving_workers()
        healthy = sum(w["state"] == "ok" for w in self.health)
        status = (
            "draining" if self.draining else "ok" if healthy == len(self.health) else "degraded" if serving else "unavailable"
        )
        body = {
            "status": status,
            "workers": self.health,
            "serving_workers": serving,
            "uptime_s": round(time.time() - self.started, 1),
            "in_flight": self.in_flight,
        }
        return (200 if status in ("ok", "degraded") else 503), body

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 while at least one worker answers (``ok``, or ``degraded`` with the others named);
        503 when none does (``unavailable``) or while stopping (``draining``)."""
        code, body = await self._probe()
        return JSONResponse(body, status_code=code)

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Whether to send traffic here: 200 or 503, with the reason."""
        code, body = await self._probe()
        return JSONResponse(
            {"ready": code == 200, "status": body["status"], "serving_workers": body["serving_workers"]}, status_code=code
        )

    @api.get("/v1/experts")
    async def experts(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            info = await self.pool.ainfo()
            return {
                "experts": self.pool.experts(),
                "compositions": [
                    {"name": n, "router": s.get("router"), "experts": s.get("experts")}
                    for n, s in self.settings.compositions.items()
                ],
                "router": self.settings.router,
                "default_composition": self.settings.default_composition,
                "resident": {w["worker"]: w.get("resident", []) for w in info["workers"]},
            }

        return await self._guard(handler, request, needs_workers=False)

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            return {"requests": self.requests, "errors": self.errors, **(await self.pool.ainfo())}

        return await self._guard(handler, request, needs_workers=False)

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            body = _parse(GenerateBody, await _json(request, self.limits.max_body_bytes))
            texts = body.texts(self.limits)
            given = [x for x in (body.expert, body.experts, body.model) if x is not None]
            if len(given) > 1:
                raise BadRequest("give at most one of 'expert', 'experts' or 'model'")
            params = GenerationParams(body.max_new_tokens, body.temperature, body.top_p, body.seed)
            if body.experts is not None:
                if not body.experts:
                    raise BadRequest("'experts' is empty")
                experts, comp, route = tuple(body.experts.items()), None, False
            else:
                experts, comp, route = self._target(body.expert if body.expert is not None else body.model)
            reqs = [ServeRequest(t, experts, comp, params) for t in texts]
            gid = f"gen-{uuid.uuid4().hex[:12]}"
            if body.stream:
                await self._prepare(reqs, [route] * len(reqs), resolve=True)
                return StreamingResponse(self._sse_generate(gid, reqs), media_type="text/event-stream", headers=SSE_HEADERS)
            results = await self._serve(reqs, [route] * len(reqs))
            return {"id": gid, "results": [r.to_json() for r in results]}

        return await self._guard(handler, request)

    @api.post("/v1/route")
    async def route(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            body = _parse(RouteBody, await _json(request, self.limits.max_body_bytes))
            texts = body.texts(self.limits)
            for t in texts:
                ServeRequest(t).check(self.limits)
            if body.model is not None and body.model not in AUTO_MODELS and body.model not in self.settings.compositions:
                raise BadRequest(f"'model' must name a composition {sorted(self.settings.compositions)} or be 'auto'")
            comp = body.model if body.model in self.settings.compositions else None
            out = await self.pool.route(texts, comp)
            for d in out:
                d["experts"] = [{"name": n, "weight": round(float(w), 6)} for n, w in d["experts"]]
            return {"decisions": out}

        return await self._guard(handler, request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            body = _parse(CompletionBody, await _json(request, self.limits.max_body_bytes))
            if body.n != 1:
                raise BadRequest(f"n={body.n} is not supported; send n=1")
            texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not texts or len(texts) > self.limits.max_prompts:
                raise BadRequest(f"'prompt' must hold 1 to {self.limits.max_prompts} prompts")
            experts, comp, route = self._target(body.model)
            params = GenerationParams(body.max_tokens, body.temperature, body.top_p, body.seed)
            reqs = [ServeRequest(t, experts, comp, params) for t in texts]
            stops = body.stops()
            if body.stream:
                await self._prepare(reqs, [route] * len(reqs), resolve=True)
                events = self._sse_completions(body, reqs, stops)
                return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
            results = await self._serve(reqs, [route] * len(reqs))
            choices = []
            for i, r in enumerate(results):
                text, reason = r.text, r.finish_reason
                cut, _ = stop_cut(text, stops, final=True)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                choices.append(
                    {"index": i, "text": text, "logprobs": None, "finish_reason": reason, "experts": r.to_json()["experts"]}
                )
            prompt_tokens = sum(r.prompt_tokens for r in results)
            completion_tokens = sum(r.completion_tokens for r in results)
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }

        return await self._guard(handler, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        async def handler() -> dict[str, Any]:
            body = _parse(ChatBody, await _json(request, self.limits.max_body_bytes))
            if body.n != 1:
                raise BadRequest(f"n={body.n} is not supported; send n=1")
            query = body.query()
            (prompt,) = await self.pool.arender_chat([body.conversation()], self.settings.chat_template)
            experts, comp, route = self._target(body.model)
            max_tokens = body.max_completion_tokens or body.max_tokens or GenerationParams().max_new_tokens
            params = GenerationParams(max_tokens, body.temperature, body.top_p, body.seed)
            reqs = [ServeRequest(prompt, experts, comp, params, query=query)]
            stops = body.stops()
            if body.stream:
                await self._prepare(reqs, [route], resolve=True)
                events = self._sse_completions(body, reqs, stops, chat=True)
                return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
            (r,) = await self._serve(reqs, [route])
            text, reason = r.text, r.finish_reason
            cut, _ = stop_cut(text, stops, final=True)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": reason,
                        "experts": r.to_json()["experts"],
                    }
                ],
                "usage": {
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens,
                },
            }

        return await self._guard(handler, request)

    # ----------------------------------------------------------------------------- streaming

    async def _sse_generate(self, gid: str, reqs: list[ServeRequest]) -> Any:
        """``/v1/generate`` with ``stream``: ``{"id", "index", "text"}`` pieces, then
        ``{"id", "index", "result"}`` per prompt, then ``[DONE]``."""
        async for i, item in self._streams(reqs):
            if isinstance(item, str):
                yield sse({"id": gid, "index": i, "text": item})
            elif item.error:
                yield sse({"id": gid, "index": i, **self._stream_error(item, i)})
            else:
                yield sse({"id": gid, "index": i, "result": item.to_json()})
        yield sse("[DONE]")

    async def _sse_completions(
        self, body: CompletionBody | ChatBody, reqs: list[ServeRequest], stops: list[str], chat: bool = False
    ) -> Any:
        """``/v1/completions`` with ``stream``: OpenAI's ``text_completion`` chunks as the batch
        decodes (stop sequences honoured across pieces), a last chunk per choice with its
        ``finish_reason``, a usage chunk if ``stream_options.include_usage``, then ``[DONE]``.
        ``chat``: ``/v1/chat/completions``' ``chat.completion.chunk`` (the text as ``delta.content``,
        the first chunk of a choice with ``delta.role``)."""
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        held = [""] * len(reqs)
        finished = [False] * len(reqs)
        started = [False] * len(reqs)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        def chunk(i: int, text: str, reason: str | None = None, **extra: Any) -> str:
            if chat:
                delta = {"content": text} if started[i] else {"role": "assistant", "content": text}
                started[i] = True
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason, **extra}
            else:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason, **extra}
            return sse({"id": cid, "object": kind, "created": created, "model": body.model, "choices": [choice]})

        async for i, item in self._streams(reqs):
            if finished[i]:  # cut by a stop sequence: the rest of its decode is dropped, its usage counted
                if isinstance(item, ServeResult) and not item.error:
                    usage["prompt_tokens"] += item.prompt_tokens
                    usage["completion_tokens"] += item.completion_tokens
                continue
            if isinstance(item, str):
                held[i] += item
                cut, safe = stop_cut(held[i], stops, final=False)
                if cut >= 0:
                    finished[i] = True
                    yield chunk(i, held[i][:cut], "stop")
                elif safe:
                    yield chunk(i, held[i][:safe])
                    held[i] = held[i][safe:]
                continue
            finished[i] = True
            if item.error:
                yield sse(self._stream_error(item, i))
                continue
            cut, _ = stop_cut(held[i], stops, final=True)
            text, reason = (held[i][:cut], "stop") if cut >= 0 else (held[i], item.finish_reason)
            usage["prompt_tokens"] += item.prompt_tokens
            usage["completion_tokens"] += item.completion_tokens
            yield chunk(i, text, reason, experts=item.to_json()["experts"])
        if (body.stream_options or {}).get("include_usage"):
            total = usage["prompt_tokens"] + usage["completion_tokens"]
            yield sse(
                {
                    "id": cid,
                    "object": kind,
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": {**usage, "total_tokens": total},
                }
            )
        yield sse("[DONE]")


@dataclass
class Deployment:
    """A running app: its URL, Serve handle and settings; ``shutdown()`` stops it."""

    name: str
    url: str
    handle: Any
    settings: ServeSettings

    def shutdown(self) -> None:
        serve.delete(self.name)

    def drain(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> int:
        """Stop accepting requests and wait up to ``timeout_s`` for those in flight to be
        answered (streams to their last event); returns how many were still unanswered."""
        left = self.handle.drain.remote().result()
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            time.sleep(poll_s)
            left = self.handle.pending.remote().result()
        return left

    def to_json(self) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("registry_service", "api_key")}
        return {"name": self.name, "url": self.url, "settings": settings}


def build_settings(
    model_or_config: Any = None,
    *,
    registry: str | None = None,
    router: str | None = None,
    router_config: dict[str, Any] | None = None,
    composition: Any = None,
    data: Any = None,
    **options: Any,
) -> ServeSettings:
    """Settings from what the caller has: a :class:`ServeSettings`, a registry (path or
    Registry), a :class:`ComposedModel` or a saved composition spec; ``router`` names a
    sequence router (``retrieval``: decided at the ingress, experts batched in the workers) or
    a token/merging router (``phatgoose``, ``glider``, ``arrow``, ``twin``: composed once here,
    so its artifacts are stored, then run whole on every worker). ``data`` (expert name →
    examples, or a callable) trains gates and fills retrieval's example bank."""
    from pathlib import Path

    from moerge.composer.compose import ComposedModel, CompositionSpec
    from moerge.registry import Registry
    from moerge.routers import get_router
    from moerge.routers.base import Router
    from moerge.serving.workers import composition_spec

    if isinstance(model_or_config, ServeSettings):
        return model_or_config
    compositions: dict[str, dict[str, Any]] = {}
    default = None
    if isinstance(model_or_config, ComposedModel):
        composition = model_or_config.spec
    elif isinstance(model_or_config, Registry):
        registry = str(model_or_config.root)
    elif model_or_config is not None:
        p = Path(model_or_config)
        if p.is_file():
            composition = p
        else:
            registry = str(p)
    if composition is not None:
        if isinstance(composition, CompositionSpec):
            spec, name = composition.model_dump(mode="json"), composition.router
        else:
            path = Path(composition)
            try:
                spec = CompositionSpec.model_validate_json(path.read_text()).model_dump(mode="json")
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read composition spec {path}: {exc}") from None
            name = path.stem
        if options.get("base"):  # --base overrides the saved composition's base too
            spec["base"] = options["base"]
        compositions[name] = spec
        default = name
        registry = registry or spec["registry"]
    if registry is None:
        raise ValueError("serving needs a registry (or a composition, whose spec names one)")
    seq_router = None
    if router is not None:
        cls = get_router(router)
        if cls.granularity != "token" and cls.install is Router.install:
            seq_router = router
        else:
            # prepared once in the driver (on the CPU unless a device is named: the GPUs are the workers')
            prep_device = options.get("device", "auto") if options.get("device", "auto") != "auto" else "cpu"
            compositions[router] = composition_spec(
                registry, router, router_config, data=data, device=prep_device, base=options.get("base")
            )
            default = default or router
    router_data = None
    if seq_router is not None and data is not None:
        from moerge.routers import PrepareContext

        ctx = PrepareContext(registry=None, data=data)
        router_data = {}
        for rec in Registry(registry).list(kind="lora"):
            examples = ctx.data_for(rec.name) or []
            router_data[rec.name] = [e if isinstance(e, str) else e[0] for e in examples][:MAX_ROUTER_EXAMPLES]
    return ServeSettings(
        registry=str(registry),
        router=seq_router,
        router_config=dict(router_config or {}) if seq_router else {},
        router_data=router_data,
        compositions=compositions,
        default_composition=default if seq_router is None else None,
        **options,
    )


def deploy(
    model_or_config: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "moerge",
    registry: str | None = None,
    router: str | None = None,
    router_config: dict[str, Any] | None = None,
    composition: Any = None,
    data: Any = None,
    ray_cpus: int | None = None,
    ingress_cpus: float = 0.1,
    **options: Any,
) -> Deployment:
    """Start the Ray Serve app (starting a local Ray and Serve if needed; loopback by
    default) and wait until its workers are loaded. ``options``: :class:`ServeSettings` fields
    (``replicas``, ``max_resident``, ``max_batch``, ``max_wait_s``, ``num_cpus``, ``limits`` …)."""
    from moerge.runtime import ensure_ray

    settings = build_settings(
        model_or_config,
        registry=registry,
        router=router,
        router_config=router_config,
        composition=composition,
        data=data,
        **options,
    )
    if not is_loopback(host) and not settings.api_key:
        raise ValueError(
            f"host {host!r} exposes the server beyond this machine: give api_key= (clients send 'Authorization: Bearer KEY')"
        )
    ensure_ray(ray_cpus)
    if settings.share_registry and settings.registry_service is None:
        from moerge.registry import Registry
        from moerge.serving.remote import start_service

        base = settings.base or next(iter({r.base_model for r in Registry(settings.registry).list(kind="lora")} - {None}), None)
        settings.registry_service = start_service(settings.registry, base)
    handle = start_app(MoergeServer, settings, host=host, port=port, name=name, ingress_cpus=ingress_cpus)
    return Deployment(name=name, url=f"http://{host}:{port}", handle=handle, settings=settings)


def start_app(
    ingress: Any, settings: Any, *, host: str, port: int, name: str, ingress_cpus: float, route_prefix: str = "/"
) -> Any:
    """Run ``ingress`` (a Serve deployment taking ``settings``) on Ray Serve: workers' CPUs
    default to the cluster's, less the ingress, shared by ``settings.replicas`` (≤ 1 each)."""
    if settings.num_cpus is None:
        import ray

        total = float(ray.cluster_resources().get("CPU", 1.0))
        settings.num_cpus = round(min(1.0, max(0.05, (total - ingress_cpus) / settings.replicas)), 2)
    # Serve's access log would print a line per request on the console (log_to_driver); errors still do
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    app = ingress.options(ray_actor_options={"num_cpus": ingress_cpus}).bind(settings)
    return serve.run(app, name=name, route_prefix=route_prefix, logging_config=quiet)
