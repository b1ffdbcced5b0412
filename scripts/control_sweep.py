"""Sweep of the token-routing control suite's documented options (issue 16): base width and
depth, foreign segments in the experts' data, PHATGOOSE gate steps and gradient accumulation
(the paper's effective batch 1024 = 32 × 32). A maintainer's experiment, not part of the library.

Every configuration builds its own suite (cached under ``--cache``), trains PHATGOOSE's gates and
scores PHATGOOSE and the single experts on the suite's *validation* mixed prompts (never the
test's): routing accuracy on item tokens and per-segment accuracy. Configurations run as
parallel processes, each on the CPU (2 threads) or the GPU (float32), and the table is printed
last; ``--json`` keeps every result.

    python scripts/control_sweep.py --cache /tmp/ctl --json sweep.json [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib

#: name → (ControlPreset fields, PHATGOOSE overrides, device)
CONFIGS: dict[str, tuple[dict, dict, str]] = {
    "d128-L4 (control-d128)": ({}, {}, "cpu"),
    "d128-L4 on the GPU": ({}, {}, "cuda"),
    "d128-L4, gates batch 32x32": ({}, {"accumulate": 32}, "cuda"),
    "d128-L4, gates 300 steps": ({}, {"steps": 300}, "cpu"),
    "d128-L4, 1 foreign segment": ({"max_foreign": 1}, {}, "cpu"),
    "d128-L4, 0 foreign segments": ({"max_foreign": 0}, {}, "cpu"),
    "d256-L4": ({"hidden": 256}, {}, "cuda"),
    "d192-L6": ({"hidden": 192, "layers": 6}, {}, "cuda"),
    "d256-L6, gates batch 32x32": ({"hidden": 256, "layers": 6}, {"accumulate": 32}, "cuda"),
    "d96-L3 (control, control-small)": ({"hidden": 96, "layers": 3, "base_steps": 300, "expert_steps": 150, "n_test": 80}, {}, "cpu"),
}


def one(name: str, cache: str) -> dict:
    import torch

    fields, gates, device = CONFIGS[name]
    if device == "cpu":
        torch.set_num_threads(2)
    from moerge.bench.control import evaluate
    from moerge.zoo.control import ControlPreset, load_control

    t0 = time.perf_counter()
    suite = load_control(ControlPreset(f"sweep-{zlib.crc32(name.encode()):08x}", **fields), cache_dir=cache, progress=False,
                         device=device)  # fmt: skip
    build = time.perf_counter() - t0
    r = evaluate(suite, progress=False, split="val", routers=["PHATGOOSE"], merges=[], phatgoose=gates, device=device)
    m = r["methods"]
    return {
        "name": name,
        "device": device,
        "preset": fields,
        "gates": gates,
        "experts_val_exact_match": {e: t["val_exact_match"] for e, t in suite.meta["training"].items()},
        "phatgoose_routing_inputs": m["PHATGOOSE"]["routing_accuracy_inputs"],
        "phatgoose_segments": m["PHATGOOSE"]["held_out_segment_accuracy"],
        "oracle_segments": m["per-token oracle router"]["held_out_segment_accuracy"],
        "best_single_segments": r["best_single"]["held_out_segment_accuracy"],
        "build_s": round(build, 1),
        "eval_s": r["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--one")
    ap.add_argument("--timeout", type=float, default=480)
    ap.add_argument("--bf16", action="store_true", help="then PHATGOOSE in bfloat16 on the GPU suite")
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.cache)), flush=True)
        return
    names = a.only or list(CONFIGS)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    procs = {n: subprocess.Popen([sys.executable, __file__, "--cache", a.cache, "--one", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env) for n in names}  # fmt: skip
    t0 = time.time()
    results = []
    for n, p in procs.items():
        try:
            out, _ = p.communicate(timeout=max(1, a.timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            results.append({"name": n, "error": "timed out"})
            continue
        got = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(got[0]) if got else {"name": n, "error": out[-2000:]})
    extra = {}
    if a.bf16:
        try:
            extra = bf16(a.cache)
        except Exception as e:  # noqa: BLE001 - reported, the sweep's table still prints
            extra = {"error": repr(e)}
        print("bf16 check (PHATGOOSE, val):", json.dumps(extra), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"configs": results, "bf16": extra}, f, indent=2)
    print(f"\n{'config':34} {'dev':4} {'route%':>7} {'seg%':>6} {'best1%':>7} {'oracle%':>8} {'build s':>8} {'eval s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:34} ERROR {r['error'][-300:]}")
            continue
        print(f"{r['name']:34} {r['device']:4} {r['phatgoose_routing_inputs']:7.1f} {r['phatgoose_segments']:6.1f} "
              f"{r['best_single_segments']:7.1f} {r['oracle_segments']:8.1f} {r['build_s']:8.1f} {r['eval_s']:7.1f}")  # fmt: skip


def bf16(cache: str) -> dict:
    """PHATGOOSE on "d128-L4 on the GPU"'s suite in bfloat16 vs float32 (the same gates)."""
    from moerge.bench.control import evaluate
    from moerge.zoo.control import ControlPreset, load_control

    name = "d128-L4 on the GPU"
    suite = load_control(ControlPreset(f"sweep-{zlib.crc32(name.encode()):08x}", **CONFIGS[name][0]), cache_dir=cache,
                         progress=False, device="cuda")  # fmt: skip
    out = {}
    for dt in ("float32", "bfloat16"):
        r = evaluate(suite, progress=False, split="val", routers=["PHATGOOSE"], merges=[], device="cuda", dtype=dt)
        out[dt] = {k: r["methods"]["PHATGOOSE"][k] for k in ("routing_accuracy_inputs", "held_out_segment_accuracy")}
        out[dt]["seconds"] = r["seconds"]
    return out


if __name__ == "__main__":
    main()
