"""Merge kernels: pure, typed functions over task tensors, registered by name.

Every kernel takes the experts' task tensors for one weight (τ_i = θ_i − θ_0, or a LoRA's
ΔW_i = s_i·B_i·A_i — never its factors separately), all of one shape, plus per-expert
``weights``, and returns the merged task tensor τ_m; the caller adds it to the base. Names and
parameters follow PEFT (``peft.utils.merge_utils``) and mergekit, so users recognise them:

=================  ====================================================================
``average``         Σ w_i τ_i / Σ w_i (weights default to 1: the uniform average)
``task_arithmetic`` λ · Σ w_i τ_i (Ilharco et al. 2023)
``magnitude_prune`` λ · Σ w_i · top-``density``-by-|·|(τ_i)
``ties``            trim each τ_i to its top ``density`` by magnitude, elect a sign per
                    parameter, disjoint mean of the agreeing entries (Yadav et al. 2023)
``dare_linear``     drop each entry with probability 1 − ``density`` and rescale the kept,
                    then task arithmetic (Yu et al. 2024); seeded
``dare_ties``       the same drop-and-rescale, then TIES' sign election and disjoint merge
``svd``             best rank-``rank`` approximation of Σ w_i τ_i (1-D tensors pass through)
=================  ====================================================================

Where PEFT and mergekit disagree, ``flavor`` picks whose semantics to follow (default PEFT):

* ``"peft"``: trim keeps ``int(density·n)`` entries; the sign is elected on the *unweighted*
  trimmed tensors; TIES divides by the number of agreeing experts; DARE rescales by 1/density.
* ``"mergekit"``: trim keeps ``max(1, int(density·n))`` entries; weights are applied *before*
  the sign election; ``normalize`` (TIES: on, DARE-TIES: off, as mergekit's defaults) divides by
  the sum of the agreeing experts' weights; DARE rescales the kept entries to the tensor's
  original L1 norm (mergekit's ``rescale``).

``lambda_`` (``lambda`` in configs and the CLI) scales the merged tensor, as mergekit's
``lambda`` and Twin-Merging's ``scaling``.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from moerge.hints import did_you_mean

if TYPE_CHECKING:
    from moerge.adapters.lora import LoraExpert, LoraFactors

Flavor = Literal["peft", "mergekit"]
SignMethod = Literal["total", "frequency", "sum", "count"]
#: mergekit's consensus names → PEFT's
_SIGN_ALIASES = {"sum": "total", "count": "frequency", "total": "total", "frequency": "frequency"}

TaskTensors = Sequence[torch.Tensor] | torch.Tensor
#: linear methods: a LoRA result can be re-factored from the experts' stacked factors directly
FACTOR_FORM = frozenset({"average", "task_arithmetic", "svd"})


@dataclass(frozen=True)
class MergeMethod:
    """A registered kernel and the parameters its signature accepts."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]
    required: tuple[str, ...]
    random: bool

    def __call__(self, task_tensors: TaskTensors, weights: Any = None, **params: Any) -> torch.Tensor:
        return self.fn(task_tensors, weights, **params)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn(task_tensors, weights=None, *, <params>) -> merged task tensor``.
    Its keyword-only parameters become the method's parameters (validated by :func:`merge_params`)."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in MERGE_METHODS:
            raise ValueError(f"a merge method named {name!r} is already registered")
        sig = inspect.signature(fn)
        kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        MERGE_METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            params=tuple(p.name for p in kw),
            required=tuple(p.name for p in kw if p.default is inspect.Parameter.empty),
            random="generator" in sig.parameters,
        )
        return fn

    return deco


