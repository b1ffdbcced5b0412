"""Arrow (Ostapenko et al. 2024, as in mttl's ArrowSelector): per module, the expert's prototype
is the top right singular vector of ΔW = s·B·A (a direction in input space); a token u scores
|u·v_i| / T, then top-k and a softmax over the kept logits (phatgoose-glider.md §1.7).

No training and no data: prototypes come from the weights alone, computed in factor form
(thin QR + an r×r SVD, never the d_out×d_in matrix). Unlike GLIDER's released Arrow path
(pitfall 9) this takes the true top right singular vector (Vh[0])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from moerge.adapters import load_lora
from moerge.adapters.lora import LoraExpert, lowrank_from_factors
from moerge.routers.base import ArtifactSpec, PrepareContext, RouterConfig, register_router
from moerge.routers.phatgoose import KeyedTokenRouter, on_device, stack_keys


class ArrowConfig(RouterConfig):
    top_k: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0, description="T in |u·v|/T (mttl: 1)")


def arrow_prototypes(expert: LoraExpert) -> dict[str, torch.Tensor]:
    """Top right singular vector of ΔW per module (sign is arbitrary; Arrow scores use |·|)."""
    return {m: lowrank_from_factors([f], rank=1).A[0].contiguous() for m, f in expert.modules.items()}


@register_router("arrow")
class ArrowRouter(KeyedTokenRouter):
    config_cls = ArrowConfig
    score = "abs"
    PROTOS = "arrow-prototypes"

    def artifact_specs(self) -> list[ArtifactSpec]:
        return [ArtifactSpec(self.PROTOS, lambda rec, ctx: {"method": "top-right-singular-vector"}, self._compute)]

    def _compute(self, record: Any, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return arrow_prototypes(load_lora(record, registry=ctx.registry, device=ctx.device))

    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        self.experts = [r.name for r in records]
        protos = [self.artifact(self.PROTOS, r, ctx) for r in records]
        self.keys, self.missing = on_device(*stack_keys(protos, sorted({m for p in protos for m in p})), device=ctx.device)
