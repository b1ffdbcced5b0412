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
``cat``             Σ w_i τ_i; LoRA experts' factors concatenated (rank Σ r_i, exact), PEFT's
                    ``add_weighted_adapter(combination_type="cat")``
``breadcrumbs``     drop each τ_i's ``gamma`` largest and its smallest entries, keeping
                    ``density`` of them (Davari & Belilovsky 2023), then task arithmetic
``breadcrumbs_ties`` the same sparsifier, then TIES' sign election and disjoint merge
``della``           drop entries with a probability that falls with their magnitude's rank
                    (``density`` ± ``epsilon``; Deep et al. 2024), rescale, TIES' election; seeded
``della_linear``    the same drop, then task arithmetic
``sce``             keep the ``select_topk`` entries of highest variance across experts, elect
                    signs, weigh each τ_i by its mean square (Wan et al. 2024)
``ram``             an entry one expert moved keeps its value, one several moved their mean
``ramplus_tl``      RAM with each expert's unique entries scaled up by its shared/unique ratio
=================  ====================================================================

The interpolations (SLERP, NearSwap, Model Stock) are in :mod:`moerge.adapters.merge_interp`.
The methods that only mergekit defines (breadcrumbs, DELLA, SCE and the interpolations) follow
mergekit's code (``mergekit.sparsify``, ``mergekit.merge_methods``), checked tensor for tensor
against it.

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
import re
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
FACTOR_FORM = frozenset({"average", "task_arithmetic", "svd", "cat"})


@dataclass(frozen=True)
class MergeMethod:
    """A registered kernel and the parameters its signature accepts."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]
    required: tuple[str, ...]
    random: bool
    #: the kernel needs the base tensor θ_0 itself (``base=``), not only the task tensors: it
    #: is defined on whole weights (SLERP), so a LoRA's ΔW, which has no base, cannot take it
    needs_base: bool = False

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
            params=tuple(p.name for p in kw if p.name != "base"),
            required=tuple(p.name for p in kw if p.default is inspect.Parameter.empty and p.name != "base"),
            random="generator" in sig.parameters,
            needs_base="base" in sig.parameters,
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
        ds = [out["density"]] if isinstance(out["density"], int | float | Setting) else list(out["density"])
        ds = [x for d in ds for x in (d.values() if isinstance(d, Setting) else [d])]
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


def _per_expert(value: Density, n: int, name: str = "density") -> list[float]:
    """One float per expert: a number for all, or a sequence in expert order (mergekit's
    per-model ``density``, ``gamma``, ``epsilon``)."""
    if isinstance(value, int | float):
        return [float(value)] * n
    out = [float(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{len(out)} values of {name} for {n} experts")
    return out


def _l1_rescaled(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled back to ``tensor``'s L1 norm (mergekit's ``rescale``); unchanged when
    either norm is below 1e-7."""
    before, after = tensor.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def trim(stacked: torch.Tensor, density: Density, flavor: Flavor = "peft") -> torch.Tensor:
    """Keep each expert's top-``density`` entries by magnitude (row by row; ``density`` may
    be one per expert)."""
    ds = _per_expert(density, stacked.shape[0])
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
    ds = _per_expert(density, stacked.shape[0])
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
        out.append(kept / density if flavor == "peft" else _l1_rescaled(t, kept))
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


@register_merge("cat")
def cat(task_tensors: TaskTensors, weights: Any = None) -> torch.Tensor:
    """Σ w_i τ_i. For LoRA experts the merged LoRA is PEFT's ``cat`` combination: the experts'
    factors side by side (A = [w_i·s_i·A_i], B = [B_i]), rank Σ r_i, exact — no re-factoring."""
    return task_arithmetic(task_tensors, weights)


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


# ------------------------------------------------ mergekit's other sparsifiers and SCE


def no_weights(weights: Any, method: str, why: str = "") -> None:
    """Refuse per-expert weights for a method that sets its own (``why``: how)."""
    if weights is not None:
        raise ValueError(f"{method} {why + '; it ' if why else ''}takes no weights")


def outlier_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: with the entries sorted by magnitude, the ``gamma`` share of the
    largest is dropped, then the smallest, so that ``int(density·n)`` entries remain (fewer
    large ones are dropped when both cannot hold). As mergekit's ``magnitude_outliers``."""
    n = tensor.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(tensor.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom : bottom + keep]] = 1
    return mask.view_as(tensor)


def della_keep_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: each row's entries ranked by magnitude; the smallest is kept with
    probability ``density − epsilon``, the largest with ``density + epsilon``, linearly between
    (a 1-D tensor is one row). As mergekit's ``della_magprune``."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density} and epsilon {epsilon}")
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).float() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    share = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + share * 2 * epsilon).view_as(tensor)


