"""The router family: a name registry, typed JSON-round-tripping configs, the typed decision
(:class:`Routing`, whose granularity is explicit) and the per-expert preparation contract.

A router never reaches into a model. It hands the composer either sequence weights
([batch, experts]) or a token hook — a callable the multi-expert layer evaluates on its own
input in every forward (prefill and each decode step) — plus an optional per-example bias.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moerge.adapters.lora import LoraExpert
from moerge.hints import did_you_mean  # noqa: F401  (re-exported)
from moerge.training import TextPair

log = logging.getLogger(__name__)

Granularity = Literal["token", "sequence", "task"]
#: training/example data for experts: a mapping or a callable, expert name → examples
ExpertData = Mapping[str, Sequence[TextPair]] | Callable[[str], Sequence[TextPair]]


class RouterConfig(BaseModel):
    """Base of every router's config: typed, validated, and JSON round-tripping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: make a router available as ``compose(..., router=name)``."""

    def deco(cls: type[Router]) -> type[Router]:
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"a router named {name!r} is already registered ({ROUTERS[name].__qualname__})")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return deco


def get_router(name: str) -> type[Router]:
    """A router class by name, case-insensitively (``Arrow`` is ``arrow``)."""
    found = ROUTERS.get(name) or ROUTERS.get(str(name).lower())
    if found is None:
        raise KeyError(f"unknown router {name!r}{did_you_mean(str(name), sorted(ROUTERS))}; known routers: {sorted(ROUTERS)}")
    return found


def make_router(name: str | type[Router], config: RouterConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Router:
    """A router by name (or its class, already resolved), its config validated (a bad or unknown
    field is named in the error)."""
    cls = name if isinstance(name, type) else get_router(name)
    data = config.to_json() if isinstance(config, RouterConfig) else dict(config or {})
    data.update(overrides)
    known = sorted(cls.config_cls.model_fields)
    unknown = [k for k in data if k not in cls.config_cls.model_fields]
    if unknown:
        k = unknown[0]
        raise ValueError(f"unknown setting {k!r} for router {cls.name!r}{did_you_mean(k, known)}; its settings: {known}")
    try:
        cfg = cls.config_cls(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors())
        raise ValueError(f"invalid setting for router {cls.name!r}: {problems}") from None
    return cls(cfg)


@dataclass
class Recorder:
    """Collects what a token hook decided, per module and call, for ``explain``."""

    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, module: str, index: torch.Tensor, weight: torch.Tensor) -> None:
        # kept where they were computed (no read-back inside the forward); moved by the reader
        self.calls.append((module, index.detach(), weight.detach().float()))


@dataclass
class Routing:
    """A router's decision for one batch of inputs.

    ``granularity`` is ``sequence``/``task`` (``weights`` [batch, experts], the same in every
    module and token) or ``token`` (``hook`` computes top-k weights inside every module's
    forward; ``bias`` [batch, experts] is a per-example additive logit term, e.g. GLIDER's)."""

    granularity: Granularity
    experts: list[str]
    weights: torch.Tensor | None = None
    hook: Callable[..., Any] | None = None
    bias: torch.Tensor | None = None
    #: human-readable extras (e.g. the retrieved example, the global cosines)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity == "token":
            if self.hook is None:
                raise ValueError("a token-level routing needs a hook")
        elif self.weights is None or self.weights.dim() != 2 or self.weights.shape[1] != len(self.experts):
            raise ValueError(f"a {self.granularity}-level routing needs weights [batch, {len(self.experts)}]")

    def layer_weights(self) -> Any:
        """What every multi-expert layer reads: the hook or the weights."""
        return self.hook if self.granularity == "token" else self.weights


@dataclass
class PrepareContext:
    """What preparation may need: the registry, the base model and tokenizer (no experts
    attached), expert data, text functions, and whether to show progress."""

    registry: Any
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    data: ExpertData | None = None
    describer: Callable[[Any], str] | None = None
    progress: bool | None = None

    @property
    def device(self) -> torch.device:
        """Where preparation runs: the base model's device (the CPU without a model)."""
        from moerge.device import module_device

        return module_device(self.model) if self.model is not None else torch.device("cpu")

    def data_for(self, expert: str) -> Sequence[TextPair] | None:
        if self.data is None:
            return None
        if callable(self.data):
            return self.data(expert)
        return self.data.get(expert)


@dataclass
class PrepareReport:
    producer: str
    computed: list[str]
    cached: list[str]
    seconds: float = 0.0


@dataclass
class ArtifactSpec:
    """One per-expert artifact: its registry namespace, the config it depends on (hashed into
    its key) and how to compute it."""

    producer: str
    key: Callable[[Any, PrepareContext], dict[str, Any]]
    compute: Callable[[Any, PrepareContext], Any]


class Router(ABC):
    """One routing method. Subclasses set ``config_cls`` and ``granularity``, implement
    :meth:`prepare_one` (the per-expert artifact), :meth:`load` (build runtime state from the
    experts and their artifacts) and :meth:`route`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[RouterConfig]] = RouterConfig
    granularity: ClassVar[Granularity] = "token"

    def __init__(self, config: RouterConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.experts: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, experts={len(self.experts)})"

    # -------------------------------------------------------------- per-expert artifacts

    def artifact_specs(self) -> list[ArtifactSpec]:
        """The per-expert artifacts this router derives (none by default)."""
        return []

    def prepare(self, ctx: PrepareContext, experts: Sequence[Any]) -> list[PrepareReport]:
        """Compute and store the artifacts that are missing; experts already prepared with the
        same key are not touched (so adding one expert prepares that expert alone)."""
        reports = []
        records = [ctx.registry._resolve(ref) for ref in experts]
        for spec in self.artifact_specs():
            t0 = time.perf_counter()
            computed, cached = [], []
            for rec in records:
                key = spec.key(rec, ctx)
                if ctx.registry.get_artifact(rec, spec.producer, key) is not None:
                    cached.append(rec.ref)
                    continue
                log.info("%s: computing %s for %s", self.name, spec.producer, rec.ref)
                ctx.registry.put_artifact(rec, spec.producer, key, spec.compute(rec, ctx))
                computed.append(rec.ref)
            reports.append(PrepareReport(spec.producer, computed, cached, time.perf_counter() - t0))
        return reports

    def artifact(self, producer: str, record: Any, ctx: PrepareContext) -> Any:
        spec = next((s for s in self.artifact_specs() if s.producer == producer), None)
        if spec is None:
            raise KeyError(f"router {self.name!r} has no artifact {producer!r}")
        data = ctx.registry.get_artifact(record, producer, spec.key(record, ctx))
        if data is None:
            raise RuntimeError(f"{self.name}: expert {record.ref} has no {producer!r} artifact for this config; prepare it first")
        return data

    # -------------------------------------------------------------------------- routing

    def install(
        self, model: torch.nn.Module, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext
    ) -> list[LoraExpert]:
        """The experts the multi-expert layer should hold (default: the experts' own LoRAs). A
        router may also change the base here — Twin-Merging folds its shared merge into it."""
        return list(loras)

    #: preparation done while loading (e.g. a router trained over all experts), for the composer's report
    load_reports: Sequence[PrepareReport] = ()

    @abstractmethod
    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        """Build the runtime state for these experts (in this order: column e = expert e)."""

    @abstractmethod
    def route(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        """The decision for a batch of input texts (``task``: an optional caller-given task
        description, one for all or one per input)."""
