"""Ray core: :class:`ExpertWorker` actors that keep experts resident and batch requests by
assigned expert, and the :class:`ExpertPool` that dispatches to them.

Each worker owns an :class:`~moerge.serving.engine.ExpertEngine` (the base model once, LRU
expert slots, any whole compositions) and a :class:`~moerge.serving.batching.BatchQueue`; a
background task drains up to ``max_batch`` compatible requests (or what arrived within
``max_wait_s``) and runs them as one ``generate`` in a thread, so the actor keeps accepting
requests meanwhile.

The pool groups requests by what must be resident to serve them, places each group with
:class:`~moerge.serving.batching.Placement` (affinity, hot-expert replication,
least-outstanding), and returns results in request order. A worker that dies is re-created by
Ray however often it dies (``max_restarts=-1``); the requests it held are retried once on
another worker (or the same one, restarted), and answered with a 503-style error if that fails
too — none is lost. :meth:`ExpertPool.ahealth` pings every worker (ok / unresponsive / down).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moerge.hints import did_you_mean
from moerge.registry import Registry
from moerge.serving.batching import BatchQueue, Placement, group_requests
from moerge.serving.types import BASE, BadRequest, Limits, ServeRequest, ServeResult, ServingError, Unavailable, UnknownExpert

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """What every worker loads and how it batches."""

    registry: str
    base: str | None = None
    max_resident: int = 8
    max_batch: int = 16
    max_wait_s: float = 0.01
    preload: tuple[str, ...] = ()
    #: name → composition spec (dict), run whole on every worker
    compositions: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: Limits = Limits()
    #: torch threads per worker (Ray sets 1 for fractional CPUs)
    threads: int | None = None
    #: where each worker runs ("auto": the GPU Ray gave it, else the CPU) and in what precision
    device: str = "auto"
    dtype: str = "auto"
    #: GPUs each worker asks Ray for; fractions let several workers share one card
    gpus: float = 0.0
    #: decode with a static KV cache and torch.compile (CUDA graphs on a GPU)
    compile: bool = False
    #: a :class:`~moerge.serving.remote.RegistryService` handle: a worker on a node that does
    #: not see ``registry`` mirrors it (and a base folder) through Ray instead
    registry_service: Any = None

    def __post_init__(self) -> None:
        from moerge.device import resolve_dtype

        if self.gpus < 0:
            raise ValueError(f"gpus per worker must be ≥ 0, got {self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus per worker above 1 must be a whole number (Ray's rule), got {self.gpus}")
        resolve_dtype(self.dtype)  # a bad name fails here, in the driver, not in every worker
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"unknown device {self.device!r}; use 'auto', 'cpu', 'cuda' or 'mps'")


def in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or not inside a task
        return False


def actor_logging() -> None:
    """Inside a Ray actor: moerge's warnings and errors go to the actor's stderr, which Ray
    forwards to the console of the process that started Ray (``log_to_driver``), so a failed
    batch is seen where the server runs. Info stays quiet; in-process use is untouched."""
    if not in_ray_actor():
        return
    logger = logging.getLogger("moerge")
    if any(getattr(h, "moerge_actor", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.moerge_actor = True  # type: ignore[attr-defined]
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)


#: restart back-off: a worker re-created after its n-th death waits min(CAP, BASE·2^(n-1)) s first
RESTART_BACKOFF_BASE_S = 0.25
RESTART_BACKOFF_CAP_S = 30.0


def _restart_counter() -> Path:
    """This actor's count of deaths in a row, kept on its node (a restart is a new process)."""
    import tempfile

    import ray

    return Path(tempfile.gettempdir()) / f"moerge-restarts-{ray.get_runtime_context().get_actor_id()}"


def restart_backoff() -> int:
    """In a Ray actor that Ray re-created: count the restart (a file per actor in the node's
    temp folder), wait the back-off, and return how many restarts this actor has had. A worker
    that serves a batch resets the count, so only a crash loop waits longer and longer."""
    if not in_ray_actor():
        return 0
    import ray

    counter = _restart_counter()
    if not ray.get_runtime_context().was_current_actor_reconstructed:
        counter.unlink(missing_ok=True)
        return 0
    try:
        n = int(counter.read_text()) + 1
    except (OSError, ValueError):
        n = 1
    counter.write_text(str(n))
    wait = min(RESTART_BACKOFF_CAP_S, RESTART_BACKOFF_BASE_S * 2 ** (n - 1))
    log.warning("worker re-created after a death (restart %d in a row): waiting %.2f s first", n, wait)
    time.sleep(wait)
    return n


