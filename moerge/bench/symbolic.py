"""``moerge bench symbolic``: Symbolic-MoE's batch-by-model execution (every recruited model
loaded once, all its prompts answered in batches) against the naive per-query loop (each query
loads each of its recruited models), measured in one run on the same recruitment.

The pool is the zoo's dense fine-tunes as whole-model experts (kind ``model``, registered by
reference in a scratch registry: nothing is copied); the queries are the zoo's test prompts,
spread over its held-in tasks. Recruitment here is k uniform draws with replacement (seeded):
this bench measures execution, which depends only on which models each query drew, not on why.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.symbolic.execute import load_model_expert, run_batched, run_per_query
from moerge.symbolic.recruit import Recruitment


@dataclass
class SymbolicBenchConfig:
    preset: str = "small"
    queries: int = 48
    k: int = 3
    max_new_tokens: int = 8
    batch_size: int = 16
    seed: int = 0


def zoo_pool(zoo: Any, root: str | Path) -> Any:
    """A registry at ``root`` with every held-in task's dense fine-tune as a whole-model expert
    (by reference: the zoo's folders are not copied)."""
    from moerge.registry import Registry

    reg = Registry(root)
    have = {r.name for r in reg.list(kind="model")}
    for task in zoo.held_in:
        if task not in have:
            reg.register(zoo.dense_path(task), task, kind="model", reference=True, skills=[task],
                         description=f"the zoo's dense fine-tune on {task}, as a whole model")  # fmt: skip
    return reg


def run(
    cfg: SymbolicBenchConfig = SymbolicBenchConfig(), cache_dir: str | None = None, progress: bool | None = None
) -> dict[str, Any]:
    from moerge import zoo as zoo_mod

    zoo = zoo_mod.load(cfg.preset, cache_dir=cache_dir, progress=progress)
    rng = random.Random(cfg.seed)
    tasks = zoo.held_in
    prompts, targets = {}, {}
    for i in range(cfg.queries):
        ex = zoo.test_split(tasks[i % len(tasks)])[i // len(tasks)]
        prompts[f"q{i}"], targets[f"q{i}"] = ex.prompt, ex.target
    recruited = {q: Recruitment(rng.choices(tasks, k=cfg.k), None, "uniform") for q in prompts}
    gen = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        reg = zoo_pool(zoo, Path(tmp) / "pool")

        def loader(name: str) -> Any:
            return load_model_expert(reg, name)

        t = time.perf_counter()
        batched, bstats = run_batched(recruited, prompts, loader, progress=progress, **gen)
        t_batched = time.perf_counter() - t
        t = time.perf_counter()
        naive, nstats = run_per_query(recruited, prompts, loader, progress=progress, **gen)
        t_naive = time.perf_counter() - t
    agree = sum(batched[q] == naive[q] for q in prompts) / len(prompts)
    own = sum(targets[q] in batched[q] for q in prompts) / len(prompts)

    def side(stats: Any, wall: float) -> dict[str, Any]:
        return {"model_loads": stats.model_loads, "wall_s": round(wall, 2), "load_s": round(stats.load_s, 2),
                "generate_s": round(stats.generate_s, 2), "queries_per_s": round(len(prompts) / wall, 2)}  # fmt: skip

    return {
        "config": asdict(cfg),
        "queries": len(prompts),
        "distinct_models": bstats.distinct_models,
        "batched": side(bstats, t_batched),
        "per_query": side(nstats, t_naive),
        "speedup": round(t_naive / t_batched, 2),
        "answers_agree": agree,
        "some_recruit_right": own,
        "threads": torch.get_num_threads(),
    }


def format_result(r: dict[str, Any]) -> str:
    rows = [
        "| run | model loads | wall s | loading s | generating s | queries/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, key in (("batch by model", "batched"), ("per-query loop", "per_query")):
        s = r[key]
        rows.append(f"| {name} | {s['model_loads']} | {s['wall_s']} | {s['load_s']} | {s['generate_s']} | {s['queries_per_s']} |")
    rows.append(
        f"\n{r['queries']} queries × {r['config']['k']} recruits over {r['distinct_models']} models: batch by model "
        f"{r['speedup']}× faster; the two runs' answers agree on {100 * r['answers_agree']:.0f} % of queries."
    )
    return "\n".join(rows)
