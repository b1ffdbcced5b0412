"""``moerge bench determinism``: why one seed gives other figures on another machine, measured.

One probe builds a zoo from scratch (``tiny``: a few training steps; ``small``: the tests'
preset — a base, eight LoRA and eight dense experts, one seed)
in a fresh process under given settings, then scores base, experts, oracle, Arrow and TIES on
it; the probes are compared with the first (the machine's defaults): how many experts' weights
are bitwise equal, how far the table moved. The settings are the ones that differ between two
machines:

* **kernel choice** — ``ATEN_CPU_CAPABILITY`` (PyTorch's vectorised kernels: ``avx512``,
  ``avx2``, ``default``), with ``MKL_ENABLE_INSTRUCTIONS`` / ``DNNL_MAX_CPU_ISA`` for the BLAS and
  oneDNN paths: an AMD EPYC without AVX-512 runs the ``avx2`` kernels;
* **thread count** — torch's intra-op threads (reductions split differently);
* **the same settings twice** — a control: a probe must equal itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: the probes: a name, the environment it runs under, torch threads
PROBES: dict[str, tuple[dict[str, str], int]] = {
    "defaults, 2 threads": ({}, 2),
    "defaults, 2 threads (again)": ({}, 2),
    "1 thread": ({}, 1),
    "AVX2 kernels (no AVX-512)": (
        {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
        2,
    ),
    "unvectorised kernels": (
        {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"},
        2,
    ),
}

#: the tiny zoo every probe builds (the same as the same-seed test's)
TINY = {"base_steps": 40, "n_train": 200, "n_val": 16, "n_test": 16, "lora_max_steps": 20, "dense_max_steps": 5,
        "min_steps": 10, "eval_every": 10}  # fmt: skip

_PROBE = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from moerge import zoo as zoo_mod
from moerge.bench.determinism import TINY
from moerge.bench.quality import evaluate_zoo
over = TINY if sys.argv[4] == "tiny" else {}
z = zoo_mod.load(zoo_mod.with_overrides("small", seed=int(sys.argv[3]), **over), cache_dir=sys.argv[1], progress=False)
weights = {r.name: h for r in z.registry.list() for f, h in r.files.items() if f.endswith(".safetensors")}
rep = evaluate_zoo(z, ["Arrow"], ["TIES"], progress=False, breakdown=False)
rows = {r.name: {"per_task": r.per_task, "held_in_normalized": r.held_in_normalized} for r in rep.rows}
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "weights": weights, "rows": rows}))
"""


def probe(env: Mapping[str, str], threads: int, seed: int = 0, size: str = "tiny") -> dict[str, Any]:
    """One probe in a fresh process (the kernel settings are read at start-up). ``size``:
    ``tiny`` (:data:`TINY`, seconds) or ``small`` (the small preset as the tests build it, a minute or two)."""
    with tempfile.TemporaryDirectory(prefix="moerge-determinism-") as cache:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _PROBE, cache, str(threads), str(seed), size], capture_output=True, text=True,
                           env={**os.environ, **env, "OMP_NUM_THREADS": str(threads)}, timeout=1800)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"the probe failed ({r.returncode}): {r.stderr[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["seconds"] = time.perf_counter() - t
        return out


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """How far probe ``b`` is from ``a``: experts with bitwise-equal weights, and the table's moves
    (points of exact match per task, and of the held-in normalised score per row)."""
    same = sum(a["weights"][n] == b["weights"].get(n) for n in a["weights"])
    task_moves = [abs(100 * (a["rows"][r]["per_task"][t] - b["rows"][r]["per_task"][t]))
                  for r in a["rows"] for t in a["rows"][r]["per_task"]]  # fmt: skip
    norm_moves = {r: b["rows"][r]["held_in_normalized"] - a["rows"][r]["held_in_normalized"] for r in a["rows"]}
    return {
        "weights_equal": f"{same}/{len(a['weights'])}",
        "cells_changed": sum(m > 0 for m in task_moves),
        "cells": len(task_moves),
        "max_cell_move": max(task_moves),
        "max_row_move": max(abs(v) for v in norm_moves.values()),
        "row_moves": norm_moves,
    }


def run(names: Sequence[str] | None = None, seed: int = 0, size: str = "tiny", progress: bool | None = None) -> dict[str, Any]:
    from moerge.progress import progress_bar

    chosen = list(names or PROBES)
    results = {}
    for name in progress_bar(chosen, desc="determinism probes", progress=progress):
        env, threads = PROBES[name]
        results[name] = probe(env, threads, seed, size)
    ref = results[chosen[0]]
    return {
        "seed": seed,
        "size": size,
        "reference": chosen[0],
        "probes": {
            n: {
                "capability": r["capability"],
                "threads": r["threads"],
                "seconds": round(r["seconds"], 1),
                **({} if n == chosen[0] else compare(ref, r)),
            }
            for n, r in results.items()
        },  # fmt: skip
    }


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"| probe (vs {result['reference']}) | kernels | threads | experts' weights bitwise equal | table cells changed | "
        "largest move, one task (points) | largest move, held-in normalised |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, p in result["probes"].items():
        if "weights_equal" not in p:
            lines.append(f"| {name} (reference) | {p['capability']} | {p['threads']} | | | | |")
            continue
        lines.append(f"| {name} | {p['capability']} | {p['threads']} | {p['weights_equal']} | {p['cells_changed']}/{p['cells']} | "
                     f"{p['max_cell_move']:.1f} | {p['max_row_move']:.1f} |")  # fmt: skip
    return "\n".join(lines)