def _sparsified(stacked: torch.Tensor, density: Density, rescale: bool, mask_of: Callable[..., torch.Tensor],
                **per_expert: Density) -> torch.Tensor:  # fmt: skip
    """Each expert's task tensor through ``mask_of(tensor, density, **its own values)``, L1-rescaled
    when ``rescale``; a density ≥ 1 keeps the tensor whole, ≤ 0 zeroes it (mergekit's rules)."""
    n = stacked.shape[0]
    ds = _per_expert(density, n, "density")
    own = {k: _per_expert(v, n, k) for k, v in per_expert.items()}
    out = []
    for i, t in enumerate(stacked):
        if ds[i] >= 1:
            out.append(t)
            continue
        if ds[i] <= 0:
            out.append(torch.zeros_like(t))
            continue
        kept = t * mask_of(t, ds[i], **{k: v[i] for k, v in own.items()})
        out.append(_l1_rescaled(t, kept) if rescale else kept)
    return torch.stack(out)


def _linear_sum(stacked: torch.Tensor, weights: Any, normalize: bool) -> torch.Tensor:
    """Σ w_i τ_i, divided by Σ w_i when ``normalize`` (a sum below 1e-8 divides by 1)."""
    w = _weights(weights, stacked.shape[0], stacked)
    mixed = (stacked * w).sum(0)
    if not normalize:
        return mixed
    total = w.sum()
    return mixed / (total if total.abs() >= 1e-8 else 1.0)


