"""The methods ``moerge eval`` compares, each with its declared hyper-parameter grid (chosen on
the validation split) and what it is prepared from."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moerge.hints import did_you_mean

Family = Literal["base", "experts", "oracle", "router", "merge", "twin", "lorahub", "adamerging", "symbolic"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Family
    label: str
    notes: str
    #: hyper-parameter → the values tried on validation (the first wins ties)
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    #: settings passed as they are
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: router settings read at routing time: grid points that differ only in these share one build
    live: frozenset[str] = frozenset()
    #: prepared from the experts' training examples (their tasks' train splits)
    uses_data: bool = False
    #: the router or merge method it runs (default: ``name``): a variant of a method is a
    #: spec of its own, e.g. ``MethodSpec("glider-presets", "router", ..., router="glider")``
    router: str = ""
    #: in the default set (``moerge eval`` without ``--methods``): the methods of the papers'
    #: tables; mergekit's other merges are run by name
    default: bool = True

    @property
    def runs(self) -> str:
        return self.router or self.name

    def points(self, overrides: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """Every grid point (the product of the grid, ``overrides`` replacing whole axes)."""
        grid = {**self.grid, **(overrides or {})}
        keys = list(grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


_TOKEN_LIVE = frozenset({"top_k", "alpha", "temperature"})

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("base", "base", "base", "the base model alone"),
        MethodSpec("experts", "experts", "expert:{name}", "one expert on every task"),
        MethodSpec("oracle", "oracle", "oracle", "own expert per held-in task; best single expert per held-out task (hindsight)"),
        MethodSpec(
            "phatgoose",
            "router",
            "PHATGOOSE",
            "top-k per token and module; gates trained on each expert's train split",
            grid={"top_k": (2,)},
            live=_TOKEN_LIVE,
            uses_data=True,
        ),
        MethodSpec(
            "glider",
            "router",
            "GLIDER",
            "PHATGOOSE + α·cos(prompt, expert description)",
            grid={"alpha": (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0), "top_k": (2,)},
            fixed={"expert_text": "description"},
            live=_TOKEN_LIVE,
            uses_data=True,
        ),
        MethodSpec(
            "arrow", "router", "Arrow", "prototype = top right singular vector of ΔW", grid={"top_k": (2,)}, live=_TOKEN_LIVE
        ),
        MethodSpec("retrieval", "router", "retrieval", "top-1 expert of the nearest training prompt (MiniLM)", uses_data=True),
        MethodSpec("average", "merge", "uniform average", "mean of the experts' ΔW"),
        MethodSpec("task_arithmetic", "merge", "task arithmetic", "λ·Σ ΔW", grid={"lambda": (0.3, 0.5, 1.0)}),
        MethodSpec(
            "ties", "merge", "TIES", "trim, elect sign, disjoint mean", grid={"density": (0.2, 0.5), "lambda": (0.5, 1.0)}
        ),
        MethodSpec(
            "dare_ties",
            "merge",
            "DARE-TIES",
            "drop-and-rescale, then TIES",
            grid={"density": (0.3, 0.5), "lambda": (0.5, 1.0)},
            fixed={"seed": 0},
        ),
        # mergekit's other merges over task vectors (LoRA experts merge in ΔW space); run by name
        MethodSpec(
            "breadcrumbs",
            "merge",
            "breadcrumbs",
            "drop each ΔW's largest (γ) and smallest entries, then λ·Σ",
            grid={"density": (0.5, 0.9), "lambda": (0.5, 1.0)},
            fixed={"gamma": 0.01},
            default=False,
        ),
        MethodSpec(
            "breadcrumbs_ties",
            "merge",
            "breadcrumbs-TIES",
            "breadcrumbs' sparsifier, then TIES' sign election",
            grid={"density": (0.5, 0.9), "lambda": (0.5, 1.0)},
            fixed={"gamma": 0.01},
            default=False,
        ),
        MethodSpec(
            "della",
            "merge",
            "DELLA",
            "drop by magnitude rank (density ± ε), rescale, then TIES",
            grid={"density": (0.3, 0.5), "lambda": (0.5, 1.0)},
            fixed={"epsilon": 0.1, "seed": 0},
            default=False,
        ),
        MethodSpec(
            "sce",
            "merge",
            "SCE",
            "keep the entries varying most across experts, elect signs, weigh by mean square",
            grid={"select_topk": (0.1, 0.5, 1.0)},
            default=False,
        ),
        MethodSpec(
            "model_stock",
            "merge",
            "Model Stock",
            "θ₀ + t·mean(ΔW), t from the experts' mean pairwise cosine",
            grid={"filter_wise": (False, True)},
            default=False,
        ),
        MethodSpec(
            "multislerp",
            "merge",
            "Multi-SLERP",
            "the experts' ΔW averaged on the sphere (tangent-space mean), scaled by their mean norm",
            default=False,
        ),
        MethodSpec(
            "twin",
            "twin",
            "Twin-Merging",
            "TA shared expert + SVD twin vectors + MLP router, exact per-input merge",
            grid={"rank": (None, 16, 32), "lambda": (0.3, 0.5)},
            uses_data=True,
        ),
        # learned composition weights: one LoRA per task, its weights searched on that task's first
        # validation examples (never its test split); run by name
        MethodSpec(
            "lorahub",
            "lorahub",
            "LoRAHub",
            "one weight per LoRA, searched (NGOpt, L1) on each task's first validation examples; factors combined",
            fixed={"shots": 5, "budget": 40, "l1": 0.05, "bound": 1.5, "seed": 42},
            default=False,
        ),
        # learned merging coefficients: one merge for every task, its λ learnt by entropy minimisation on every
        # task's unlabeled validation prompts (never a test prompt); run by name
        MethodSpec(
            "adamerging",
            "adamerging",
            "AdaMerging",
            "λ per expert and module (prior 0.3, clamped to [0, 1]) minimising the next-token entropy (Adam) on every "
            "task's unlabeled validation prompts",
            fixed={"granularity": "layer", "steps": 500, "seed": 0},
            default=False,
        ),
        # whole-model experts (kind "model"): evaluated apart from the LoRA methods
        # one run for all three rows; its settings (one value each, nothing chosen from a grid): the draws' seed, the
        # models recruited per query, and the aggregator (None: chosen on validation, spec §3.5; or a registered model)
        MethodSpec(
            "symbolic_moe",
            "symbolic",
            "Symbolic-MoE",
            "recruit k models per query from validation profiles, aggregate",
            fixed={"seed": 0, "k": 3, "aggregator": None},
        ),  # fmt: skip
        MethodSpec("majority_vote", "symbolic", "majority vote of the recruited", "Symbolic-MoE's recruits, majority answer"),
        MethodSpec("best_single", "symbolic", "best single model", "the model with the best validation accuracy"),
    )
}

#: what ``moerge eval`` runs by default: every method over LoRA experts
DEFAULT_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.family != "symbolic" and m.default)


def resolve_methods(names: Iterable[str | MethodSpec] | str | None) -> dict[str, MethodSpec]:
    """Methods by name, in table order: names of :data:`METHODS` (checked, did-you-mean on a
    typo) or :class:`MethodSpec` instances of your own (a variant's settings and grid)."""
    if names is None:
        return {n: METHODS[n] for n in DEFAULT_METHODS}
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: dict[str, MethodSpec] = {}
    for n in names:
        if isinstance(n, MethodSpec):
            out[n.name] = n
            continue
        if n not in METHODS:
            raise ValueError(f"unknown method {n!r}{did_you_mean(n, METHODS)}; known: {', '.join(METHODS)}")
        out.setdefault(n, METHODS[n])
    if not out:
        raise ValueError("no method to evaluate")
    return out


def parse_value(text: str) -> Any:
    """A grid value from the command line: none/null → None, true/false, int, float, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_grid_overrides(
    items: Iterable[str] | Mapping[str, Sequence[Any]] | None, specs: Mapping[str, MethodSpec] = METHODS
) -> dict[str, dict[str, tuple[Any, ...]]]:
    """``method.param=v1,v2`` (CLI) or ``{"method.param": [v1, v2]}`` → method → param → values,
    each method and parameter checked against the declared grids and fixed settings."""
    if not items:
        return {}
    pairs: list[tuple[str, Sequence[Any]]] = []
    if isinstance(items, Mapping):
        pairs = [(k, v if isinstance(v, (list, tuple)) else [v]) for k, v in items.items()]
    else:
        for item in items:
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ValueError(f"--set {item!r} must be METHOD.PARAM=V1[,V2…], e.g. glider.alpha=1,10,100")
            pairs.append((key, [parse_value(v) for v in values.split(",")]))
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    for key, values in pairs:
        method, dot, param = key.strip().partition(".")
        if not dot:
            raise ValueError(f"grid setting {key!r} must name METHOD.PARAM (e.g. glider.alpha)")
        if method not in specs:
            raise ValueError(f"unknown method {method!r} in {key!r}{did_you_mean(method, specs)}")
        spec = specs[method]
        known = [*spec.grid, *spec.fixed, *router_settings(spec)]
        if param not in known:
            hint = did_you_mean(param, known)
            settings = router_settings(spec)
            raise ValueError(
                f"{method} has no hyper-parameter {param!r}{hint}; its grid: "
                f"{', '.join(k for k in known if k not in settings) or 'none (nothing to choose)'}"
                + (f"; its settings: {', '.join(settings)}" if settings else "")
            )
        if not values:
            raise ValueError(f"grid setting {key!r} has no value")
        out.setdefault(method, {})[param] = tuple(values)
    return out


def router_settings(spec: MethodSpec) -> list[str]:
    """A router's own settings, which a grid override may also fix (one value) or vary:
    ``phatgoose.steps=30`` fits PHATGOOSE's gate training into a CPU budget, and the table shows the
    value beside the method as it shows a chosen one. Merges take only their declared grid."""
    if spec.family not in ("router", "twin"):
        return []
    from moerge.routers import get_router

    try:
        return [f for f in get_router(spec.runs).config_cls.model_fields if f not in spec.grid and f not in spec.fixed]
    except KeyError:  # a method named after no registered router
        return []


def call_params(spec: MethodSpec, point: Mapping[str, Any]) -> dict[str, Any]:
    """A grid point as the keywords of ``compose``/``merge`` (Twin-Merging's λ is its shared merge's)."""
    params = {**spec.fixed, **point}
    if spec.family == "twin":
        lam = params.pop("lambda", None)
        if lam is not None:
            params["shared_params"] = {"lambda": lam}
    return params


def shown(point: Mapping[str, Any]) -> str:
    """A chosen grid point as the table shows it."""
    parts = []
    for k, v in point.items():
        if k == "seed":
            continue
        if k == "rank" and v is None:
            v = "10 % of min(d)"
        parts.append(f"{'α' if k == 'alpha' else 'λ' if k == 'lambda' else k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)
