"""PHATGOOSE (Muqeeth et al., ICML 2024): post-hoc sigmoid gates trained per expert, then
per-token, per-module top-k routing over the gate vectors. Spec: phatgoose-glider.md §1.

Gate training (§1.3, §1.5): for every LoRA'd module m of expert z a vector v_{z,m} ∈ R^{d_in},
zero-initialised; the expert's LoRA output is scaled by σ(v·u) on the module's *raw* input u;
everything else (the base and the expert's LoRA) is frozen; the expert's own data and LM loss;
AdamW lr 5e-3, weight decay 0, 6 warm-up steps then constant, grad-clip 1.0, 100 steps.
The batch size is configurable (the paper's effective 1024 is far beyond what a CPU run needs
on the zoo's short sequences; the default here is 32), and ``accumulate`` sums the gradients
of that many batches per step (the effective batch is their product: 32 × 32 = the paper's 1024).

Inference (§1.4): the sigmoid is dropped; the gate is only a routing key. Per token and module,
s_i = LN(u)·LN(v_i)/sqrt(d), top-k (default 2), softmax over the kept logits, in prefill and
at every decode step. The gates live in the one multi-expert layer's hook; no LoRA maths here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from moerge.adapters import attach, detach, load_lora, set_weights
from moerge.adapters.lora import LoraExpert
from moerge.progress import progress_bar
from moerge.routers.base import ArtifactSpec, PrepareContext, Router, RouterConfig, Routing, register_router
from moerge.routers.token import Score, TokenHook, standardise
from moerge.training import PairEncoder, TextPair, warmup_constant


class PhatgooseConfig(RouterConfig):
    top_k: int = Field(2, ge=1, description="experts per token and module")
    steps: int = Field(100, ge=1, description="gate-training steps (paper: 100)")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate (paper: 5e-3)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(6, ge=0, description="linear warm-up, then constant (paper: 6)")
    clip_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1, description="examples per forward (paper: effective 1024)")
    accumulate: int = Field(
        1, ge=1, description="batches whose gradients are summed per step (effective batch = batch_size × accumulate)"
    )
    seed: int = 0

    def gate_key(self) -> dict[str, Any]:
        """The fields gate training depends on (``top_k`` only matters at inference)."""
        return self.model_dump(include={"steps", "lr", "weight_decay", "warmup_steps", "clip_norm", "batch_size", "seed"}) | (
            {"accumulate": self.accumulate} if self.accumulate > 1 else {}  # keys of gates trained before it existed hold
        )


@dataclass
class GateTraining:
    gates: dict[str, torch.Tensor]
    losses: list[float]


def train_gates(
    model: torch.nn.Module,
    tokenizer: Any,
    expert: LoraExpert,
    data: Sequence[TextPair],
    config: PhatgooseConfig | None = None,
    progress: bool | None = None,
) -> GateTraining:
    """Train one expert's PHATGOOSE gates on ``model`` (the bare base; it is left as it was).
    Returns the gate vector per LoRA'd module and the loss at every step."""
    cfg = config or PhatgooseConfig()
    if not data:
        raise ValueError(f"PHATGOOSE gate training for expert {expert.name!r} needs its training data; got none")
    was_training = model.training
    grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    modules = attach(model, [expert])
    try:
        layers = {m: model.get_submodule(m) for m in modules}
        device = next(model.parameters()).device
        gates = torch.nn.ParameterDict(
            {
                m.replace(".", "/"): torch.nn.Parameter(torch.zeros(layer.lora_A.shape[-1], device=device))
                for m, layer in layers.items()
            }
        )

        def gate(layer, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            # σ(v·u) on the raw input: one scalar per token scaling the LoRA branch (§1.3)
            v = gates[layer.module_name.replace(".", "/")]
            return torch.sigmoid(x.float() @ v)[..., None].to(x.dtype)

        set_weights(model, gate)
        params = list(gates.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(max(1, cfg.warmup_steps)))
        rng = random.Random(cfg.seed)
        examples, encode = list(data), PairEncoder(tokenizer)
        losses: list[float] = []
        model.train()
        with torch.enable_grad():
            for _ in progress_bar(range(cfg.steps), desc=f"gates {expert.name}", leave=False, progress=progress):
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for _ in range(cfg.accumulate):  # the mean loss over the effective batch
                    batch = encode(rng.sample(examples, min(cfg.batch_size, len(examples))))
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / cfg.accumulate
                    loss.backward()
                    total += loss.item()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                opt.step()
                sched.step()
                losses.append(total)
        return GateTraining({m: gates[m.replace(".", "/")].detach().cpu().clone() for m in modules}, losses)
    finally:
        detach(model)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_state[n])
        model.train(was_training)


