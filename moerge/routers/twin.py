"""Twin-Merging (Lu et al., NeurIPS 2024), as specified in ``shared/docs/methods/twin-merging.md``.

* §1.2 shared expert: a static merge of the experts (task arithmetic with λ by default; any
  kernel of :mod:`moerge.adapters.merge` — TIES, average … — selectable), in ΔW = s·B·A space
  (pitfall 8: the official generative code sums A and B separately; we do not).
* §1.3 twin vectors v_t = ΔW_t − ΔW_s per module, truncated SVD at ``rank`` (or the kept
  fraction ``keep`` of the singular values; 0.1 = the paper's "90 % sparsity"), computed in
  factor form (thin QR of the stacked factors + a small SVD) when the shared merge is linear,
  stored per expert as registry artifacts (factors, never dense).
* §1.4 router: MLP d→2d→2d→T with BatchNorm, LeakyReLU, dropout 0.5 on the attention-masked
  mean of the shared model's last hidden layer over the prompt (the deterministic prefill form
  the spec recommends), cross-entropy on task identity, Adam lr 5e-4; trained on the experts'
  data split into router-train and router-validation parts, the checkpoint chosen on
  router-validation accuracy (never on test data — pitfall 5). Stored as a group artifact.
* §1.5 inference: w(x) = softmax(R(Emb(x))/temperature); θ*(x) = θ_s + Σ_t w_t v_t, applied
  **exactly and batched**: θ_s is folded into the base weights once, the twin vectors sit in the
  multi-expert layer, and each row carries its own per-sequence weights — no per-sample weight
  copy is built. ``mode="group"``: the paper's App. E variant (bin by argmax, k-means inside a
  bin, each row uses its group's mean weights: one merged model per group).

Deviations: features are the prompt's prefill states (spec's recommendation, not the official
generative code's sampled last decode step); the router trains for ``epochs`` (default 30; paper
10, code 50) with batch 64 on ≤ 1000 examples per task. Dense experts are not supported here
yet (their 1-D tensors and embeddings would need per-sample handling outside linear layers).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moerge.adapters.lora import LoraExpert, LoraFactors, load_lora, lowrank_from_delta, lowrank_from_factors
from moerge.adapters.merge import merge_lora_deltas, merge_params, rank_for
from moerge.routers.base import ArtifactSpec, PrepareContext, PrepareReport, Router, RouterConfig, Routing, register_router


class TwinConfig(RouterConfig):
    shared_method: str = Field("task_arithmetic", description="merge kernel for the shared expert")
    shared_params: dict[str, Any] = Field(default_factory=lambda: {"lambda": 0.3}, description="its parameters (λ, density …)")
    rank: int | None = Field(None, ge=1, description="twin-vector rank (overrides keep)")
    keep: float = Field(0.1, gt=0, le=1, description="kept fraction of singular values when rank is unset")
    epochs: int = Field(30, ge=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(64, ge=2)
    dropout: float = Field(0.5, ge=0, lt=1)
    max_per_task: int = Field(1000, ge=2, description="router examples per task (paper: ≤ 1000)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of them held out to choose the checkpoint")
    seed: int = 0
    temperature: float = Field(1.0, gt=0)
    mode: Literal["exact", "group"] = "exact"
    groups: int = Field(20, ge=1, description="group mode: k-means groups per argmax bin")

    @model_validator(mode="after")
    def _check_shared(self) -> TwinConfig:
        try:
            merge_params(self.shared_method, self.shared_params)
        except KeyError as exc:  # an unknown method: pydantic reports ValueErrors with the field
            raise ValueError(exc.args[0]) from None
        return self


class TwinMLP(nn.Sequential):
    """The spec's router: Linear(d→2d) BN LeakyReLU Dropout, Linear(2d→2d) BN LeakyReLU Dropout, Linear(2d→T)."""

    def __init__(self, d: int, num_tasks: int, dropout: float = 0.5) -> None:
        h = 2 * d
        super().__init__(
            nn.Linear(d, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, num_tasks),
        )


