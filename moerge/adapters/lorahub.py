"""LoRAHub's composition (Huang et al. 2024, "LoraHub: Efficient Cross-Task Generalization via
Dynamic LoRA Composition"; reference code ``sail-sg/lorahub``, ``lorahub/algorithm.py``).

One scalar w_i per LoRA, found without gradients on a few examples of a new task, then the LoRAs
combined *factor by factor*: Â = Σ w_i A_i and B̂ = Σ w_i B_i (the reference adds the PEFT state
dicts, A and B alike), so ΔŴ = s·B̂·Â = s·Σ_ij w_i w_j B_i A_j — cross terms included; it is not
a weighted sum of the experts' ΔW. Every expert therefore needs the same rank per module. Where
the experts' scalings s_i differ (the reference keeps the first adapter's config), each s_i is
folded into its A_i, which is the reference's result whenever the scalings agree.

The search (:func:`search`): nevergrad's ``NGOpt`` over w ∈ [−bound, bound]ⁿ (1.5), starting at 0,
``budget`` evaluations (the reference's ``max_inference_step``; its example uses 40), minimising
the examples' loss plus ``l1``·mean|w| (0.05). The reference's loss is the batch's mean
token cross-entropy divided by the number of examples (summed over batches when ``batch_size`` is
smaller); moerge computes it the same way (:func:`reference_loss`), so the L1 term weighs what it
weighs there."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.lora import LoraExpert, LoraFactors

#: the reference's defaults (lorahub/algorithm.py): L1 strength, the weights' bound, the search seed
L1 = 0.05
BOUND = 1.5
SEED = 42
#: evaluations of the objective (the reference's ``max_inference_step`` in its README and example.py)
BUDGET = 40


def check_composable(loras: Sequence[LoraExpert]) -> None:
    """Refuse experts whose factors cannot be added element-wise: a module's rank or shape
    differing between experts, or different layer types (``fan_in_fan_out``)."""
    if len(loras) < 2:
        raise ValueError(f"LoRAHub composes at least two LoRA experts, got {len(loras)}")
    if len({e.fan_in_fan_out for e in loras}) > 1:
        raise ValueError("the LoRA experts disagree on fan_in_fan_out (they adapt different layer types)")
    for mod in sorted({m for e in loras for m in e.modules}):
        shapes = {e.name: (tuple(f.A.shape), tuple(f.B.shape)) for e in loras if (f := e.modules.get(mod)) is not None}
        if len(set(shapes.values())) > 1:
            seen = ", ".join(f"{n}: A {a[0]}×{a[1]}, B {b[0]}×{b[1]}" for n, (a, b) in shapes.items())
            raise ValueError(
                f"LoRAHub adds the experts' A and B factors element-wise, so every expert needs the same rank and shape "
                f"per module; at {mod}: {seen}"
            )


def combine(loras: Sequence[LoraExpert], weights: Sequence[float] | torch.Tensor, name: str = "lorahub") -> LoraExpert:
    """Â = Σ w_i·s_i·A_i, B̂ = Σ w_i·B_i per module, scaling 1 (a module an expert lacks counts as zero)."""
    w = [float(x) for x in weights]
    if len(w) != len(loras):
        raise ValueError(f"{len(w)} weights for {len(loras)} experts")
    check_composable(loras)
    out: dict[str, LoraFactors] = {}
    for mod in sorted({m for e in loras for m in e.modules}):
        terms = [(wi, f) for wi, e in zip(w, loras, strict=True) if (f := e.modules.get(mod)) is not None]
        A = sum(wi * f.scaling * f.A.float() for wi, f in terms)
        B = sum(wi * f.B.float() for wi, f in terms)
        out[mod] = LoraFactors(A, B, 1.0)
    return LoraExpert(name, out, fan_in_fan_out=loras[0].fan_in_fan_out)


def l1_penalty(weights: Sequence[float], strength: float = L1) -> float:
    """The reference's regulariser: ``strength`` · mean |w_i|."""
    return strength * sum(abs(float(x)) for x in weights) / len(weights)


def reference_loss(batch_losses: Sequence[torch.Tensor | float], n_examples: int) -> float:
    """The reference's ``default_get_loss``: the batches' mean token losses summed, divided by the
    number of examples."""
    return float(sum(float(x) for x in batch_losses)) / n_examples


@dataclass
class SearchResult:
    weights: list[float]
    #: every evaluation in order: the weights tried, the loss, the objective (loss + L1)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        return min(self.history, key=lambda h: h["objective"])


def search(
    loss: Callable[[list[float]], float],
    n: int,
    budget: int = BUDGET,
    l1: float = L1,
    bound: float = BOUND,
    seed: int = SEED,
    on_step: Callable[[], None] | None = None,
) -> SearchResult:
    """nevergrad's NGOpt over ``n`` weights in [−bound, bound], from 0, ``budget`` evaluations of
    ``loss(w) + l1·mean|w|``; the recommendation is returned with every evaluation. Seeded through
    the parametrisation's own random state (the reference seeds numpy's global one, which the
    parametrisation draws from when it has none)."""
    try:
        import nevergrad as ng
    except ImportError:
        raise ImportError("LoRAHub searches its weights with nevergrad: pip install nevergrad (or 'moerge[lorahub]')") from None
    import numpy as np

    if budget < 1:
        raise ValueError(f"LoRAHub's budget (evaluations of the objective) must be ≥ 1, got {budget}")
    if not bound > 0:
        raise ValueError(f"LoRAHub's bound must be > 0 (weights in [-bound, bound]), got {bound}")
    if l1 < 0:
        raise ValueError(f"LoRAHub's l1 strength must be ≥ 0, got {l1}")
    param = ng.p.Array(init=[0.0] * n, lower=[-bound] * n, upper=[bound] * n)
    param.random_state = np.random.RandomState(seed)
    history: list[dict[str, Any]] = []

    def objective(w: np.ndarray) -> float:
        ws = [float(x) for x in w]
        value = loss(ws)
        history.append({"weights": ws, "loss": value, "objective": value + l1_penalty(ws, l1)})
        if on_step is not None:
            on_step()
        return history[-1]["objective"]

    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    with warnings.catch_warnings():  # scipy's COBYLA (one of NGOpt's choices) on nevergrad's stopping radius: not the user's
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid (RHOEND|MAXFUN)")
        recommendation = optimizer.minimize(objective)
    return SearchResult([float(x) for x in recommendation.value], history)
