"""``moerge.lorahub(base, experts, examples)``: LoRAHub (Huang et al. 2024) — one weight per LoRA
expert, searched without gradients on a few (prompt, answer) examples of a new task, then the
experts' factors combined with those weights into one LoRA (or folded into the base).

The maths and the reference's defaults are in :mod:`moerge.adapters.lorahub`. The examples are
the only thing the search sees: in ``moerge eval`` they are the first examples of each task's
*validation* split, never its test split (the GLIDER paper's LoRAHub baseline drew them from the
evaluation loader: phatgoose-glider.md, pitfall 14)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moerge.adapters import attach_slots, detach, load_expert, one_hot, use_weights
from moerge.adapters.lorahub import BOUND, BUDGET, L1, SEED, check_composable, combine, reference_loss, search
from moerge.composer.compose import load_base
from moerge.composer.merge import empty_output, finish_learned, load_lora_experts
from moerge.device import DeviceLike, resolve_device
from moerge.progress import progress_bar
from moerge.registry import Registry
from moerge.training import encode_pairs

REPORT_FILE = "moerge_lorahub.json"


@dataclass
class LoraHubReport:
    experts: list[str]
    base: str
    #: expert → its weight (the search's recommendation)
    weights: dict[str, float]
    examples: int
    budget: int
    l1: float
    bound: float
    seed: int
    #: the examples' loss (the reference's: mean token loss / examples) at w = 0 (the base) and at the weights
    loss_at_zero: float | None = None
    loss: float | None = None
    #: every evaluation: the weights tried, the loss, the objective (loss + L1)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _examples(examples: Sequence[Any]) -> list[tuple[str, str]]:
    out = []
    for i, e in enumerate(examples):
        if isinstance(e, dict):
            e = (e.get("prompt", e.get("input")), e.get("answer", e.get("output", e.get("target"))))
        if not (isinstance(e, tuple | list) and len(e) == 2 and all(isinstance(x, str) for x in e)):
            raise ValueError(
                f"LoRAHub example {i} must be a (prompt, answer) pair of strings or a dict with 'prompt' and 'answer', got {e!r}"
            )
        out.append((e[0], e[1]))
    if not out:
        raise ValueError("LoRAHub needs at least one (prompt, answer) example of the new task")
    return out


def lorahub(
    base: Any = None,
    experts: Any = None,
    examples: Sequence[Any] = (),
    out: str | Path | None = None,
    *,
    registry: Registry | None = None,
    budget: int = BUDGET,
    l1: float = L1,
    bound: float = BOUND,
    seed: int = SEED,
    batch_size: int | None = None,
    output: Literal["lora", "model"] = "lora",
    device: DeviceLike = "auto",
    dtype: Any = "float32",
    progress: bool | None = None,
) -> Any:
    """Search one weight per LoRA expert on ``examples`` ((prompt, answer) pairs, or dicts with
    ``prompt`` and ``answer``) and return the combined LoRA as a ``PeftModel``
    (``output="lora"``) or the base with it folded in (``"model"``); with ``out``, write it there
    (a PEFT folder or a model folder, atomically) and return the path. The
    :class:`LoraHubReport` is at ``result.lorahub_report`` / ``out/moerge_lorahub.json``.

    ``experts``: as for :func:`moerge.merge` (registry names with ``registry=``, a selection, PEFT
    folders), all LoRA, at least two, of one rank per module. ``budget``: evaluations of the
    objective (default 40); ``l1``, ``bound``, ``seed``: the reference's 0.05, 1.5 and 42;
    ``batch_size``: examples per forward (default all of them, as the reference)."""
    t0 = time.perf_counter()
    pairs = _examples(examples)
    if output not in ("lora", "model"):
        raise ValueError(f"output must be 'lora' or 'model', got {output!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (or None: every example in one batch), got {batch_size}")
    out = empty_output(out, "LoRAHub")
    dev = resolve_device(device)
    names, loras, base_id = load_lora_experts(
        experts, registry, base, dev, "LoRAHub composes LoRA experts (it adds their A and B factors)"
    )
    check_composable(loras)  # before the base is loaded
    model, tok = load_base(base_id, device=dev, dtype=dtype)
    batches = [pairs] if batch_size is None else [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    encoded = [{k: v.to(dev) for k, v in encode_pairs(tok, b).items()} for b in batches]
    modules = sorted({m for e in loras for m in e.modules})
    attach_slots(model, modules, capacity=1)

    def loss(w: list[float]) -> float:
        load_expert(model, 0, combine(loras, w))
        losses = []
        with torch.no_grad():
            for batch in encoded:
                with use_weights(model, one_hot([0] * batch["input_ids"].shape[0], 1)):
                    losses.append(model(**batch).loss.float())
        return reference_loss(losses, len(pairs))

    try:
        bar = progress_bar(total=budget, desc="LoRAHub search", progress=progress)
        result = search(loss, len(loras), budget=budget, l1=l1, bound=bound, seed=seed, on_step=bar.update)
        bar.close()
        at_zero = (
            result.history[0]["loss"] if result.history and not any(result.history[0]["weights"]) else loss([0.0] * len(loras))
        )
        final = loss(result.weights)
    finally:
        detach(model)
    report = LoraHubReport(names, base_id, dict(zip(names, result.weights, strict=True)), len(pairs), budget, l1, bound, seed,
                           at_zero, final, result.history)  # fmt: skip
    merged = combine(loras, result.weights, name="lorahub")
    report.seconds = time.perf_counter() - t0
    return finish_learned(merged, model, tok, base_id, output, out, report, REPORT_FILE, "lorahub_report")