class ExpertWorker:
    """One worker: an engine plus its batching queue. Wrapped as a Ray actor by
    :func:`spawn_workers`; usable in-process too (``await worker.submit([...])``)."""

    def __init__(self, config: WorkerConfig, index: int = 0) -> None:
        from moerge.serving.engine import ExpertEngine

        actor_logging()
        #: deaths in a row before this incarnation (0 for a first start)
        self.restarts = restart_backoff()
        from moerge.serving.remote import local_paths, refresh

        self.config, self.index = config, index
        registry, base, _ = local_paths(config.registry, config.base, config.registry_service)
        self.engine = ExpertEngine(
            registry,
            base=base,
            refresh=(lambda: refresh(config.registry_service)) if registry != config.registry else None,
            max_resident=config.max_resident,
            preload=config.preload,
            compositions=config.compositions,
            limits=config.limits,
            threads=config.threads,
            device=config.device,
            dtype=config.dtype,
            compile=config.compile,
        )
        self.queue: BatchQueue | None = None
        self._loop: asyncio.Task | None = None
        self.started = time.time()

    def _ensure_loop(self) -> BatchQueue:
        if self.queue is None:
            self.queue = BatchQueue(self.config.max_batch, self.config.max_wait_s, self.config.max_resident)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._drain())
        return self.queue

    async def submit(self, requests: Sequence[ServeRequest]) -> tuple[list[ServeResult], list[str]]:
        """Queue ``requests``; returns their results (in order) and the resident experts after."""
        queue = self._ensure_loop()
        now = time.monotonic()
        futures = [queue.put(replace(r, arrived=now)) for r in requests]
        results = await asyncio.gather(*futures)
        return list(results), [ref.partition("@")[0] for ref in self.engine.resident]

    async def stream(self, request: ServeRequest) -> AsyncIterator[str | ServeResult]:
        """Queue one request and yield its text as its batch decodes, then its
        :class:`ServeResult`. As a Ray actor method: ``.options(num_returns="streaming")``."""
        queue = self._ensure_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        future = queue.put(replace(request, arrived=time.monotonic()), chunks)
        while True:
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not chunks.empty():  # pieces queued before the result was set
                yield chunks.get_nowait()
            yield future.result()
            return

    async def _drain(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.queue.next_batch()
            start = time.monotonic()
            reqs = [item.request for item in batch]
            sinks = {
                i: (lambda text, q=item.chunks: loop.call_soon_threadsafe(q.put_nowait, text))
                for i, item in enumerate(batch)
                if item.chunks is not None
            }
            try:
                results = await asyncio.to_thread(self.engine.run, reqs, sinks or None)
                if self.restarts:  # serving again: a later death starts the back-off afresh
                    self._reset_restarts()
            except Exception as exc:  # keep serving: this batch fails, the next runs
                log.exception("worker %d: batch of %d failed", self.index, len(reqs))
                results = [ServeResult(id=r.id, error=f"internal error: {type(exc).__name__}: {exc}", status=500) for r in reqs]
            for item, res in zip(batch, results, strict=True):
                res.worker = self.index
                res.queue_s = start - item.request.arrived
                if not item.future.done():
                    item.future.set_result(res)

    async def usage(self, composition: str, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        return await asyncio.to_thread(self.engine.usage, composition, list(prompts))

    def render_chat(
        self, conversations: Sequence[Sequence[Mapping[str, Any]]], template: str | None = None
    ) -> tuple[list[str], str | None]:
        """Each conversation (OpenAI-style ``{"role", "content"}`` messages) as the prompt the base
        expects: its tokenizer's chat template (or ``template``, a Jinja string), generation prompt
        added. Returns (prompts, None), or ([], why) for a client's error (no template, or one that
        refuses these messages), which the ingress answers 400."""
        try:
            return render_conversations(self.engine.tokenizer, conversations, template), None
        except BadRequest as exc:
            return [], exc.message

    def _reset_restarts(self) -> None:
        _restart_counter().unlink(missing_ok=True)
        self.restarts = 0

    def info(self) -> dict[str, Any]:
        node = None
        if in_ray_actor():
            import ray

            node = ray.get_runtime_context().get_node_id()
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "node_id": node,
            "restarts_in_a_row": self.restarts,
            "queued": len(self.queue) if self.queue is not None else 0,
            "uptime_s": round(time.time() - self.started, 1),
            **self.engine.info(),
        }

    def ping(self) -> int:
        return os.getpid()


def render_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], template: str | None = None
) -> list[str]:
    """Conversations rendered with ``template`` or else ``tokenizer``'s chat template (generation
    prompt added); a :class:`BadRequest` naming the way out when there is neither or it fails."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadRequest(
            "the base model's tokenizer has no chat template: send the rendered prompt to /v1/completions, "
            "or start the server with a template (moerge serve --chat-template FILE)"
        )
    out = []
    for messages in conversations:
        try:
            out.append(
                tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False, add_generation_prompt=True)
            )
        except Exception as exc:  # a Jinja error, or the template's own raise_exception (e.g. roles out of order)
            raise BadRequest(f"the chat template cannot render these messages: {type(exc).__name__}: {exc}") from None
    return out


def spawn_workers(
    config: WorkerConfig, replicas: int, num_cpus: float = 1.0, max_restarts: int = -1, name_prefix: str | None = None
) -> list[Any]:
    """``replicas`` ExpertWorker actors, supervised: Ray re-creates a dead one however often it
    dies (``max_restarts=-1``; each restart reloads the base, which paces a crash loop); the
    pool, not Ray, retries the requests it held."""
    import ray

    actor = ray.remote(ExpertWorker)
    if config.threads is None:  # torch threads from the worker's CPU share (a fraction gets one)
        config = dataclasses.replace(config, threads=max(1, int(num_cpus)))
    out = []
    for i in range(replicas):
        opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": 0}
        if config.gpus:
            opts["num_gpus"] = config.gpus
        if name_prefix:
            opts["name"] = f"{name_prefix}-{i}"
        out.append(actor.options(**opts).remote(config, i))
    return out


def composition_spec(
    registry: str,
    router: str,
    config: Mapping[str, Any] | None = None,
    data: Any = None,
    device: str = "auto",
    base: str | None = None,
) -> dict[str, Any]:
    """Compose every LoRA expert of ``registry`` under ``router`` once, in this process, so its
    per-expert artifacts are computed and stored before workers start (they then only load
    them); returns the composition's spec."""
    from moerge.composer import compose

    reg = Registry(registry)
    comp = compose(base, experts=reg, router=router, config=dict(config or {}), data=data, device=device)
    spec = comp.spec.model_dump(mode="json")
    del comp
    return spec


