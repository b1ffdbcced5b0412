"""Can the main zoo hold held-out tasks that compose two held-in skills across the segments of
one prompt (issue 16)? A maintainer's experiment, not part of the library.

Each configuration builds a variant of the ``small`` zoo with ``Preset.segment_share`` > 0 (the
base also pre-trains on two-segment generic prompts; each expert also trains on its task's
segment beside a generic one), then measures on freshly drawn prompts (validation seeds, never
the zoo's test split):

* the base on one- and two-segment generic prompts (copy / first / last);
* each LoRA expert on its task alone and beside a generic segment;
* the ceiling of every router on :data:`moerge.zoo.tasks.COMPOSED`: the per-token oracle router
  (each position top-1 to the expert of the segment its next token belongs to), exact match and
  per segment; and the best single expert there.

Configurations run as parallel processes (one torch thread each); the table is printed last and
``--json`` keeps every figure.

    python scripts/segment_composition_probe.py --cache /tmp/seg --json seg.json [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

#: name → overrides of the ``small`` preset
CONFIGS: dict[str, dict] = {
    "segments 0.25": {"segment_share": 0.25},
    "segments 0.5, base 2000 steps": {"segment_share": 0.5, "base_steps": 2000},
    "segments 0.5, base 3000 steps, LoRA up to 1500 steps": {"segment_share": 0.5, "base_steps": 3000, "lora_max_steps": 1500},
}
N = 100  # prompts per measurement


def one(name: str, cache: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from moerge.adapters import attach, load_lora, one_hot, use_weights
    from moerge.bench.control import oracle_answers
    from moerge.zoo import load
    from moerge.zoo import tasks as T
    from moerge.zoo.build import with_overrides
    from moerge.zoo.control import segment_accuracy
    from moerge.zoo.train import generate_answers

    t0 = time.perf_counter()
    zoo = load(with_overrides("small", **CONFIGS[name]), cache_dir=cache, progress=False)
    build = time.perf_counter() - t0
    tok, model = zoo.tokenizer(), zoo.load_base()
    seed = 20_000 + zoo.preset.seed

    def em(answers: list[str], examples: list) -> float:
        return round(100 * T.exact_match(answers, examples), 1)

    generic = [e for t in T.PRETRAIN for e in T.sample(t, N // 3, seed=seed)]
    generic2 = T.pretrain_segmented(N, seed=seed)
    out: dict = {
        "name": name,
        "preset": CONFIGS[name],
        "build_seconds": round(build, 1),
        "timings": {k: round(v, 1) for k, v in zoo.meta["timings"].items()},
        "expert_steps": {t: s["lora"]["steps"] for t, s in zoo.meta["training"].items()},
        "base_generic": em(generate_answers(model, tok, [e.prompt for e in generic], max_new_tokens=12), generic),
        "base_generic_two_segments": em(generate_answers(model, tok, [e.prompt for e in generic2], max_new_tokens=20), generic2),
    }
    experts = zoo.held_in
    attach(model, [load_lora(e, registry=zoo.registry) for e in experts])

    def with_expert(j: int, examples: list, max_new_tokens: int) -> list[str]:
        with use_weights(model, one_hot([j] * len(examples), len(experts))):
            return generate_answers(model, tok, [e.prompt for e in examples], max_new_tokens=max_new_tokens)

    alone, beside = {}, {}
    for j, t in enumerate(experts):
        own = T.sample(t, N, seed=seed)
        alone[t] = em(with_expert(j, own, 8), own)
        rng = random.Random(f"probe:{t}")
        mixed = [T.with_foreign(rng, e) for e in own]
        beside[t] = em(with_expert(j, mixed, 20), mixed)
    out["expert_alone"], out["expert_beside_generic"] = alone, beside
    composed = {}
    for task in T.COMPOSED:
        test = T.sample(task, N, seed=seed)
        answers = oracle_answers(model, tok, test, experts, max_new_tokens=12)
        singles = {e: segment_accuracy(with_expert(experts.index(e), test, 12), test) for e in task.uses}
        composed[task.name] = {
            "oracle_exact_match": em(answers, test),
            "oracle_segments": round(100 * segment_accuracy(answers, test), 1),
            "best_single_segments": round(100 * max(singles.values()), 1),
        }
    out["composed"] = composed
    out["oracle_exact_match_mean"] = round(sum(c["oracle_exact_match"] for c in composed.values()) / len(composed), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.cache)))
        return
    names = args.only or list(CONFIGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {n: subprocess.Popen([sys.executable, __file__, "--cache", args.cache, "--one", n], stdout=subprocess.PIPE, env=env,
                                 text=True) for n in names}  # fmt: skip
    results = []
    for n, p in procs.items():
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{n!r} failed ({p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    print("| configuration | build (s) | base: generic 1 / 2 segments | expert alone / beside generic (mean) "
          "| per-token oracle on the compositions: exact / segments | best single expert: segments |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
        comp = r["composed"].values()
        print(f"| {r['name']} | {r['timings']['total_s']:.0f} | {r['base_generic']:.1f} / {r['base_generic_two_segments']:.1f} "
              f"| {mean(r['expert_alone']):.1f} / {mean(r['expert_beside_generic']):.1f} "
              f"| {r['oracle_exact_match_mean']:.1f} / {sum(c['oracle_segments'] for c in comp) / len(comp):.1f} "
              f"| {sum(c['best_single_segments'] for c in comp) / len(comp):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
