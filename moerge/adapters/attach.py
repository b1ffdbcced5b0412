"""Putting the multi-expert layer on a model (``attach``), taking it off (``detach``), and
setting the routing weights every wrapped layer reads."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from moerge.adapters.layer import Assignment, MultiExpertLinear, TopK, WeightFn
from moerge.adapters.lora import LoraExpert


def _matches(module: str, targets: Sequence[str] | str) -> bool:
    """PEFT's target semantics: a string is a full-match regex; a list matches exact names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def attach(
    model: nn.Module,
    experts: Sequence[LoraExpert] | Mapping[str, LoraExpert],
    targets: Sequence[str] | str | None = None,
) -> list[str]:
    """Wrap every targeted linear of ``model`` in a :class:`MultiExpertLinear` holding ``experts``
    (in order; expert e is column e of the routing weights). ``targets`` restricts the modules
    (names, suffixes like ``"q_proj"``, or a regex); by default every module any expert adapts.
    Returns the wrapped module names. Routing starts as "base only" until weights are set."""
    if any(isinstance(m, MultiExpertLinear) for m in model.modules()):
        raise RuntimeError("model already has moerge experts attached; call detach(model) first")
    expert_list = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    if not expert_list:
        raise ValueError("attach needs at least one expert")
    names = [e.name for e in expert_list]
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique, got {names}")
    adapted = sorted({m for e in expert_list for m in e.modules})
    wanted = [m for m in adapted if targets is None or _matches(m, targets)]
    if not wanted:
        raise ValueError(f"no expert module matches targets {targets!r} (experts adapt e.g. {adapted[:3]})")
    modules = dict(model.named_modules())
    missing = [m for m in wanted if m not in modules]
    if missing:
        raise ValueError(f"experts adapt modules the model does not have: {missing[:5]}")
    for name in wanted:
        layer = MultiExpertLinear(modules[name], [e.modules.get(name) for e in expert_list], names, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    model._moerge_experts = names  # type: ignore[assignment]
    return wanted


def attach_slots(model: nn.Module, modules: Sequence[str], capacity: int) -> list[str]:
    """Wrap ``modules`` (those not wrapped yet) in multi-expert layers with ``capacity`` empty
    expert slots, for a model whose resident experts change while it serves (see
    :func:`load_expert`). Returns the newly wrapped module names."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 expert slot, got {capacity}")
    have = layers(model)
    if have and next(iter(have.values())).num_experts != capacity:
        raise ValueError(f"model already has {next(iter(have.values())).num_experts} expert slots, not {capacity}")
    found = dict(model.named_modules())
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(f"experts adapt modules the model does not have: {missing[:5]}")
    new = [m for m in modules if m not in have]
    for name in new:
        layer = MultiExpertLinear(found[name], [None] * capacity, [""] * capacity, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(found[parent_name] if parent_name else model, child, layer)
    if not hasattr(model, "_moerge_experts"):
        model._moerge_experts = [""] * capacity  # type: ignore[assignment]
    return new


def load_expert(model: nn.Module, slot: int, expert: LoraExpert | None) -> None:
    """Put ``expert`` into expert slot ``slot`` of every wrapped layer (``None`` empties it);
    modules the expert does not adapt get zeros. Every shape is checked before anything is
    written, so a bad expert leaves the model as it was."""
    found = layers(model)
    if not found:
        raise RuntimeError("no expert slots on this model; call attach_slots() first")
    if expert is not None:
        unknown = sorted(set(expert.modules) - set(found))
        if unknown:
            raise ValueError(f"expert {expert.name!r} adapts modules without slots: {unknown[:5]}; call attach_slots() for them")
        for name, layer in found.items():
            layer.check(expert.modules.get(name), expert.name)
    for name, layer in found.items():
        layer.set_expert(slot, expert.modules.get(name) if expert else None, expert.name if expert else "")
    names = getattr(model, "_moerge_experts", None)
    if names is not None and slot < len(names):
        names[slot] = expert.name if expert else ""


def layers(model: nn.Module) -> dict[str, MultiExpertLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiExpertLinear)}


def expert_names(model: nn.Module) -> list[str]:
    names = getattr(model, "_moerge_experts", None)
    if names is None:
        raise RuntimeError("no moerge experts are attached to this model; call attach() first")
    return list(names)


def detach(model: nn.Module) -> list[str]:
    """Put every wrapped base layer back; returns the module names restored."""
    restored = []
    for name, layer in list(layers(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
        restored.append(name)
    if hasattr(model, "_moerge_experts"):
        del model._moerge_experts
    return restored


def set_weights(model: nn.Module, weights: torch.Tensor | Assignment | TopK | WeightFn | None) -> None:
    """Set the routing of every wrapped layer: [B, E] per sequence, [B, T, E] per token, an
    :class:`Assignment`, :class:`TopK`, a callable ``(layer, x) -> [..., E] | TopK``, or ``None``
    for the base model alone. Tensors are moved to the model's device here, once for all
    layers; per-sequence weights on the CPU whose rows use at most half the experts become an
    :class:`Assignment` (read once on the host), so the layers compute only those experts."""
    found = layers(model)
    if not found:
        raise RuntimeError("no moerge experts are attached to this model; call attach() first")
    first = next(iter(found.values()))
    E, device = first.num_experts, first.lora_A.device
    if isinstance(weights, torch.Tensor):
        if weights.dim() not in (2, 3) or weights.shape[-1] != E:
            raise ValueError(f"routing weights must be [batch, {E}] or [batch, tokens, {E}], got {tuple(weights.shape)}")
        sparse = Assignment.from_dense(weights) if weights.dim() == 2 and weights.device.type == "cpu" else None
        weights = sparse if sparse is not None and 2 * sparse.index.shape[1] <= E else weights.to(device)
    if isinstance(weights, Assignment):
        if weights.max_index >= E:
            raise ValueError(f"the assignment names expert {weights.max_index} but the model holds {E}")
        weights.on(device)
    elif isinstance(weights, TopK):
        weights = weights.to(device)
    for layer in found.values():
        layer.weights = weights


@contextmanager
def use_weights(model: nn.Module, weights: torch.Tensor | Assignment | TopK | WeightFn | None) -> Iterator[None]:
    """``with use_weights(model, w): model.generate(...)`` — routing restored afterwards."""
    found = layers(model)
    before = {n: layer.weights for n, layer in found.items()}
    set_weights(model, weights)
    try:
        yield
    finally:
        for n, layer in found.items():
            layer.weights = before[n]


def one_hot(expert_index: Sequence[int], num_experts: int) -> torch.Tensor:
    """Per-sequence one-hot weights [B, E]: row b routes wholly to expert ``expert_index[b]``
    (−1 means the base model alone)."""
    w = torch.zeros(len(expert_index), num_experts)
    for b, e in enumerate(expert_index):
        if e >= num_experts:
            raise ValueError(f"expert index {e} out of range for {num_experts} experts")
        if e >= 0:
            w[b, e] = 1.0
    return w