class ExpertPool:
    """The dispatcher over ``replicas`` :class:`ExpertWorker` actors.

    A request names its experts (or a composition); a request naming neither is routed: by
    ``router`` when it is a sequence-level router (its top choices become the request's
    experts, batched in the workers' slots), else by ``default_composition`` (token-routed
    compositions run whole on each worker). ``router_data`` (expert name → example inputs)
    feeds the router's preparation, e.g. retrieval's example bank; by default the experts'
    registered examples."""

    def __init__(
        self,
        config: WorkerConfig,
        replicas: int = 2,
        router: str | None = None,
        router_config: Mapping[str, Any] | None = None,
        default_composition: str | None = None,
        num_cpus: float = 1.0,
        replicate_at: int | None = None,
        max_restarts: int = -1,
        workers: Sequence[Any] | None = None,
        router_data: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        from moerge.runtime import ensure_ray
        from moerge.serving.remote import local_paths

        self.config = config
        if workers is None or config.registry_service is not None:
            ensure_ray()  # before the registry: a mirror is fetched through Ray
        self.registry = Registry(local_paths(config.registry, config.base, config.registry_service)[0])
        self.router = self._sequence_router(router, router_config, router_data) if router else None
        self.router_name = router
        if default_composition is not None and default_composition not in config.compositions:
            raise ValueError(f"default composition {default_composition!r} is not among {sorted(config.compositions)}")
        self.default_composition = default_composition
        if workers is None:
            workers = spawn_workers(config, replicas, num_cpus=num_cpus, max_restarts=max_restarts)
        self.workers = list(workers)
        self.placement = Placement(len(self.workers), config.max_resident, replicate_at or config.max_batch)
        self.retries = 0
        self.failures = 0

    def _sequence_router(self, name: str, config: Mapping[str, Any] | None, data: Mapping[str, Sequence[Any]] | None) -> Any:
        from moerge.routers import PrepareContext, Router, make_router

        rtr = make_router(name, dict(config or {}))
        if rtr.granularity == "token" or type(rtr).install is not Router.install:
            raise ValueError(f"router {name!r} routes tokens or changes the base model; serve it as a composition")
        records = self.registry.select(kind="lora").records
        ctx = PrepareContext(registry=self.registry, data=data)
        rtr.prepare(ctx, records)
        rtr.load(records, [], ctx)
        return rtr

    # ---------------------------------------------------------------------------- lifecycle

    def ready(self, timeout_s: float = 120.0) -> list[int]:
        """Wait until every worker has loaded (raises the first start-up error)."""
        import ray

        return ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)

    async def ahealth(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Each worker's state: ``ok`` (answered a ping within ``timeout_s``), ``unresponsive``
        (no answer: frozen, or busy past it) or ``down`` (dead or restarting)."""
        from ray.exceptions import RayActorError

        async def one(i: int) -> dict[str, Any]:
            start = time.monotonic()
            try:
                pid = await asyncio.wait_for(self.workers[i].ping.remote(), timeout=timeout_s)
                return {"worker": i, "state": "ok", "pid": pid, "ping_ms": round(1000 * (time.monotonic() - start), 1)}
            except asyncio.TimeoutError:
                return {"worker": i, "state": "unresponsive", "detail": f"no answer within {timeout_s:g} s"}
            except RayActorError as exc:
                return {"worker": i, "state": "down", "detail": str(exc).splitlines()[0][:200]}

        return list(await asyncio.gather(*(one(i) for i in range(len(self.workers)))))

    async def await_alive(self, worker: int, timeout_s: float = 120.0) -> int:
        """Wait until ``worker`` answers (a restarting actor refuses calls until it is back)."""
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self.workers[worker].ping.remote()
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []

    # ------------------------------------------------------------------------------ routing

    def resolve(self, requests: Sequence[ServeRequest]) -> list[ServeRequest]:
        """Requests with their experts filled in: named ones checked against the registry
        (unknown names fail fast), unnamed ones routed."""
        out: list[ServeRequest] = []
        unrouted = [i for i, r in enumerate(requests) if not r.experts and r.composition is None]
        decided = self.decide([requests[i].prompt for i in unrouted]) if unrouted else []
        routed = dict(zip(unrouted, decided, strict=True))
        for i, r in enumerate(requests):
            if i in routed:
                experts, comp = routed[i]
                r = replace(r, experts=experts, composition=comp)
            for n, _ in r.experts:
                if n != BASE and n.partition("@")[0] not in self.registry:
                    known = self.registry.names()
                    raise UnknownExpert(f"unknown expert {n!r}{did_you_mean(n, known)}; the registry has {known[:20]}")
            if r.composition is not None and r.composition not in self.config.compositions:
                raise UnknownExpert(
                    f"unknown model {r.composition!r}: neither an expert nor one of the compositions {sorted(self.config.compositions)}"
                )
            out.append(r)
        return out

    def decide(self, prompts: Sequence[str]) -> list[tuple[tuple[tuple[str, float], ...], str | None]]:
        """For unnamed requests: (experts with weights, composition) per prompt."""
        if self.router is not None:
            routing = self.router.route(list(prompts))
            names = routing.experts
            return [(tuple((names[e], float(row[e])) for e in row.nonzero().flatten().tolist()), None) for row in routing.weights]
        if self.default_composition is not None:
            return [((), self.default_composition)] * len(prompts)
        raise BadRequest("the request names no expert and this server has no router or composition; name an expert")

    async def route(self, prompts: Sequence[str], composition: str | None = None) -> list[dict[str, Any]]:
        """The routing decision only: sequence routers decide here; a composition's token
        routing is measured on a worker over one prefill (each expert's share of the weight)."""
        comp = composition or (None if self.router is not None else self.default_composition)
        if comp is None:
            decided = self.decide(prompts)
            return [{"experts": list(e), "granularity": "sequence", "router": self.router_name} for e, _ in decided]
        if comp not in self.config.compositions:
            raise UnknownExpert(f"unknown composition {comp!r}; this server has {sorted(self.config.compositions)}")
        w = self.placement.choose(())
        usage = await self.workers[w].usage.remote(comp, list(prompts))
        router = self.config.compositions[comp].get("router")
        return [{"experts": u, "granularity": "token-share", "composition": comp, "router": router} for u in usage]

    async def arender_chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]], template: str | None = None) -> list[str]:
        """Conversations rendered by a worker, with the tokenizer it loaded with the base (so a
        cluster node without the registry renders as the workers do); a dead worker is skipped."""
        from ray.exceptions import RayActorError

        tried: list[int] = []
        while True:
            w = self.placement.choose((), exclude=tried)
            try:
                prompts, error = await self.workers[w].render_chat.remote(list(map(list, conversations)), template)
            except RayActorError:
                tried.append(w)
                if len(tried) < len(self.workers):
                    continue
                raise Unavailable("no worker can render the chat template now (every worker died); retry") from None
            if error is not None:
                raise BadRequest(error)
            return prompts

    # ---------------------------------------------------------------------------- serving

    async def agenerate(self, requests: Sequence[ServeRequest]) -> list[ServeResult]:
        """Serve ``requests``; results come back in request order, each naming its experts."""
        try:
            reqs = self.resolve(requests)
        except ServingError as exc:
            return [ServeResult(id=r.id, error=exc.message, status=exc.status) for r in requests]
        results: list[ServeResult | None] = [None] * len(reqs)
        groups = group_requests(reqs, max_group=self.config.max_batch)

        async def run(key: Any, idx: list[int]) -> None:
            experts = key[1] - {BASE}
            out = await self._call([reqs[i] for i in idx], experts)
            for i, res in zip(idx, out, strict=True):
                results[i] = res

        await asyncio.gather(*(run(key, idx) for key, idx in groups))
        return [r for r in results if r is not None]

    async def astream(self, request: ServeRequest) -> AsyncIterator[str | ServeResult]:
        """Serve one request, yielding its text as it decodes and then its :class:`ServeResult`
        (which carries any error). Streams are not retried on a worker's death: the client
        already holds part of the answer; it gets a 503 result instead."""
        from ray.exceptions import RayActorError

        try:
            [req] = self.resolve([request])
        except ServingError as exc:
            yield ServeResult(id=request.id, error=exc.message, status=exc.status)
            return
        experts = req.expert_names - {BASE}
        w = self.placement.choose(experts)
        self.placement.assign(w, experts, 1)
        died = False
        try:
            async for ref in self.workers[w].stream.options(num_returns="streaming").remote(req):
                yield await ref
        except RayActorError as exc:
            died = True
            self.placement.failed(w, 1)
            self.failures += 1
            log.warning("worker %d died while streaming a request: %s", w, exc)
            yield ServeResult(id=req.id, error=f"worker {w} died while streaming this request", status=503)
        finally:  # also when the client stops reading (a stop sequence, a disconnect)
            if not died:
                self.placement.done(w, 1)

    def generate(self, requests: Sequence[ServeRequest]) -> list[ServeResult]:
        """Blocking :meth:`agenerate` (from a driver script, not from inside an event loop)."""
        return asyncio.run(self.agenerate(requests))

    async def _call(self, group: list[ServeRequest], experts: frozenset[str]) -> list[ServeResult]:
        from ray.exceptions import RayActorError

        tried: list[int] = []
        for attempt in range(2):
            w = self.placement.choose(experts, exclude=tried if len(tried) < len(self.workers) else ())
            self.placement.assign(w, experts, len(group))
            try:
                if w in tried:  # the only choice is the worker that died: wait for Ray to restart it
                    await self.await_alive(w)
                results, resident = await self.workers[w].submit.remote(group)
            except RayActorError as exc:
                self.placement.failed(w, len(group))
                tried.append(w)
                if attempt == 0:
                    self.retries += 1
                    log.warning("worker %d died with %d requests; retrying them once: %s", w, len(group), exc)
                    continue
                self.failures += len(group)
                msg = f"worker {w} died while serving this request, and again on retry"
                return [ServeResult(id=r.id, error=msg, status=503, retried=True) for r in group]
            self.placement.done(w, len(group), resident)
            for res in results:
                res.retried = attempt > 0
            return results
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------- status

    async def ainfo(self) -> dict[str, Any]:
        workers = []
        for w, handle in enumerate(self.workers):
            try:
                workers.append(await asyncio.wait_for(handle.info.remote(), timeout=10))
            except Exception as exc:  # a dead or restarting worker is reported, not raised
                workers.append({"worker": w, "error": f"{type(exc).__name__}: {exc}"})
        return {
            "workers": workers,
            "placement": self.placement.snapshot(),
            "retries": self.retries,
            "failed_requests": self.failures,
            "router": self.router_name,
            "compositions": sorted(self.config.compositions),
        }

    def experts(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "version": r.version,
                "kind": r.kind,
                "description": r.description,
                "skills": r.skills,
                "servable": r.kind == "lora",
            }
            for r in self.registry.list()
        ]
