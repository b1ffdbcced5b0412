"""Merge kernels that interpolate between models rather than add task vectors: SLERP, NearSwap
and Model Stock, with mergekit's meaning (``mergekit.merge_methods.slerp``, ``nearswap``,
``model_stock``; checked tensor for tensor against mergekit on the same models).

=================  ====================================================================
``slerp``           the great-circle interpolation from the base (``t = 0``) to the one
                    expert (``t = 1``) over each whole tensor; nearly parallel tensors
                    (|cos| > ``dot_threshold``) are interpolated linearly
``nearswap``        per entry, move from the base towards the expert by
                    min(1, ``t`` / |θ_1 − θ_0|): entries that differ by less than ``t`` take
                    the expert's value, others move ``t`` towards it
``model_stock``     θ_0 + t · mean(τ_i) with t = k·cos / (1 + (k − 1)·cos), cos the mean
                    pairwise cosine of the k ≥ 2 task tensors (Jang et al. 2024); per row
                    with ``filter_wise``
``nuslerp``         the spherical interpolation of two experts' task tensors at
                    t = w₂ / (w₁ + w₂), per tensor, row or column
``multislerp``      the weighted barycentre of the task tensors on the sphere (tangent-space
                    mean, exponential map), scaled by their weighted mean norm
``karcher``         the Karcher mean of the base's and the experts' whole weights on the
                    sphere (equal weights), scaled by their mean norm
``arcee_fusion``    one expert's task-tensor entries whose importance |τ|·KL(softmax θ_1 ‖
                    softmax θ_0) reaches median + 1.5·IQR
=================  ====================================================================

NearSwap, Model Stock, NuSLERP and Multi-SLERP (the last two as mergekit runs them with a
``base_model``) are functions of the task tensors τ_i = θ_i − θ_0 alone, so they also merge
LoRA experts (on ΔW = s·B·A). SLERP needs the weights themselves (``base=``): a LoRA's ΔW
has no base to interpolate from, and it is refused for LoRA experts; so are Karcher and Arcee
Fusion, which read the whole weights too.
"""

from __future__ import annotations

from typing import Any

import torch

from moerge.adapters.merge import TaskTensors, _stack, no_weights, register_merge


def _one_expert(task_tensors: TaskTensors, weights: Any, method: str) -> torch.Tensor:
    x = _stack(task_tensors)
    if x.shape[0] != 1:
        raise ValueError(f"{method} interpolates between the base and exactly one expert, got {x.shape[0]} experts")
    no_weights(weights, method)
    return x[0]


def _check_t(t: float, method: str) -> float:
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"{method}: t must be in [0, 1], got {t}")
    return float(t)


