"""Routing diagnostics for the demo (issue 16): where a composed model's router sends each kind
of token, per layer, per example, and how much of a gate is signal.

* :func:`token_types` — each token of ``prompt target`` labelled ``bos``, ``instruction``,
  ``separator``, ``input``, ``arrow`` or ``answer`` (the zoo's ``<instruction> : <items> =>
  <answer>`` format; one token per word, as the zoo's tokenizer has).
* :func:`routing_breakdown` — the router decides on the prompt alone (as at inference); the
  top-1 expert of every module at every token of the teacher-forced ``prompt target`` is compared
  with the example's own expert: accuracy per token type (BOS, identical for every task, is
  reported apart and never pooled), per layer (input tokens), and a per-example vote (the most
  chosen expert over its input tokens × modules).
* :func:`gate_signal_to_noise` — LN-cosine of the same expert's PHATGOOSE gates trained with two
  seeds against that of different experts' gates: a gate is signal when the first is far above
  the second.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from moerge.composer.explain import TYPES, token_types  # noqa: F401  (re-exported: the breakdown labels with them)


def _layer(module: str) -> int:
    m = re.search(r"\.(\d+)\.", module)
    return int(m[1]) if m else -1


@torch.inference_mode()
def routing_breakdown(model: Any, examples: Sequence[Any], own: Sequence[int]) -> dict[str, Any]:
    """Routing accuracy of ``model`` (a :class:`~moerge.composer.ComposedModel`) on ``examples``
    (with ``prompt`` and ``target``), each of whose right expert is ``own[i]`` (an index into
    ``model.experts``): per token type, per layer on input tokens, and by per-example vote.
    The router sees the prompts only; the forward runs over prompt + target (teacher forcing)."""
    from moerge.routers.base import Recorder

    if len(examples) != len(own):
        raise ValueError(f"{len(examples)} examples for {len(own)} expert labels")
    prompts = [e.prompt for e in examples]
    full = [f"{e.prompt} {e.target}" for e in examples]
    routing = model.route(prompts)
    enc = model._encode(full)
    mask = enc["attention_mask"].bool().cpu()
    if routing.granularity == "token":
        recorder = Recorder()
        routing.hook.recorder = recorder
        with model.routed(routing):
            model.model(**enc)
        names = [n for n, _, _ in recorder.calls]
        top = torch.stack([idx[..., 0] for _, idx, _ in recorder.calls]).cpu()  # [M, B, T]
    else:
        names = ["sequence"]
        top = routing.weights.argmax(1).cpu()[None, :, None].expand(1, *mask.shape)
    want = torch.tensor(list(own))[None, :, None]
    hit = top == want  # [M, B, T]
    types: list[list[str]] = []
    for b, e in enumerate(examples):
        labels = token_types(e.prompt, e.target)
        n = int(mask[b].sum())
        if len(labels) != n:
            raise ValueError(f"example {b}: {n} tokens but {len(labels)} words: token_types needs one token per word")
        types.append(["pad"] * (mask.shape[1] - n) + labels)  # left padding
    by_type: dict[str, float] = {}
    counts: dict[str, int] = {}
    for t in TYPES:
        sel = torch.tensor([[x == t for x in row] for row in types])  # [B, T]
        n = int(sel.sum())
        counts[t] = n
        if n:
            by_type[t] = float(hit[:, sel].float().mean())
    inputs = torch.tensor([[x == "input" for x in row] for row in types])
    by_layer: dict[int, list[float]] = {}
    for m, name in enumerate(names):
        by_layer.setdefault(_layer(name), []).append(float(hit[m][inputs].float().mean()))
    votes = []
    for b in range(len(examples)):
        chosen = top[:, b, inputs[b]].flatten().tolist()
        votes.append(Counter(chosen).most_common(1)[0][0] == own[b] if chosen else False)
    return {
        "by_type": by_type,
        "tokens": counts,
        "by_layer": {str(k): sum(v) / len(v) for k, v in sorted(by_layer.items())},
        "vote": sum(votes) / len(votes),
        "chance": 1 / len(model.experts),
    }


def gate_signal_to_noise(keys_a: dict[str, torch.Tensor], keys_b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Two PHATGOOSE routers' standardised keys (``router.keys``: module → [experts, d]) over
    the same experts, gates trained with different seeds → mean LN-cosine of the same expert
    across the seeds, and of different experts within the first seed (over modules and pairs)."""
    same, diff = [], []
    for m, a in keys_a.items():
        if m not in keys_b:
            continue
        a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(keys_b[m].float(), dim=-1)
        same += (a * b).sum(-1).tolist()
        c = a @ a.T
        iu = torch.triu_indices(c.shape[0], c.shape[0], offset=1)
        diff += c[iu[0], iu[1]].tolist()
    if not same or not diff:
        raise ValueError("gate_signal_to_noise needs keys of two or more experts for common modules")
    return {"same_expert_across_seeds": sum(same) / len(same), "different_experts": sum(diff) / len(diff)}
