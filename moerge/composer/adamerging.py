"""``moerge.adamerging(base, experts, inputs)``: AdaMerging (Yang et al., ICLR 2024) — merging
coefficients learned by entropy minimisation on unlabeled inputs.

The reference (``EnnengYang/AdaMerging``, ``src/main_task_wise_adamerging.py`` and
``main_layer_wise_adamerging.py``) merges θ = θ₀ + Σ_k λ_k τ_k, with one λ per task vector
(*task-wise*) or one per task vector and parameter tensor (*layer-wise*), every λ starting at the
prior 0.3 and clamped to [0, 1] in the forward pass; Adam (lr 1e-3, betas 0.9/0.999) takes 500
steps, each summing over the tasks the mean Shannon entropy of the merged model's predictions on
two batches of 16 unlabeled inputs of that task.

For LoRA experts τ_k is ΔW_k = s_k·B_k·A_k, and *layer-wise* means one λ per expert and adapted
module. A language model's prediction for a prompt is its next token, so the entropy here is the
one of the next-token distribution at the prompt's end (the answer's first token: what a
classifier's softmax is to the reference). Gradients reach λ through moerge's multi-expert layer
(the experts' factors are never materialised as ΔW during the search). The result is exact: a LoRA
holding every expert's factors side by side, each A scaled by its λ and scaling (rank Σ r_k, as
the ``cat`` merge), or the base with Σ λ ΔW folded in.

``inputs`` are unlabeled prompts; ``moerge eval`` gives it the *validation* prompts of every task
of the set (never a test prompt), grouped by task as the reference groups its datasets."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moerge.adapters import attach, detach, set_weights
from moerge.adapters.lora import LoraExpert, LoraFactors
from moerge.composer.compose import encode_prompts, load_base
from moerge.composer.merge import empty_output, finish_learned, load_lora_experts
from moerge.device import DeviceLike, resolve_device
from moerge.progress import progress_bar
from moerge.registry import Registry

REPORT_FILE = "moerge_adamerging.json"
#: the reference's settings: λ's prior, Adam's learning rate, its steps, inputs per batch and batches per task and step
PRIOR, LR, STEPS, BATCH, BATCHES = 0.3, 1e-3, 500, 16, 2


@dataclass
class AdaMergingReport:
    experts: list[str]
    base: str
    granularity: str
    steps: int
    lr: float
    prior: float
    #: expert → λ (task-wise), or module → expert → λ (layer-wise), clamped to [0, 1]
    coefficients: dict[str, Any]
    #: the summed mean entropy per step (the first: at the prior)
    entropy: list[float] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over the last dimension (the reference's ``softmax_entropy``)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _groups(inputs: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    groups = {str(k): list(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else {"inputs": list(inputs)}
    bad = [k for k, v in groups.items() if not v or not all(isinstance(p, str) and p for p in v)]
    if not groups or bad:
        raise ValueError(
            "AdaMerging needs unlabeled prompts (non-empty strings): a list, or task → list"
            + (f"; empty or not text: {bad}" if bad else "")
        )
    return groups


def adamerging(
    base: Any = None,
    experts: Any = None,
    inputs: Sequence[str] | Mapping[str, Sequence[str]] = (),
    out: str | Path | None = None,
    *,
    registry: Registry | None = None,
    granularity: Literal["task", "layer"] = "layer",
    steps: int = STEPS,
    lr: float = LR,
    prior: float = PRIOR,
    batch_size: int = BATCH,
    batches: int = BATCHES,
    seed: int = 0,
    output: Literal["lora", "model"] = "lora",
    device: DeviceLike = "auto",
    dtype: Any = "float32",
    progress: bool | None = None,
) -> Any:
    """Learn the merging coefficients of LoRA ``experts`` on unlabeled ``inputs`` (prompts, or
    task → prompts: the entropies of the tasks are summed, as the reference sums its datasets) and
    return the merge as a ``PeftModel`` (``output="lora"``: the experts' factors side by side,
    exact) or the base with it folded in (``"model"``); with ``out``, write it there and return the
    path. The :class:`AdaMergingReport` is at ``result.adamerging_report`` /
    ``out/moerge_adamerging.json``.

    ``granularity``: ``"layer"`` (one λ per expert and module; the paper's better variant) or
    ``"task"`` (one λ per expert). ``steps``, ``lr``, ``prior``, ``batch_size``, ``batches``: the
    reference's 500, 1e-3, 0.3, 16 and 2 (each step reads ``batches`` batches per task, drawn with
    ``seed``)."""
    t0 = time.perf_counter()
    groups = _groups(inputs)
    if granularity not in ("task", "layer"):
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    if output not in ("lora", "model"):
        raise ValueError(f"output must be 'lora' or 'model', got {output!r}")
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("batches", batches, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"AdaMerging's {name} must be an integer ≥ {low}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"AdaMerging's lr must be > 0, got {lr}")
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"AdaMerging's prior must be in [0, 1] (λ is clamped there), got {prior}")
    out = empty_output(out, "AdaMerging")
    dev = resolve_device(device)
    names, loras, base_id = load_lora_experts(
        experts, registry, base, dev, "moerge's AdaMerging merges LoRA experts (λ·ΔW per module)"
    )
    if len({e.fan_in_fan_out for e in loras}) > 1:
        raise ValueError("the LoRA experts disagree on fan_in_fan_out (they adapt different layer types)")
    modules = sorted({m for e in loras for m in e.modules})
    model, tok = load_base(base_id, device=dev, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, loras)
    rows = len(modules) if granularity == "layer" else 1
    raw = torch.nn.Parameter(torch.full((rows, len(loras)), float(prior), device=dev))
    row_of = {m: (i if granularity == "layer" else 0) for i, m in enumerate(modules)}

    def weights(layer: Any, x: torch.Tensor) -> torch.Tensor:
        return raw[row_of[layer.module_name]].clamp(0.0, 1.0)[None].to(x.dtype)  # the reference clamps in the forward

    encoded = {k: encode_prompts(tok, v, dev) for k, v in groups.items()}
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history: list[float] = []
    set_weights(model, weights)
    try:
        bar = progress_bar(total=steps, desc="AdaMerging", progress=progress)
        for step in range(steps + 1):  # the last pass only measures the final entropy
            total = torch.zeros((), device=dev)
            for enc in encoded.values():
                n = enc["input_ids"].shape[0]
                for _ in range(batches):
                    pick = torch.randperm(n, generator=g)[:batch_size].to(dev)
                    with torch.set_grad_enabled(step < steps):
                        logits = model(input_ids=enc["input_ids"][pick], attention_mask=enc["attention_mask"][pick]).logits
                        total = total + softmax_entropy(logits[:, -1]).mean()  # left-padded: the prompt's end
            history.append(float(total.detach()))
            if step == steps:
                break
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            bar.update()
        bar.close()
    finally:
        detach(model)
    lam = raw.detach().clamp(0.0, 1.0).cpu()
    merged = _lambda_cat(loras, modules, lam, row_of)
    coefficients: dict[str, Any] = (
        {m: dict(zip(names, map(float, lam[row_of[m]]), strict=True)) for m in modules}
        if granularity == "layer"
        else dict(zip(names, map(float, lam[0]), strict=True))
    )
    report = AdaMergingReport(names, base_id, granularity, steps, lr, prior, coefficients, history,
                              {k: len(v) for k, v in groups.items()})  # fmt: skip
    report.seconds = time.perf_counter() - t0
    return finish_learned(merged, model, tok, base_id, output, out, report, REPORT_FILE, "adamerging_report")


def _lambda_cat(loras: Sequence[LoraExpert], modules: Sequence[str], lam: torch.Tensor, row_of: dict[str, int]) -> LoraExpert:
    """Σ_k λ_k ΔW_k per module, exactly, as one LoRA: the experts' factors side by side, each A
    scaled by λ_k·s_k (scaling 1; a module an expert lacks contributes nothing)."""
    out: dict[str, LoraFactors] = {}
    for mod in modules:
        parts = [(float(lam[row_of[mod], k]), e.modules[mod]) for k, e in enumerate(loras) if mod in e.modules]
        A = torch.cat([c * f.scaling * f.A.float() for c, f in parts])
        B = torch.cat([f.B.float() for _, f in parts], dim=1)
        out[mod] = LoraFactors(A, B, 1.0)
    return LoraExpert("adamerging", out, fan_in_fan_out=loras[0].fan_in_fan_out)