@register_merge("slerp")
def slerp(
    task_tensors: TaskTensors,
    weights: Any = None,
    *,
    t: float,
    base: torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """θ_m − θ_0 for θ_m = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, Ω the angle between the
    flattened θ_0 and θ_1 (float32, or float64 for float64 inputs); ``(1−t)·θ_0 + t·θ_1`` where
    |cos Ω| > ``dot_threshold``. A norm below ``eps`` counts as 1."""
    t = _check_t(t, "slerp")
    tau = _one_expert(task_tensors, weights, "slerp")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    v0 = base.to(dtype).reshape(-1)
    v1 = (base.to(dtype) + tau.to(dtype)).reshape(-1)
    if v0.numel() == 0:
        return tau
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > eps, n0, 1)
    n1 = torch.where(n1 > eps, n1, 1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (c0 * v0 + c1 * v1 - v0).reshape(base.shape)


@register_merge("nearswap")
def nearswap(task_tensors: TaskTensors, weights: Any = None, *, t: float) -> torch.Tensor:
    """min(1, t / max(|τ|, 1e-6)) · τ per entry: the base's entries within ``t`` of the
    expert's take the expert's value; the others move ``t`` towards it."""
    if float(t) < 0:
        raise ValueError(f"nearswap: t must be ≥ 0, got {t}")
    tau = _one_expert(task_tensors, weights, "nearswap")
    return (float(t) / tau.abs().clamp(min=1e-6)).clamp(min=0, max=1) * tau


@register_merge("model_stock")
def model_stock(task_tensors: TaskTensors, weights: Any = None, *, filter_wise: bool = False) -> torch.Tensor:
    """t · mean(τ_i), t = k·cos / (1 + (k−1)·cos) from the mean pairwise cosine of the k task
    tensors — over each whole tensor, or per row (``filter_wise``). Where the denominator
    vanishes (|·| < 1e-6) the base is kept (t = 0)."""
    x = _stack(task_tensors)
    k = x.shape[0]
    if k < 2:
        raise ValueError(f"model_stock needs at least two experts beside the base, got {k}")
    no_weights(weights, "model_stock", "sets its own interpolation from the experts' angles")
    if filter_wise:
        rows = x.unsqueeze(1) if x.dim() == 2 else x  # a 1-D tensor is one row
    else:
        rows = x.reshape(k, 1, -1)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.linalg.vector_norm(rows[i], dim=-1) * torch.linalg.vector_norm(rows[j], dim=-1)
            cosines.append(((rows[i] * rows[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(cos), denominator))
    return (ratio * rows.mean(dim=0)).reshape(x.shape[1:])


def _two_weights(weights: Any, n: int, method: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in torch.as_tensor(weights).flatten().tolist()]
    if len(w) != n:
        raise ValueError(f"{method}: {len(w)} weights for {n} experts")
    return w


@register_merge("nuslerp")
def nuslerp(
    task_tensors: TaskTensors, weights: Any = None, *, flatten: bool = True, row_wise: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """The spherical interpolation of two experts' task tensors at t = w₂ / (w₁ + w₂) (½ when
    the weights sum to ~0): over each whole tensor (``flatten``, mergekit's default), else per
    row, or per column with ``row_wise`` (mergekit's ``nuslerp_flatten``/``nuslerp_row_wise``).
    Collinear pairs (1 − cos² ≤ eps²) are interpolated linearly."""
    x = _stack(task_tensors)
    if x.shape[0] != 2:
        raise ValueError(f"nuslerp interpolates exactly two experts, got {x.shape[0]}")
    w = _two_weights(weights, 2, "nuslerp")
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    v0, v1 = x[0], x[1]
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register_merge("multislerp")
def multislerp(
    task_tensors: TaskTensors, weights: Any = None, *, normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Barycentric interpolation of the experts' task tensors on the sphere: project each onto
    the unit sphere, take the weighted mean direction, average in its tangent space, map back
    (exponential map) and scale by the weighted mean norm (mergekit's ``multislerp`` with a
    base). One expert is returned as it is; two whose weighted directions cancel are averaged
    linearly; more raise."""
    x = _stack(task_tensors)
    if x.shape[0] == 1:
        return x[0]
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor(_two_weights(weights, x.shape[0], "multislerp"), dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] == 2:
            return x[0] * w[0] + x[1] * w[1]
        raise ValueError("multislerp: the experts' weighted directions cancel (antipodal task tensors); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    return (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])


@register_merge("karcher")
def karcher(
    task_tensors: TaskTensors, weights: Any = None, *, base: torch.Tensor, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """θ_m − θ_0 for θ_m the Karcher (Riemannian) mean of the base and the experts' whole weights
    on the unit sphere, with equal weights, scaled by their mean norm (mergekit's ``karcher``:
    the base is one of the models averaged). Directions of norm ≤ ``tol`` are left out."""
    no_weights(weights, "karcher", "averages the models with equal weights")
    x = _stack(task_tensors)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    models = [base] + [base + tau for tau in x]
    alphas = [1.0 / len(models)] * len(models)
    norms = [torch.linalg.vector_norm(m.to(dtype)) for m in models]
    units = [torch.zeros_like(m) if n.item() == 0.0 else (m / n).to(m.dtype) for m, n in zip(models, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return -base
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u, strict=True):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return scale * mean - base


@register_merge("arcee_fusion")
def arcee_fusion(
    task_tensors: TaskTensors, weights: Any = None, *, base: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Arcee Fusion: keep the entries of the one expert's task tensor whose importance
    |θ_1 − θ_0| · KL(softmax θ_1 ‖ softmax θ_0) (per row) reaches median + 1.5·IQR of the
    tensor's importances (mergekit's ``arcee_fusion``). Above 10⁶ entries the quantiles come from
    a sample of 10⁶ (seeded here; mergekit draws it unseeded)."""
    import torch.nn.functional as F

    tau = _one_expert(task_tensors, weights, "arcee_fusion")
    params = base + tau
    p = F.softmax(params, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (params - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:
        picks = torch.randint(flat.numel(), (1_000_000,), generator=generator, device="cpu").to(flat.device)
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)]
    return tau * (importance >= median + 1.5 * (q3 - q1)).to(tau.dtype)
