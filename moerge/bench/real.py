"""``moerge bench real``: the methods on the real LM (SmolLM2-135M-Instruct from its GGUF) and the
real-language suite, through :func:`moerge.evaluate` like a user's own pool (issue 27).

The experts are built once and cached (:func:`moerge.zoo.real.build_pool`); the evaluator chooses
every hyper-parameter on the validation splits and caches its answers, so a rerun recomputes only
what changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: the methods of a full run: baselines, routers, merges (Symbolic-MoE over whole models: not yet)
METHODS = ("base", "experts", "oracle", "phatgoose", "glider", "arrow", "retrieval", "average", "task_arithmetic", "ties", "twin")


def run(
    preset: Any = None,
    methods: Sequence[str] = METHODS,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    device: Any = "cpu",
    dtype: Any = "float32",
    batch_size: int = 32,
    out: str | Path | None = None,
    json_path: str | Path | None = None,
    progress: bool | None = None,
) -> Any:
    """Build (or find) the experts, then score ``methods`` on the suite; returns the evaluator's report."""
    from moerge.evaluation import evaluate, load_task_set
    from moerge.zoo.real import build_pool
    from moerge.zoo.real_tasks import TASKS

    pool = build_pool(preset, cache_dir=cache_dir, progress=progress)
    # a run on some experts: their tasks, and the held-out tasks drawing on those alone
    names = [t.name for t in TASKS if t.name in pool.experts or (t.uses and set(t.uses) <= set(pool.experts))]
    report = evaluate(pool.registry_path, load_task_set(pool.tasks_path, names), base=str(pool.gguf), methods=list(methods), experts=pool.experts,
                      expert_tasks={t: [t] for t in pool.experts}, device=device, dtype=dtype, limit=limit,
                      batch_size=batch_size, cache_dir=pool.root / "eval-cache", out=out, json_path=json_path,
                      progress=progress)  # fmt: skip
    report.meta["real"] = {"root": str(pool.root), "preset": asdict(pool.preset) | {"tasks": list(pool.experts)},
                           "experts": pool.meta.get("experts", {}), "descriptions": pool.meta.get("descriptions", {})}  # fmt: skip
    return report
