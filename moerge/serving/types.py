"""What flows through serving: a request (a prompt, the experts or composition that serve it,
generation parameters), its result, and the limits a server enforces on input."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: the expert name that means "the base model alone" (PEFT's convention)
BASE = "__base__"


class ServingError(Exception):
    """An error a client caused or must know about; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError, ValueError):
    status = 400


class UnknownExpert(ServingError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class Unavailable(ServingError):
    """A worker died twice while holding a request (it was retried once)."""

    status = 503


@dataclass(frozen=True)
class Limits:
    """What a server accepts; requests outside get a 400 naming the limit."""

    max_new_tokens: int = 512
    max_prompt_chars: int = 8_000
    max_prompt_tokens: int = 1_024
    max_prompts: int = 64
    #: an expert's weight in a request (weights scale LoRA terms: a huge one overflows the batch)
    max_expert_weight: float = 100.0
    #: request bodies beyond this get 413 before they are parsed
    max_body_bytes: int = 1_000_000


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 32
    #: 0 = greedy decoding
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one ``generate`` call (max_new_tokens may differ:
        the batch runs to the largest and each row is cut at its own)."""
        if self.temperature <= 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)

    def check(self, limits: Limits) -> None:
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise BadRequest(f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise BadRequest(f"temperature must be between 0 and 10, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise BadRequest(f"seed must be an integer in [0, 2**63), got {self.seed}")


@dataclass
class ServeRequest:
    """One prompt and who serves it: ``experts`` (name, weight) pairs — one for an explicit
    expert, several for a sequence router's top-k, none for the base model — or a whole
    ``composition`` (token-routed compositions run on one replica with all their experts)."""

    prompt: str
    experts: tuple[tuple[str, float], ...] = ()
    composition: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    arrived: float = field(default_factory=time.monotonic)
    #: what a sequence router reads when it chooses the experts (a chat request's last user
    #: message, not the whole rendered conversation); None: the prompt
    query: str | None = None

    @property
    def expert_names(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.experts)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can run in one forward/generate."""
        return (self.composition, self.params.key())

    def check(self, limits: Limits) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        if len(self.prompt) > limits.max_prompt_chars:
            raise BadRequest(f"prompt has {len(self.prompt)} characters; the limit is {limits.max_prompt_chars}")
        if self.composition is not None and self.experts:
            raise BadRequest("a request names either experts or a composition, not both")
        names = [n for n, _ in self.experts]
        if len(set(names)) != len(names):
            raise BadRequest(f"experts listed twice: {names}")
        for n, w in self.experts:
            if not isinstance(n, str) or not n.strip():
                raise BadRequest(f"an expert name must be a non-empty string, got {n!r}")
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise BadRequest(f"expert {n!r} has weight {w!r}; weights must be finite numbers")
            if not 0 < w <= limits.max_expert_weight:
                raise BadRequest(f"expert {n!r} has weight {w}; weights must be in (0, {limits.max_expert_weight:g}]")
        self.params.check(limits)


@dataclass
class ServeResult:
    """A request's answer, with who served it and how it was batched."""

    id: str
    text: str = ""
    experts: list[tuple[str, float]] = field(default_factory=list)
    composition: str | None = None
    worker: int = -1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    batch_size: int = 0
    distinct_experts: int = 0
    queue_s: float = 0.0
    retried: bool = False
    error: str | None = None
    status: int = 200

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["experts"] = [{"name": n, "weight": round(float(w), 6)} for n, w in self.experts]
        return out