def masked_mean_hidden(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Attention-masked mean of the last hidden layer over each text's tokens → [N, d]."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            h = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` (Lloyd's algorithm, seeded k-means++-style start)."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centers)).min(1).values.square()
        if d.sum() <= 0:
            break
        centers.append(x[torch.multinomial(d / d.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        c = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(c.shape[0])])
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def group_weights(w: torch.Tensor, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """App. E's group-wise variant: bin rows by argmax, k-means (``groups`` per bin) on the
    weights inside a bin, each row gets its group's mean weights → (weights, group id per row)."""
    out = torch.empty_like(w)
    gid = torch.empty(w.shape[0], dtype=torch.long)
    next_id = 0
    for b in w.argmax(1).unique().tolist():
        rows = torch.nonzero(w.argmax(1) == b).flatten()
        labels = kmeans(w[rows].float(), min(groups, rows.numel()), seed=seed)
        for j in labels.unique().tolist():
            sel = rows[labels == j]
            out[sel] = w[sel].mean(0)
            gid[sel] = next_id
            next_id += 1
    return out, gid


@register_router("twin")
class TwinRouter(Router):
    """Twin-Merging as a composition: θ_s folded into the base, twin vectors as the layer's
    experts, per-sequence softmax weights from the MLP router."""

    config_cls = TwinConfig
    granularity = "sequence"
    TWIN = "twin-vector"
    ROUTER = "twin-router"

    def __init__(self, config: TwinConfig) -> None:
        super().__init__(config)
        self._group: list[Any] = []
        self._shared_key: tuple | None = None
        self._shared: dict[str, Any] = {}
        self._loras: dict[str, LoraExpert] = {}
        self.load_reports: list[PrepareReport] = []
        self.mlp: TwinMLP | None = None
        self.router_metrics: dict[str, float] = {}

    # --------------------------------------------------------------- shared + twin vectors

    @property
    def _shared_params(self) -> dict[str, Any]:
        return merge_params(self.config.shared_method, self.config.shared_params)

    def _twin_key(self, record: Any, ctx: PrepareContext) -> dict[str, Any]:
        c = self.config
        return {
            "experts": sorted(r.ref for r in self._group),
            "shared_method": c.shared_method,
            "shared_params": c.shared_params,
            "rank": c.rank,
            "keep": None if c.rank else c.keep,
        }

    def _experts_loras(self, ctx: PrepareContext) -> list[LoraExpert]:
        out = []
        for r in self._group:
            if r.ref not in self._loras:
                self._loras[r.ref] = load_lora(r, registry=ctx.registry, device=ctx.device)
            out.append(self._loras[r.ref])
        return out

    def shared_deltas(
        self, loras: Sequence[LoraExpert]
    ) -> dict[str, tuple[torch.Tensor | None, list[tuple[float, LoraFactors]]]]:
        """Per module the shared ΔW_s: a dense matrix, or (linear merges) weighted factor terms."""
        return {
            mod: (delta, terms)
            for mod, delta, terms in merge_lora_deltas(loras, self.config.shared_method, self._shared_params, None)
        }

    def twin_vectors(self, expert: int, loras: Sequence[LoraExpert], shared: dict[str, Any]) -> dict[str, LoraFactors]:
        """SVD_r(ΔW_t − ΔW_s) per module, as factors (scaling 1)."""
        out = {}
        own = loras[expert]
        for mod, (delta_s, terms) in shared.items():
            f = own.modules.get(mod)
            ref = f if f is not None else next(e.modules[mod] for e in loras if mod in e.modules)
            shape = (ref.B.shape[0], ref.A.shape[1])
            r = rank_for(shape, self.config.rank, None if self.config.rank else self.config.keep)
            if delta_s is None:  # linear shared merge: stay in factor form
                diff = [(-c, t) for c, t in terms] + ([(1.0, f)] if f is not None else [])
                out[mod] = lowrank_from_factors(diff, r)
            else:
                v = (f.delta() if f is not None else torch.zeros(shape, device=delta_s.device)) - delta_s
                out[mod] = lowrank_from_delta(v, r)
        return out

    def _compute_twin(self, record: Any, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        loras = self._experts_loras(ctx)
        shared = self._shared_cache(loras)
        t = [r.ref for r in self._group].index(record.ref)
        vec = self.twin_vectors(t, loras, shared)
        return {f"{m}.{k}": v for m, f in vec.items() for k, v in (("A", f.A), ("B", f.scaling * f.B))}

    def _shared_cache(self, loras: Sequence[LoraExpert]) -> dict[str, Any]:
        key = (tuple(e.name for e in loras), self.config.shared_method, repr(self.config.shared_params))
        if self._shared_key != key:
            self._shared_key, self._shared = key, self.shared_deltas(loras)
        return self._shared

    def artifact_specs(self) -> list[ArtifactSpec]:
        return [ArtifactSpec(self.TWIN, self._twin_key, self._compute_twin)]

    def prepare(self, ctx: PrepareContext, experts: Sequence[Any]) -> list[PrepareReport]:
        self._group = [ctx.registry._resolve(e) for e in experts]
        not_lora = [r.ref for r in self._group if r.kind != "lora"]
        if not_lora:
            raise ValueError(f"Twin-Merging here merges LoRA experts; these are not: {not_lora}")
        return super().prepare(ctx, experts)

    # -------------------------------------------------------------------- composition

    def install(
        self, model: nn.Module, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext
    ) -> list[LoraExpert]:
        """Fold θ_s into ``model``'s weights (in place) and return the twin vectors as the
        experts the multi-expert layer holds (expert t = task t)."""
        self._group = list(records)
        for r in records:
            self._loras.setdefault(r.ref, next(e for e in loras if e.name == r.name))
        shared = self._shared_cache(list(loras))
        fifo = any(e.fan_in_fan_out for e in loras)
        with torch.no_grad():
            for mod, (delta_s, terms) in shared.items():
                d = delta_s if delta_s is not None else sum(c * t.delta() for c, t in terms)
                w = model.get_submodule(mod).weight
                w.add_((d.T if fifo else d).to(device=w.device, dtype=w.dtype))
        twins = []
        for r in records:
            art = self.artifact(self.TWIN, r, ctx)
            mods = sorted({k.rsplit(".", 1)[0] for k in art})
            factors = {m: LoraFactors(A=art[f"{m}.A"], B=art[f"{m}.B"], scaling=1.0) for m in mods}
            twins.append(LoraExpert(r.name, factors, fan_in_fan_out=fifo, meta={"ref": r.ref, "twin_of": r.ref}))
        self.stored = {
            "twin_params": sum(f.A.numel() + f.B.numel() for e in twins for f in e.modules.values()),
            # θ_s − θ_0 per module, stored dense or as stacked factors, whichever is smaller
            "shared_params": sum(
                min(
                    model.get_submodule(m).weight.numel(),
                    d.numel() if d is not None else sum(t.A.numel() + t.B.numel() for _, t in terms),
                )
                for m, (d, terms) in shared.items()
            ),
        }
        return twins

    def _router_key(self) -> dict[str, Any]:
        """What the router's training sees: the experts, the shared model θ_s (its features are
        θ_s's, twin vectors off) and the router's own settings — not the twin vectors' rank or
        keep, so a grid over rank trains one router per θ_s (format 3; format 2 keyed on the rank
        too and trained the same router again for each)."""
        c = self.config
        twin = self._twin_key(None, None)  # type: ignore[arg-type]
        return {
            "format": 3,  # 2: classes in sorted-ref order (format 1 used the caller's order); 3: without rank/keep
            "twin": {k: twin[k] for k in ("experts", "shared_method", "shared_params")},
            **{k: getattr(c, k) for k in ("epochs", "lr", "batch_size", "dropout", "max_per_task", "val_fraction", "seed")},
        }

    def load(self, records: Sequence[Any], loras: Sequence[LoraExpert], ctx: PrepareContext) -> None:
        """``loras`` are the attached twin vectors; the model is θ_s while routing weights are None."""
        self.experts = [r.name for r in records]
        self.model, self.tokenizer = ctx.model, ctx.tokenizer
        key = self._router_key()
        t0 = time.perf_counter()
        state = ctx.registry.get_group_artifact(records, self.ROUTER, key)
        if state is None:
            state = self.train_router(records, ctx)
            ctx.registry.put_group_artifact(records, self.ROUTER, key, state)
            self.load_reports = [PrepareReport(self.ROUTER, [r.ref for r in records], [], time.perf_counter() - t0)]
        else:
            self.load_reports = [PrepareReport(self.ROUTER, [], [r.ref for r in records], 0.0)]
        d = state["0.weight"].shape[1]
        self.mlp = TwinMLP(d, len(records), self.config.dropout)
        self.mlp.load_state_dict({k: v for k, v in state.items() if not k.startswith("metric.")})
        self.mlp.eval()
        self.router_metrics = {k.removeprefix("metric."): float(v) for k, v in state.items() if k.startswith("metric.")}
        canonical = sorted(r.ref for r in records)
        #: router class of each attached expert (column e of the weights = expert e)
        self.class_of = torch.tensor([canonical.index(r.ref) for r in records])
        self.stored["router_params"] = sum(p.numel() for p in self.mlp.parameters())

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Emb(x): masked-mean last hidden state of the shared model θ_s (twin weights off)."""
        from moerge.adapters import use_weights

        with use_weights(self.model, None):
            return masked_mean_hidden(self.model, self.tokenizer, texts)

    def train_router(self, records: Sequence[Any], ctx: PrepareContext) -> dict[str, torch.Tensor]:
        """Cross-entropy on task identity; checkpoint = best router-validation accuracy."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        train_x, train_y, val_x, val_y = [], [], [], []
        # classes in a canonical order (sorted refs), whatever order the caller lists the experts
        # in — load() maps them back (spec pitfall 7: router classes silently out of step)
        for t, r in enumerate(sorted(records, key=lambda r: r.ref)):
            data = ctx.data_for(r.name)
            texts = [d if isinstance(d, str) else d[0] for d in data] if data else list(r.examples)
            if len(texts) < 2:
                raise ValueError(
                    f"Twin-Merging's router needs example inputs for expert {r.ref}: pass data= or register examples"
                )
            texts = [texts[i] for i in torch.randperm(len(texts), generator=g)[: c.max_per_task].tolist()]
            n_val = max(1, int(round(c.val_fraction * len(texts))))
            val_x += texts[:n_val]
            val_y += [t] * n_val
            train_x += texts[n_val:]
            train_y += [t] * (len(texts) - n_val)
        self.model, self.tokenizer = ctx.model, ctx.tokenizer
        Xtr, Xva = self.features(train_x), self.features(val_x)
        # trained where the model runs (features and the MLP on its device)
        dev = ctx.device
        Xtr, Xva = Xtr.to(dev), Xva.to(dev)
        ytr, yva = torch.tensor(train_y, device=dev), torch.tensor(val_y, device=dev)
        torch.manual_seed(c.seed)
        mlp = TwinMLP(Xtr.shape[1], len(records), c.dropout).to(dev)
        opt = torch.optim.Adam(mlp.parameters(), lr=c.lr)
        best, best_acc, history = None, -1.0, []
        for _ in range(c.epochs):
            mlp.train()
            perm = torch.randperm(len(ytr), generator=g).to(dev)
            for i in range(0, len(perm), c.batch_size):
                idx = perm[i : i + c.batch_size]
                if idx.numel() < 2:  # BatchNorm needs two rows
                    continue
                loss = nn.functional.cross_entropy(mlp(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            mlp.eval()
            with torch.no_grad():
                acc = float((mlp(Xva).argmax(1) == yva).float().mean())
            history.append(acc)
            if acc > best_acc:
                best_acc, best = acc, copy.deepcopy(mlp.state_dict())
        assert best is not None
        mlp.load_state_dict(best)
        with torch.no_grad():
            train_acc = float((mlp(Xtr).argmax(1) == ytr).float().mean())
        metrics = {
            "metric.val_accuracy": best_acc,
            "metric.train_accuracy": train_acc,
            "metric.chance": 1.0 / len(records),
            "metric.best_epoch": float(history.index(best_acc) + 1),
            "metric.first_epoch_val_accuracy": history[0],
            "metric.n_train": float(len(ytr)),
            "metric.n_val": float(len(yva)),
        }
        return {**{k: v.detach().clone() for k, v in best.items()}, **{k: torch.tensor(v) for k, v in metrics.items()}}

    def weights(self, texts: Sequence[str]) -> torch.Tensor:
        """Per-input merge weights softmax(R(Emb(x)) / temperature) → [batch, experts]."""
        assert self.mlp is not None, "router not loaded"
        with torch.no_grad():
            logits = self.mlp(self.features(texts))[:, self.class_of]
            return torch.softmax(logits / self.config.temperature, dim=-1)

    def route(self, texts: Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        w = self.weights(texts)
        info: dict[str, Any] = {"router_weights": w.clone(), "chosen": w.argmax(1)}
        if self.config.mode == "group":
            w, gid = group_weights(w, self.config.groups, self.config.seed)
            info["group"] = gid
        return Routing("sequence", list(self.experts), weights=w, info=info)


def materialised_weights(model: nn.Module, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference (per-sample) form: for one input's weights ``row`` [E], every wrapped
    layer's merged weight W_s + Σ_e w_e·s_e·B_e·A_e as a dense tensor, keyed by the base
    weight's parameter name — what the official code builds for every input."""
    from moerge.adapters import layers

    out = {}
    for name, layer in layers(model).items():
        delta = torch.einsum("e,eor,eri->oi", row.to(layer.lora_A.dtype) * layer.scaling, layer.lora_B, layer.lora_A)
        w = layer.base.weight
        out[f"{name}.base.weight"] = w + (delta.T if type(layer.base).__name__ == "Conv1D" else delta)
    return out


def per_sample_forward(model: nn.Module, enc: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Logits by materialise-then-forward, one input at a time (``torch.func.functional_call``
    with that input's merged weights): the reference implementation's way, for tests and benches."""
    from moerge.adapters import use_weights

    outs = []
    with use_weights(model, None), torch.inference_mode():
        for b in range(weights.shape[0]):
            params = materialised_weights(model, weights[b])
            row = {k: v[b : b + 1] for k, v in enc.items()}
            outs.append(torch.func.functional_call(model, params, args=(), kwargs=row).logits)
    return torch.cat(outs)
