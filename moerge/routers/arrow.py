"""Arrow (Ostapenko et al. 2024, as in mttl's ArrowSelector): per module, the expert's prototype
is the top right singular vector of ΔW = s·B·A (a direction in input space); a token u scores
|u·v_i| / T, then top-k and a softmax over the kept logits (phatgoose-glider.md §1.7).

No training and no data: prototypes come from the weights alone, computed in factor form
(thin QR + an r×r SVD, never the d_out×d_in matrix). Unlike GLIDER's released Arrow path
(pitfall 9) this takes the true top right singular vector (Vh[0]). ``general=``: GenKnowSub, as
PEFT's ``use_gks`` (the general LoRAs' mean factors subtracted from each expert's first)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field

from moerge.adapters import load_lora
from moerge.adapters.lora import LoraExpert, LoraFactors, lowrank_from_factors
from moerge.routers.base import ArtifactSpec, PrepareContext, RouterConfig, register_router
from moerge.routers.phatgoose import KeyedTokenRouter, on_device, stack_keys


class ArrowConfig(RouterConfig):
    top_k: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0, description="T in |u·v|/T (mttl: 1)")
    general: list[str] = Field(
        default_factory=list,
        description="GenKnowSub (PEFT's use_gks): registry names of general-knowledge LoRAs whose mean A and mean B are "
        "subtracted from each expert's before routing and computing (they are not routed themselves)",
    )


def arrow_prototypes(expert: LoraExpert) -> dict[str, torch.Tensor]:
    """Top right singular vector of ΔW per module (sign is arbitrary; Arrow scores use |·|)."""
    return {m: lowrank_from_factors([f], rank=1).A[0].contiguous() for m, f in expert.modules.items()}


def general_knowledge_subtracted(expert: LoraExpert, general: Sequence[LoraExpert]) -> LoraExpert:
    """GenKnowSub (Belofsky et al. 2025; PEFT's ``gen_know_sub``): ``expert`` with the mean A and
    the mean B of the ``general`` LoRAs subtracted, module by module — in factor space, as PEFT
    does, so every general LoRA needs the expert's modules and rank. The expert's scaling stays."""
    if not general:
        return expert
    out = {}
    for m, f in expert.modules.items():
        gs = [g.modules.get(m) for g in general]
        if any(g is None or g.A.shape != f.A.shape or g.B.shape != f.B.shape for g in gs):
            bad = [g.name for g, x in zip(general, gs, strict=True) if x is None or x.A.shape != f.A.shape]
            raise ValueError(f"GenKnowSub: the general LoRAs {bad} do not adapt {m} with {expert.name}'s rank {f.rank}")
        A = f.A - torch.stack([g.A.to(f.A) for g in gs]).mean(0)
        B = f.B - torch.stack([g.B.to(f.B) for g in gs]).mean(0)
        out[m] = LoraFactors(A, B, f.scaling)
    return replace(expert, modules=out)


@register_router("arrow")
class ArrowRouter(KeyedTokenRouter):
    config_cls = ArrowConfig
    score = "abs"
    PROTOS = "arrow-prototypes"

    def artifact_specs(self) -> list[ArtifactSpec]:
        return [ArtifactSpec(self.PROTOS, self._key, self._compute)]

    def _key(self, record: Any, ctx: PrepareContext) -> dict[str, Any]:
        key: dict[str, Any] = {"method": "top-right-singular-vector"}
        if self.config.general:  # GenKnowSub changes the experts, so their prototypes
            key["general"] = [r.ref for r in self._general_records(ctx)]
        return key

    def _general_records(self, ctx: PrepareContext) -> list[Any]:
        return [ctx.registry.get(name) for name in self.config.general]

    def _general(self, ctx: PrepareContext) -> list[LoraExpert]:
        """The general LoRAs, loaded once per registry and device (every expert's prototypes and
        the install step use them)."""
        refs = tuple(r.ref for r in self._general_records(ctx))
        key = (str(ctx.registry.root), str(ctx.device), refs)
        cached = getattr(self, "_general_loaded", None)
        if cached is None or cached[0] != key:
            loaded = [load_lora(r, registry=ctx.registry, device=ctx.device) for r in self._general_records(ctx)]
            self._general_loaded = cached = (key, loaded)
        return cached[1]

    def _compute(self, record: Any, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        expert = load_lora(record, registry=ctx.registry, device=ctx.device)
        return arrow_prototypes(general_knowledge_subtracted(expert, self._general(ctx)))

    def install(
        self, model: torch.nn.Module, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext
    ) -> list[LoraExpert]:
        """With ``general``: the experts after GenKnowSub (what PEFT's Arrow computes with)."""
        general = self._general(ctx) if self.config.general else []
        return [general_knowledge_subtracted(e, general) for e in loras]

    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        self.experts = [r.name for r in records]
        protos = [self.artifact(self.PROTOS, r, ctx) for r in records]
        self.keys, self.missing = on_device(*stack_keys(protos, sorted({m for p in protos for m in p})), device=ctx.device)
