"""LoRA experts as tensors: per-module factors with PEFT's scaling rules, ΔW = s·B·A, dense task
vectors, and conversions back to low rank (truncated SVD; a thin-QR route for factor form)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.registry.importers import LORA_KEY, PEFT_PREFIX, pattern_value


@dataclass
class LoraFactors:
    """One module's LoRA: ``A`` [r, d_in], ``B`` [d_out, r], ``scaling`` s (ΔW = s·B·A, in
    ``nn.Linear`` orientation whatever the base layer's storage)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A, shape [d_out, d_in]."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LoraExpert:
    """A LoRA expert: module path (relative to the base model) → factors."""

    name: str
    modules: dict[str, LoraFactors]
    fan_in_fan_out: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """ΔW per module, in ``nn.Linear`` orientation."""
        return {m: f.delta() for m, f in self.modules.items()}


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: α/r, or α/√r with rsLoRA (Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def lora_from_state(name: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> LoraExpert:
    """Build factors from a PEFT adapter config and state dict, honouring ``lora_alpha``,
    ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` per module."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = LORA_KEY.match(key)
        if not m:
            raise ValueError(f"expert {name!r}: weight {key!r} is not a lora_A/lora_B factor")
        pairs.setdefault(m["module"].removeprefix(PEFT_PREFIX), {})[m["which"]] = tensor
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for module, ab in sorted(pairs.items()):
        rank = int(pattern_value(rank_pattern, module, r))
        a = float(pattern_value(alpha_pattern, module, alpha))
        modules[module] = LoraFactors(A=ab["A"], B=ab["B"], scaling=lora_scaling(a, rank, rslora))
    return LoraExpert(name=name, modules=modules, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))


def load_lora(
    source: Any, name: str | None = None, registry: Any = None, version: int | None = None, device: Any = "cpu"
) -> LoraExpert:
    """Load a LoRA expert from a registry (``source`` = expert name or record, with ``registry``),
    or from a PEFT adapter folder; its factors are loaded straight onto ``device``."""
    from safetensors.torch import load_file

    if registry is not None:
        rec = registry._resolve(source, version)
        if rec.kind != "lora":
            raise ValueError(f"expert {rec.ref} is a {rec.kind} expert, not a LoRA")
        config = json.loads(registry.file(rec, "adapter_config.json").read_text())
        state = registry.load_tensors(rec, device=device)
        expert = lora_from_state(name or rec.name, config, state)
        expert.meta = {"ref": rec.ref, "description": rec.description}
        return expert
    folder = Path(source)
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors", device=str(device))
    return lora_from_state(name or folder.name, config, state)


def load_task_vector(registry: Any, expert: Any, version: int | None = None) -> dict[str, torch.Tensor]:
    """A dense expert's task vector τ = θ_ft − θ_base (as registered)."""
    rec = registry._resolve(expert, version)
    if rec.kind != "dense" or rec.storage != "task_vector":
        raise ValueError(f"expert {rec.ref} is not a dense expert stored as a task vector (storage={rec.storage})")
    return registry.load_tensors(rec)


def rank_for_error(singular_values: torch.Tensor, tolerance: float) -> int:
    """The smallest rank r ≥ 1 whose truncation error ‖M − M_r‖_F / ‖M‖_F (Eckart–Young:
    √(Σ_{i≥r} s_i²) / √(Σ s_i²)) is at most ``tolerance``; runs on the host (merge time)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"rank tolerance must be in [0, 1), got {tolerance}")
    energy = singular_values.detach().double().cpu().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i≥r} s_i²
    errors = (tail / total).sqrt().tolist() + [0.0]
    return max(1, next(r for r, e in enumerate(errors) if e <= tolerance))


def lowrank_from_delta(delta: torch.Tensor, rank: int | None = None, tolerance: float | None = None) -> LoraFactors:
    """Best rank-``rank`` factors of a dense ΔW [d_out, d_in] by truncated SVD (Eckart–Young);
    with ``tolerance`` instead, the smallest rank within that relative error."""
    if delta.dim() != 2:
        raise ValueError(f"ΔW must be a matrix, got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    if tolerance is not None:
        rank = rank_for_error(S, tolerance)
    if rank is None or not 0 < rank <= min(delta.shape):
        raise ValueError(f"rank must be in 1..{min(delta.shape)} for ΔW of shape {tuple(delta.shape)}, got {rank}")
    return LoraFactors(A=Vh[:rank].contiguous(), B=(U[:, :rank] * S[:rank]).contiguous(), scaling=1.0)


def lowrank_from_factors(
    terms: Sequence[LoraFactors] | Sequence[tuple[float, LoraFactors]], rank: int | None = None, tolerance: float | None = None
) -> LoraFactors:
    """Best rank-``rank`` factors of Σ c_i·s_i·B_i·A_i without building the d_out×d_in matrix.

    Stack the terms as one product B̂·Â (B̂ = [c_1 s_1 B_1, …], Â = [A_1; …], inner size R = Σ r_i),
    take thin QRs B̂ = Q_b R_b and Âᵀ = Q_a R_a, SVD the R×R core R_b R_aᵀ = U S Vᵀ, and return
    B = Q_b U_k S_k, A = (Q_a V_k)ᵀ. Cost O((d_out + d_in)·R²) instead of O(d_out·d_in·min(d)).
    """
    weighted = [(1.0, t) if isinstance(t, LoraFactors) else t for t in terms]
    if not weighted:
        raise ValueError("lowrank_from_factors needs at least one term")
    B_hat = torch.cat([c * f.scaling * f.B.float() for c, f in weighted], dim=1)
    A_hat = torch.cat([f.A.float() for _, f in weighted], dim=0)
    inner = A_hat.shape[0]
    if tolerance is None and (rank is None or not 0 < rank):
        raise ValueError(f"rank must be positive, got {rank}")
    Qb, Rb = torch.linalg.qr(B_hat)  # [d_out, R], [R, R]
    Qa, Ra = torch.linalg.qr(A_hat.T)  # [d_in, R], [R, R]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank or inner, inner, S.shape[0])
    if tolerance is not None:
        k = rank_for_error(S, tolerance)
    B = (Qb @ U[:, :k]) * S[:k]
    A = (Qa @ Vh[:k].T).T
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=1.0)
