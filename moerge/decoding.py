"""Compiled decoding: a static KV cache and ``torch.compile`` over the decode step (CUDA graphs
with ``mode="reduce-overhead"`` on a GPU), through transformers' own auto-compile in
``generate``. Eager decoding on a GPU is bound by kernel launches (tens of ms per step for a
1 B model at batch 32 against well under a millisecond to read its weights once); graphs
replay the whole step with one launch.

Graphs are specialised on shapes, so batches are padded to a few bucket sizes (dummy rows run
the base model alone and are dropped) and prompt lengths to a multiple of ``LENGTH_MULTIPLE``;
the multi-expert layer reads its routing as tensors (no per-batch Python values), so a new
assignment reuses the captured graph. Eager stays the default: on a CPU compiled decode steps
were 1.23× faster for a hidden-512 model after 23 s of compilation per bucket, which a short
run never wins back (``moerge bench serving --compile``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: batch sizes a compiled decode is padded to (above the last, multiples of it)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: prompts are left-padded to a multiple of this many tokens
LENGTH_MULTIPLE = 16


def bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket ≥ ``n`` (beyond the largest: the next multiple of it)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def compile_kwargs(
    device: torch.device, mode: str = "reduce-overhead", backend: str = "inductor", fullgraph: bool = False
) -> dict[str, Any]:
    """``generate`` keywords for a static cache and compiled decode steps. transformers compiles
    only on accelerators by default; on another device the compile is forced (tests, benches)."""
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=fullgraph, mode=mode, backend=backend, dynamic=False)
    if device.type not in ("cuda", "xpu"):
        cfg._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cfg}


def pad_rows(prompts: Sequence[str], compiled: bool) -> list[str]:
    """The prompts padded (by repeating the last) to a bucket size when decoding is compiled."""
    prompts = list(prompts)
    if not compiled:
        return prompts
    return prompts + [prompts[-1]] * (bucket(len(prompts)) - len(prompts))


def tokenizer_kwargs(compiled: bool) -> dict[str, Any]:
    return {"pad_to_multiple_of": LENGTH_MULTIPLE} if compiled else {}


def padded_weights(routing: Any, rows: int) -> Any:
    """What the layers read for ``routing`` over ``rows`` rows (≥ its own; dummy rows of a
    compiled bucket copy the first row's routing, and their output is dropped): sequence
    weights are extended; a token router's per-example bias (GLIDER's) is extended in its hook."""
    weights = routing.layer_weights()
    n = len(routing.hook.bias) if routing.granularity == "token" and routing.hook.bias is not None else None
    if routing.granularity != "token":
        n = weights.shape[0]
    if n is None or rows == n:
        return weights
    if routing.granularity == "token":
        routing.hook.bias = torch.cat([routing.hook.bias, routing.hook.bias[:1].expand(rows - n, -1)])
        return weights
    return torch.cat([weights, weights[:1].expand(rows - n, -1)])