def get_merge(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = sorted(MERGE_METHODS)
        raise KeyError(f"unknown merge method {name!r}{did_you_mean(name, known)}; known methods: {known}") from None


def merge_params(method: str, params: Mapping[str, Any], also: Sequence[str] = ()) -> dict[str, Any]:
    """Validate ``params`` for ``method``: unknown names and missing required ones are errors
    naming them. ``lambda`` is accepted for ``lambda_``; ``seed`` for methods that draw masks.
    ``also``: the caller's own option names, offered too when a name looks misspelt."""
    m = get_merge(method)
    out = {("lambda_" if k == "lambda" else k): v for k, v in params.items() if v is not None}
    allowed = set(m.params) | ({"seed"} if m.random else set())
    allowed.discard("generator")
    unknown = sorted(set(out) - allowed)
    if unknown:
        hints = "".join(did_you_mean(u, [*allowed, *also]).replace(" (did you mean", f" ({u}: did you mean") for u in unknown)
        raise ValueError(f"merge method {method!r} does not take {unknown}{hints}; it takes {sorted(allowed)}")
    missing = [p for p in m.required if p not in out and p != "generator"]
    if missing:
        raise ValueError(f"merge method {method!r} needs {missing}")
    if "density" in out:
        ds = [out["density"]] if isinstance(out["density"], int | float) else list(out["density"])
        if not all(isinstance(d, int | float) and 0.0 <= float(d) <= 1.0 for d in ds):
            raise ValueError(f"density must be in [0, 1] (one number, or one per expert), got {out['density']}")
    if "majority_sign_method" in out and out["majority_sign_method"] not in _SIGN_ALIASES:
        raise ValueError(f"majority_sign_method must be one of {sorted(_SIGN_ALIASES)}, got {out['majority_sign_method']!r}")
    if "flavor" in out and out["flavor"] not in ("peft", "mergekit"):
        raise ValueError(f"flavor must be 'peft' or 'mergekit', got {out['flavor']!r}")
    if "rank" in out and int(out["rank"]) < 1:
        raise ValueError(f"rank must be ≥ 1, got {out['rank']}")
    return out


def tensor_generator(seed: int, key: str = "") -> torch.Generator:
    """A generator seeded by ``seed`` and a tensor's name, so a streamed merge draws the same
    masks whatever order it visits the tensors in."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


# ---------------------------------------------------------------------------- helpers


def _stack(task_tensors: TaskTensors) -> torch.Tensor:
    if isinstance(task_tensors, torch.Tensor):
        return task_tensors
    tensors = list(task_tensors)
    if not tensors:
        raise ValueError("a merge needs at least one task tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"task tensors to merge must share one shape, got {sorted(shapes)}")
    return torch.stack(tensors)


def _weights(weights: Any, n: int, like: torch.Tensor) -> torch.Tensor:
    """Per-expert weights as a tensor broadcastable against the stacked [n, ...] tensors."""
    if weights is None:
        w = torch.ones(n, dtype=like.dtype, device=like.device)
    else:
        w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
        if w.numel() != n:
            raise ValueError(f"{w.numel()} merge weights for {n} experts")
    return w.view(n, *([1] * (like.dim() - 1)))


def magnitude_mask(tensor: torch.Tensor, density: float, flavor: Flavor = "peft") -> torch.Tensor:
    """1 where |tensor| is among its top ``int(density·n)`` entries. PEFT picks them with
    ``topk``; mergekit keeps ``max(1, ·)`` and picks with a descending ``argsort`` — replicated
    so that equal magnitudes at the threshold fall the same way as in each peer."""
    n = tensor.numel()
    k = int(density * n)
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    if flavor == "mergekit":
        k = max(1, k) if density > 0 else 0
        if k > 0:
            mask[torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]] = 1
    elif k > 0:
        mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask.view_as(tensor)


Density = float | Sequence[float]


def _densities(density: Density, n: int) -> list[float]:
    """One density per expert: a number for all, or a sequence in expert order (mergekit's
    per-model ``density``)."""
    if isinstance(density, int | float):
        return [float(density)] * n
    out = [float(d) for d in density]
    if len(out) != n:
        raise ValueError(f"{len(out)} densities for {n} experts")
    return out


def trim(stacked: torch.Tensor, density: Density, flavor: Flavor = "peft") -> torch.Tensor:
    """Keep each expert's top-``density`` entries by magnitude (row by row; ``density`` may
    be one per expert)."""
    ds = _densities(density, stacked.shape[0])
    if min(ds) >= 1:
        return stacked
    out = []
    for t, d in zip(stacked, ds, strict=True):
        if d >= 1:
            out.append(t)
        elif d <= 0 and flavor == "mergekit":
            out.append(torch.zeros_like(t))
        else:
            out.append(t * magnitude_mask(t, d, flavor))
    return torch.stack(out)


def drop_and_rescale(
    stacked: torch.Tensor, density: Density, generator: torch.Generator | None, flavor: Flavor = "peft"
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (one Bernoulli mask per expert, drawn
    in order from ``generator``), then rescale — by 1/density (PEFT, the DARE paper) or back to
    the tensor's L1 norm (mergekit). ``density`` may be one per expert."""
    ds = _densities(density, stacked.shape[0])
    if min(ds) >= 1:
        return stacked
    out = []
    for t, density in zip(stacked, ds, strict=True):
        if density >= 1:
            out.append(t)
            continue
        if generator is not None and generator.device != t.device:
            # drawn where the generator lives, so a seed gives the same mask on every device
            mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator).to(t.device)
        else:
            mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
        kept = t * mask
        if flavor == "peft":
            kept = kept / density
        else:
            before, after = t.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        out.append(kept)
    return torch.stack(out)


