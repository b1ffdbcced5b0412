"""Experts as tensors and modules: LoRA factors, task vectors, low-rank conversions and the
batched multi-expert layer, with attach/detach on any HF causal LM."""

from moerge.adapters.attach import (
    attach,
    attach_slots,
    detach,
    expert_names,
    layers,
    load_expert,
    one_hot,
    set_weights,
    use_weights,
)
from moerge.adapters.layer import Assignment, MultiExpertLinear, TopK
from moerge.adapters.lora import (
    LoraExpert,
    LoraFactors,
    load_lora,
    load_task_vector,
    lora_from_state,
    lora_scaling,
    lowrank_from_delta,
    lowrank_from_factors,
)

__all__ = [
    "Assignment",
    "LoraExpert",
    "LoraFactors",
    "MultiExpertLinear",
    "TopK",
    "attach",
    "attach_slots",
    "detach",
    "expert_names",
    "layers",
    "load_expert",
    "load_lora",
    "load_task_vector",
    "lora_from_state",
    "lora_scaling",
    "lowrank_from_delta",
    "lowrank_from_factors",
    "one_hot",
    "set_weights",
    "use_weights",
]