def stack_keys(
    per_expert: Sequence[dict[str, torch.Tensor]],
    modules: Sequence[str],
    transform=None,  # noqa: ANN001
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack one key vector per expert for each module → ({module: [E, d]}, {module: missing mask [E]}).
    An expert without a key for a module gets a zero row and is masked out there."""
    keys, missing = {}, {}
    for m in modules:
        rows = [k.get(m) for k in per_expert]
        present = [r for r in rows if r is not None]
        if not present:
            raise ValueError(f"no expert has a routing key for module {m!r}")
        d = present[0].shape[-1]
        mat = torch.stack([r.float() if r is not None else torch.zeros(d) for r in rows])
        keys[m] = transform(mat) if transform else mat
        mask = torch.tensor([r is None for r in rows])
        if mask.any():
            missing[m] = mask
    return keys, missing


def on_device(
    keys: dict[str, torch.Tensor], missing: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Routing keys and masks moved once to the model's device (the hook then never copies)."""
    return {m: k.to(device) for m, k in keys.items()}, {m: k.to(device) for m, k in missing.items()}


class KeyedTokenRouter(Router):
    """A token router whose state is one key matrix per module (``self.keys``, ``self.missing``),
    scored by :class:`TokenHook` (``score`` "ln" or "abs"): PHATGOOSE, GLIDER and Arrow."""

    granularity = "token"
    score: ClassVar[Score] = "ln"

    def hook(self, bias: torch.Tensor | None = None, recorder=None) -> TokenHook:  # noqa: ANN001
        return TokenHook(
            self.keys,
            score=self.score,
            top_k=self.config.top_k,  # type: ignore[attr-defined]
            temperature=getattr(self.config, "temperature", 1.0),
            bias=bias,
            missing=self.missing,
            recorder=recorder,
        )

    def route(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        return Routing("token", list(self.experts), hook=self.hook())


@register_router("phatgoose")
class PhatgooseRouter(KeyedTokenRouter):
    """Per-token, per-module top-k over post-hoc gate vectors (§1.4)."""

    config_cls = PhatgooseConfig
    GATES = "phatgoose-gates"

    def artifact_specs(self) -> list[ArtifactSpec]:
        return [ArtifactSpec(self.GATES, self._gate_key, self._train)]

    def _gate_key(self, record: Any, ctx: PrepareContext) -> dict[str, Any]:
        return {"training": self.config.gate_key(), "base": record.base_fingerprint}

    def _train(self, record: Any, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        if ctx.model is None or ctx.tokenizer is None:
            raise ValueError("PHATGOOSE gate training needs the base model and its tokenizer")
        data = ctx.data_for(record.name)
        if not data:
            raise ValueError(
                f"PHATGOOSE trains expert {record.name!r}'s gates on that expert's own training data: pass "
                f"data={{{record.name!r}: [(prompt, target), ...]}} (or a callable name -> examples)"
            )
        expert = load_lora(record, registry=ctx.registry, device=ctx.device)
        return train_gates(ctx.model, ctx.tokenizer, expert, data, self.config, ctx.progress).gates  # type: ignore[arg-type]

    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        self.experts = [r.name for r in records]
        gates = [self.artifact(self.GATES, r, ctx) for r in records]
        modules = sorted({m for g in gates for m in g})
        # LN(v) once, at load (§2.2: "LayerNorm'ed once")
        self.keys, self.missing = on_device(*stack_keys(gates, modules, transform=standardise), device=ctx.device)