def majority_sign(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """The elected sign per parameter (+1 on ties): sign of the sum (``total``/``sum``) or of
    the sign count (``frequency``/``count``) over experts."""
    m = _SIGN_ALIASES[method]
    score = stacked.sum(0) if m == "total" else stacked.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(
    stacked: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor, flavor: Flavor, normalize: bool
) -> torch.Tensor:
    """Σ over experts whose entry agrees with the elected sign, divided by how many agree (PEFT)
    or by the sum of their weights (mergekit, when ``normalize``)."""
    weighted = stacked * weights
    agree = ((stacked if flavor == "peft" else weighted).sign() == sign).to(stacked.dtype)
    mixed = (weighted * agree).sum(0)
    if flavor == "peft":
        return mixed / agree.sum(0).clamp(min=1.0)
    if not normalize:
        return mixed
    divisor = (weights * agree).sum(0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def _elect_and_merge(stacked: torch.Tensor, weights: Any, method: SignMethod, flavor: Flavor, normalize: bool) -> torch.Tensor:
    """TIES' second half on sparsified task tensors: elect a sign on the raw (PEFT) or weighted
    (mergekit) tensors, then the disjoint merge."""
    w = _weights(weights, stacked.shape[0], stacked)
    sign = majority_sign(stacked if flavor == "peft" else stacked * w, method)
    return disjoint_merge(stacked, w, sign, flavor, normalize)


# ---------------------------------------------------------------------------- kernels


@register_merge("average")
def average(task_tensors: TaskTensors, weights: Any = None) -> torch.Tensor:
    """Weighted mean Σ w_i τ_i / Σ w_i (θ_0 + the mean of the τ_i is the mean of the θ_i)."""
    x = _stack(task_tensors)
    w = _weights(weights, x.shape[0], x)
    total = w.sum()
    if total.abs() < 1e-12:
        raise ValueError("average: the merge weights sum to zero")
    return (x * w).sum(0) / total


@register_merge("task_arithmetic")
def task_arithmetic(task_tensors: TaskTensors, weights: Any = None, *, lambda_: float = 1.0) -> torch.Tensor:
    """λ · Σ w_i τ_i."""
    x = _stack(task_tensors)
    return lambda_ * (x * _weights(weights, x.shape[0], x)).sum(0)


@register_merge("magnitude_prune")
def magnitude_prune(
    task_tensors: TaskTensors, weights: Any = None, *, density: Density, flavor: Flavor = "peft", lambda_: float = 1.0
) -> torch.Tensor:
    """λ · Σ w_i · trim(τ_i, density)."""
    x = trim(_stack(task_tensors), density, flavor)
    return lambda_ * (x * _weights(weights, x.shape[0], x)).sum(0)


@register_merge("ties")
def ties(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    majority_sign_method: SignMethod = "total",
    flavor: Flavor = "peft",
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES: trim to ``density``, elect sign, disjoint merge, scale by λ. ``normalize`` only
    affects ``flavor="mergekit"`` (PEFT always divides by the agreeing count)."""
    x = trim(_stack(task_tensors), density, flavor)
    return lambda_ * _elect_and_merge(x, weights, majority_sign_method, flavor, normalize)


@register_merge("dare_linear")
def dare_linear(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    flavor: Flavor = "peft",
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then task arithmetic: λ · Σ w_i · drop_and_rescale(τ_i)."""
    x = drop_and_rescale(_stack(task_tensors), density, generator, flavor)
    return lambda_ * (x * _weights(weights, x.shape[0], x)).sum(0)


@register_merge("dare_ties")
def dare_ties(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    majority_sign_method: SignMethod = "total",
    flavor: Flavor = "peft",
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint merge (``normalize``: mergekit flavour only)."""
    x = drop_and_rescale(_stack(task_tensors), density, generator, flavor)
    return lambda_ * _elect_and_merge(x, weights, majority_sign_method, flavor, normalize)


@register_merge("svd")
def svd(task_tensors: TaskTensors, weights: Any = None, *, rank: int, lambda_: float = 1.0) -> torch.Tensor:
    """Best rank-``rank`` approximation (Eckart–Young) of λ · Σ w_i τ_i; 1-D tensors pass through."""
    merged = task_arithmetic(task_tensors, weights, lambda_=lambda_)
    return truncated_svd(merged, rank)


def truncated_svd(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r Σ_r V_rᵀ of a matrix (a 1-D tensor is returned as is; >2-D tensors are flattened
    to [shape[0], rest])."""
    if matrix.dim() < 2:
        return matrix
    m = matrix.reshape(matrix.shape[0], -1).float()
    if rank >= min(m.shape):
        return matrix
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(matrix.dtype).reshape(matrix.shape)


def rank_for(shape: Sequence[int], rank: int | None = None, keep: float | None = None) -> int:
    """The kept rank for a matrix: ``rank`` (capped at min(d)) or ``int(keep·min(d))`` (≥ 1) —
    Twin-Merging's "90 % sparsity" is ``keep=0.1``."""
    full = min(shape[0], int(torch.tensor(shape[1:]).prod()))
    if (rank is None) == (keep is None):
        raise ValueError("give exactly one of rank or keep (the kept fraction of singular values)")
    if rank is not None:
        return max(1, min(int(rank), full))
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return max(1, min(full, int(keep * full)))


def kernel_kwargs(method: str, params: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Validated params as the kernel takes them: ``seed`` becomes a per-tensor generator."""
    kw = {k: v for k, v in params.items() if k != "seed"}
    if get_merge(method).random:
        kw["generator"] = tensor_generator(int(params.get("seed", 0)), key)
    return kw


# ----------------------------------------------------------------------- LoRA experts


def merge_lora_deltas(
    loras: Sequence[LoraExpert], method: str, params: dict[str, Any], weights: torch.Tensor | None
) -> Iterator[tuple[str, torch.Tensor | None, list[tuple[float, LoraFactors]]]]:
    """Per module: the merged ΔW (None for a linear method: use the returned weighted factor
    terms instead) — the one place LoRA experts are merged, always in ΔW space."""
    kernel = get_merge(method)
    modules = sorted({mod for e in loras for mod in e.modules})
    lam = float(params.get("lambda_", 1.0))
    weight_of = [float(weights[i]) if weights is not None else 1.0 for i in range(len(loras))]
    for mod in modules:
        present = [(i, e.modules[mod]) for i, e in enumerate(loras) if mod in e.modules]
        if method in FACTOR_FORM:
            ws = [weight_of[i] for i, _ in present]
            coef = [x / sum(weight_of) for x in ws] if method == "average" else [lam * x for x in ws]
            yield mod, None, [(c, f) for c, (_, f) in zip(coef, present, strict=True)]
            continue
        ref = present[0][1]
        shape = (ref.B.shape[0], ref.A.shape[1])
        deltas = [e.modules[mod].delta() if mod in e.modules else torch.zeros(shape) for e in loras]
        yield mod, kernel(deltas, weights, **kernel_kwargs(method, params, mod)), []