@register_merge("breadcrumbs")
def breadcrumbs(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    gamma: Density = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Model Breadcrumbs: each τ_i without its ``gamma`` largest and its smallest entries
    (``density`` kept), then λ · Σ w_i τ_i (÷ Σ w_i when ``normalize``)."""
    x = _sparsified(_stack(task_tensors), density, rescale, outlier_mask, gamma=gamma)
    return lambda_ * _linear_sum(x, weights, normalize)


@register_merge("breadcrumbs_ties")
def breadcrumbs_ties(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    gamma: Density = 0.01,
    majority_sign_method: SignMethod = "total",
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Breadcrumbs' sparsifier, then TIES' sign election on the weighted tensors and the
    disjoint merge (mergekit's semantics)."""
    x = _sparsified(_stack(task_tensors), density, rescale, outlier_mask, gamma=gamma)
    return lambda_ * _elect_and_merge(x, weights, majority_sign_method, "mergekit", normalize)


def _della_mask(generator: torch.Generator | None) -> Callable[..., torch.Tensor]:
    def mask_of(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
        probs = della_keep_probabilities(t, density, epsilon)
        if generator is not None and generator.device != probs.device:  # the same draw on every device
            return torch.bernoulli(probs.cpu(), generator=generator).to(probs.device, t.dtype)
        return torch.bernoulli(probs, generator=generator).to(t.dtype)

    return mask_of


@register_merge("della")
def della(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    epsilon: Density = 0.15,
    majority_sign_method: SignMethod = "total",
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA: MagPrune (:func:`della_keep_probabilities`), L1 rescale, then TIES' sign election
    and disjoint merge, ÷ the agreeing weights when ``normalize`` (mergekit's defaults)."""
    x = _sparsified(_stack(task_tensors), density, rescale, _della_mask(generator), epsilon=epsilon)
    return lambda_ * _elect_and_merge(x, weights, majority_sign_method, "mergekit", normalize)


@register_merge("della_linear")
def della_linear(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    density: Density,
    epsilon: Density = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune and rescale, then λ · Σ w_i τ_i (÷ Σ w_i when ``normalize``)."""
    x = _sparsified(_stack(task_tensors), density, rescale, _della_mask(generator), epsilon=epsilon)
    return lambda_ * _linear_sum(x, weights, normalize)


def variance_mask(stacked: torch.Tensor, share: float) -> torch.Tensor:
    """SCE's selection: 1 on the ``int(share·m)`` entries whose variance across experts is
    largest, m being how many entries vary at all (mergekit's ``sce_mask``)."""
    if share >= 1:
        return torch.ones_like(stacked[0])
    if share <= 0:
        return torch.zeros_like(stacked[0])
    var = torch.var(stacked, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


@register_merge("sce")
def sce(task_tensors: TaskTensors, weights: Any = None, *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Select, Calculate, Erase): keep the ``select_topk`` share of entries that vary most
    across experts; weigh each τ_i by its mean square over the sum of them; elect a sign per
    entry (sum); average the agreeing entries by those weights. It sets its own weights, so it
    takes none."""
    no_weights(weights, "sce", "weighs each expert by its task tensor's mean square")
    if not 0 <= select_topk <= 1:
        raise ValueError(f"sce: select_topk must be in [0, 1], got {select_topk}")
    x = _stack(task_tensors)
    if select_topk < 1:
        x = x * variance_mask(x, select_topk).unsqueeze(0)
    agree = (x.sign() == majority_sign(x, "total")).to(x.dtype)
    w = x.square().reshape(x.shape[0], -1).mean(dim=1)
    total = w.sum()
    w = torch.full_like(w, 1 / w.numel()) if total.abs() < 1e-6 else w / total
    w = w.view(-1, *([1] * (x.dim() - 1))) * agree
    return (x * w).sum(0) / w.sum(0).clamp(min=1e-6)


def _ram_masks(x: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entries that moved, how many experts moved each entry, moved by several, by one)."""
    moved = x.abs() > epsilon
    counts = moved.sum(dim=0, keepdim=True)
    return moved, counts, counts > 1, counts == 1


@register_merge("ram")
def ram(task_tensors: TaskTensors, weights: Any = None, *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (Reinforced Agent Merging): an entry only one expert moved (|τ| > ``epsilon``) takes
    that expert's value whole; one several moved takes their mean (mergekit's ``ram``)."""
    no_weights(weights, "ram")
    stacked = _stack(task_tensors)
    x = stacked.reshape(stacked.shape[0], -1)
    moved, counts, shared, unique = _ram_masks(x, epsilon)
    kept = x * moved
    return ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0).reshape(stacked.shape[1:])


@register_merge("ramplus_tl")
def ramplus_tl(
    task_tensors: TaskTensors, weights: Any = None, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+ (tensor-local): as :func:`ram`, with each expert's unique entries scaled by
    1 + r·min(max(ρ, 0), α), ρ its shared-to-unique entry ratio in the tensor (mergekit's ``ramplus_tl``)."""
    no_weights(weights, "ramplus_tl")
    stacked = _stack(task_tensors)
    x = stacked.reshape(stacked.shape[0], -1)
    moved, counts, shared, unique = _ram_masks(x, epsilon)
    rho = (moved & shared).sum(dim=1) / (moved & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    kept = x * moved
    return ((kept * unique * boost.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))).sum(dim=0).reshape(stacked.shape[1:])


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


# ------------------------------------------------- parameters that vary over a model's tensors

#: a decoder layer's tensor: ``<prefix><index><rest>``, e.g. ``model.layers.`` ``3`` ``.mlp.up_proj.weight``
LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<rest>\..*)$")


@dataclass(frozen=True)
class Setting:
    """A merge parameter that varies over a model's tensors, as mergekit's configs write it: a
    *gradient* (values spread evenly over the layers and interpolated linearly between them) and
    *filters* (the first condition whose ``filter`` is in the tensor's name, or has none, gives
    the value). ``conditions``: ``(filter or None, value)`` pairs in order, a value being a number
    or a tuple of numbers (a gradient). ``default``: the value where no condition matches.

    The tensor of layer i of L takes the gradient at t = i / (L − 1) (t = 1 for one layer);
    tensors outside the layers (embeddings, the final norm, the head) take t = 0, as in mergekit."""

    conditions: tuple[tuple[str | None, Any], ...]
    default: Any = None

    @classmethod
    def gradient(cls, values: Sequence[float]) -> Setting:
        return cls(((None, tuple(values)),))

    def values(self) -> list[Any]:
        """Every number it can take (its gradients' end points and the default)."""
        out = []
        for _, v in self.conditions:
            out.extend(v if isinstance(v, tuple) else [v])
        return out + ([] if self.default is None else [self.default])

    def at(self, key: str, layers: int | None) -> Any:
        """The value for the tensor named ``key`` of a model with ``layers`` layers."""
        return self.at_t(key, layer_position(key, layers))

    def at_t(self, key: str, t: float) -> Any:
        """The value for the tensor named ``key`` at position ``t`` ∈ [0, 1] of a gradient."""
        for filt, value in self.conditions:
            if filt is None or filt == "*" or filt in key:
                return value if not isinstance(value, tuple) else _interpolate(value, t)
        return self.default


def layer_position(key: str, layers: int | None) -> float:
    """t of the tensor ``key`` in a model of ``layers`` layers (see :class:`Setting`)."""
    m = LAYER_KEY.match(key)
    if m is None or not layers:
        return 0.0
    return int(m["index"]) / (layers - 1) if layers > 1 else 1.0


def _interpolate(values: tuple[Any, ...], t: float) -> Any:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_settings(value: Any, key: str, layers: int | None) -> Any:
    """``value`` for the tensor ``key``: a :class:`Setting` resolved, in a list each element."""
    if isinstance(value, Setting):
        return value.at(key, layers)
    if isinstance(value, list | tuple) and any(isinstance(v, Setting) for v in value):
        return [v.at(key, layers) if isinstance(v, Setting) else v for v in value]
    return value


def has_settings(params: Mapping[str, Any], weights: Any = None) -> bool:
    """Whether any parameter (or weight) varies over the tensors."""
    items = [*params.values(), weights]
    return any(isinstance(v, Setting) or (isinstance(v, list | tuple) and any(isinstance(x, Setting) for x in v)) for v in items)


def kernel_kwargs(method: str, params: Mapping[str, Any], key: str, layers: int | None = None) -> dict[str, Any]:
    """Validated params as the kernel takes them for the tensor ``key``: ``seed`` becomes a
    per-tensor generator; a :class:`Setting` (a gradient or filters) its value for ``key`` in a
    model of ``layers`` layers (a parameter no condition sets is left to the kernel's default)."""
    kw = {k: resolve_settings(v, key, layers) for k, v in params.items() if k != "seed"}
    kw = {k: v for k, v in kw.items() if v is not None}
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


# the interpolation family registers its kernels beside these (it imports the helpers above)
from moerge.adapters import merge_interp  # noqa: E402, F401
