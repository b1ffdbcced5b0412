"""The positive-control benchmark for token routing (issue 16) on :mod:`moerge.zoo.control`:
every single expert, PHATGOOSE, Arrow, the retrieval router, PHATGOOSE with random gates (the
floor) and the segment oracle (the ceiling: a segment counts when any expert answers it), scored
per segment on the mixed held-out prompts, with routing accuracy on the prompts' item tokens
(each item's right expert is its vocabulary's)."""

from __future__ import annotations

import time
from typing import Any

import torch


@torch.inference_mode()
def input_routing_accuracy(model: Any, prompts: list[str], expert_of_token: dict[int, int]) -> float:
    """Share of item tokens × modules whose top-1 expert is the item's vocabulary's expert
    (the router decides on the prompt, as at inference)."""
    top, mask = model.token_routing(prompts)  # [M, B, T]
    ids = model._encode(prompts)["input_ids"].cpu()
    want = torch.tensor([[expert_of_token.get(int(t), -1) for t in row] for row in ids])
    sel = (want >= 0) & mask
    return float((top[:, sel] == want[sel]).float().mean())


def evaluate(suite: Any, progress: bool | None = None, max_new_tokens: int = 20) -> dict[str, Any]:
    from moerge import compose
    from moerge.progress import progress_bar
    from moerge.routers.token import standardise
    from moerge.zoo.control import VOCAB_OF, segment_accuracy

    t0 = time.perf_counter()
    test = suite.test_held_out()
    prompts = [e.prompt for e in test]
    experts = suite.experts
    reg = suite.registry
    tok = suite.tokenizer()
    expert_of_token = {tok.convert_tokens_to_ids(c): experts.index(v) for c, v in VOCAB_OF.items()}
    methods: dict[str, dict[str, Any]] = {}

    # single experts, one at a time (the multi-expert layer with one expert at weight 1)
    singles = {}
    for e in progress_bar(experts, desc="control: single experts", progress=progress):
        model = compose(suite.base_path, reg.select(names=[e]), "retrieval", progress=False)
        answers = model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=256)
        singles[e] = answers
        methods[f"expert: {e}"] = {"held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1)}
    best = max(experts, key=lambda e: methods[f"expert: {e}"]["held_out_segment_accuracy"])
    oracle = []
    for i, ex in enumerate(test):  # per segment: right if any single expert answered it
        parts = []
        for j, (_, want) in enumerate(ex.segments):
            ok = any(j < len(a := singles[e][i].split("|")) and " ".join(a[j].split()) == want for e in experts)
            parts.append(want if ok else "?")
        oracle.append(" | ".join(parts))
    routers = {
        "PHATGOOSE": ("phatgoose", {}),
        "Arrow": ("arrow", {}),
        "retrieval": ("retrieval", {}),
        "random gates (PHATGOOSE, keys replaced)": ("phatgoose", {}),
    }
    for label, (name, cfg) in progress_bar(list(routers.items()), desc="control: routers", progress=progress):
        model = compose(suite.base_path, reg.select(names=experts), name, data=suite.expert_data, progress=False, **cfg)
        if label.startswith("random gates"):
            g = torch.Generator().manual_seed(0)
            model.router.keys = {
                m: standardise(torch.randn(k.shape, generator=g)).to(k.device) for m, k in model.router.keys.items()
            }
        answers = model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=256)
        methods[label] = {
            "held_out_segment_accuracy": round(100 * segment_accuracy(answers, test), 1),
            "routing_accuracy_inputs": round(100 * input_routing_accuracy(model, prompts[:100], expert_of_token), 1),
        }
    methods["segment oracle (any expert right)"] = {"held_out_segment_accuracy": round(100 * segment_accuracy(oracle, test), 1)}
    return {
        "preset": suite.preset.name,
        "methods": methods,
        "best_single": {"expert": best, **methods[f"expert: {best}"]},
        "test_prompts": len(test),
        "chance_routing": round(100 / len(experts), 1),
        "build": suite.meta.get("timings", {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| method | held-out segments right (%) | routing accuracy, input tokens (%) |", "|---|---:|---:|"]
    for name, m in result["methods"].items():
        ra = m.get("routing_accuracy_inputs")
        lines.append(f"| {name} | {m['held_out_segment_accuracy']:.1f} | {'' if ra is None else f'{ra:.1f}'} |")
    return "\n".join(lines) + (
        f"\n\n{result['test_prompts']} held-out prompts of three segments from three vocabularies; "
        f"routing chance {result['chance_routing']} %."
    )
