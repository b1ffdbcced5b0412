"""How a Mixtral MoE built from the zoo's eight dense experts (``moerge moe build``) routes and scores
with each router initialisation, over independent zoo builds (seeds):

* ``hidden, registered examples`` — no prompt written: each expert's registered examples
  (moerge's addition to mergekit-moe);
* ``hidden, 8 validation prompts`` — what a mergekit-moe user writes by hand, here 8 prompts of
  each task's validation split;
* ``hidden_avg`` (the hidden state averaged over the prompt, not its last token) from the
  registered examples, ``cheap_embed`` with the validation prompts, and ``random``.

Scored on every held-in task's test split (exact match, %), with the share of test prompts whose
last token's top-1 router choice is the task's own expert, averaged over layers (routing, %).
Nothing here reads a test prompt while building. Usage:
``python scripts/moe_gates.py --seeds 0,1,2 --out scripts/results/moe_gates.json`` (MOERGE_CACHE
holding the small zoo's seeds, built by ``moerge bench all --preset small --seeds 0,1,2``)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def score(path: Path, zoo, tasks: list[str], top_k: int) -> dict[str, float]:  # noqa: ANN001
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.composer.compose import decode_text, encode_prompts

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    right = total = routed = 0
    for e_idx, t in enumerate(tasks):
        examples = zoo.test_split(t)
        prompts = [e.prompt for e in examples]
        enc = encode_prompts(tok, prompts)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            logits = model(**enc, output_router_logits=True).router_logits  # per layer [B·T, E]
        n, width = enc["input_ids"].shape
        for i, e in enumerate(examples):
            right += decode_text(tok, out[i, width:]) == e.target
        last = [lg.reshape(n, width, -1)[:, -1].argmax(-1) for lg in logits]  # left-padded: the prompt's last token
        routed += sum(float((c == e_idx).float().mean()) for c in last) / len(last) * n
        total += n
    return {"exact_match": 100 * right / total, "routing": 100 * routed / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from moerge import zoo as zoo_mod
    from moerge.composer.moe import build_moe

    runs: dict[str, dict[str, dict[str, float]]] = {}
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        zoo = zoo_mod.load(replace(zoo_mod.PRESETS["small"], seed=seed), progress=False)
        tasks = zoo.held_in
        reg = zoo.registry
        val = {t: [e.prompt for e in zoo.val_split(t)[:8]] for t in tasks}
        base = {"base_model": str(zoo.base_path), "dtype": "float32", "experts_per_token": args.top_k}
        configs = {
            "hidden, registered examples": {**base, "experts": [{"source_model": f"{t}-dense"} for t in tasks]},
            "hidden, 8 validation prompts": {
                **base, "experts": [{"source_model": f"{t}-dense", "positive_prompts": val[t]} for t in tasks]
            },
            "hidden_avg, registered examples": {
                **base, "gate_mode": "hidden_avg", "experts": [{"source_model": f"{t}-dense"} for t in tasks]
            },
            "cheap_embed, 8 validation prompts": {
                **base, "gate_mode": "cheap_embed",
                "experts": [{"source_model": f"{t}-dense", "positive_prompts": val[t]} for t in tasks],
            },
            "random": {**base, "gate_mode": "random", "experts": [{"source_model": f"{t}-dense"} for t in tasks]},
        }  # fmt: skip
        runs[str(seed)] = {}
        with tempfile.TemporaryDirectory() as tmp:
            # the ceiling of the construction: each task on a one-expert MoE of its own expert (the base's
            # attention and embeddings, the expert's MLPs), as a perfect router would give it
            right = routed = 0.0
            for t in tasks:
                one = {**base, "experts_per_token": 1, "gate_mode": "random", "experts": [{"source_model": f"{t}-dense"}]}
                path = build_moe(one, Path(tmp) / f"one-{t}", registry=reg, seed=seed, progress=False)
                right += score(path, zoo, [t], 1)["exact_match"] / len(tasks)
            runs[str(seed)]["own expert's MLPs only (a perfect router's ceiling)"] = {"exact_match": right, "routing": 100.0}
            for name, cfg in configs.items():
                path = build_moe(cfg, Path(tmp) / name.replace(" ", "_").replace(",", ""), registry=reg, seed=seed,
                                 progress=False)  # fmt: skip
                runs[str(seed)][name] = score(path, zoo, tasks, args.top_k)
                print(seed, name, runs[str(seed)][name], flush=True)
    rows = {}
    for name in next(iter(runs.values())):
        rows[name] = {}
        for col in ("exact_match", "routing"):
            vals = [runs[s][name][col] for s in runs]
            rows[name][col] = {"values": vals, "mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    print(f"\n| router init (top-{args.top_k}) | held-in exact match (%) | routing to the own expert (%) |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['exact_match']['mean']:.1f} ± {r['exact_match']['sd']:.1f} | {r['routing']['mean']:.1f} ± {r['routing']['sd']:.1f} |")
    print(f"n = {len(runs)} zoo builds; {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": rows, "top_k": args.top_k}, indent=1))


if __name__ == "__main__":
    main()
