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


# ---------------------------------------------------------------------------------------------
# the demo's rows: accuracy of Symbolic-MoE against its baselines on the zoo's pool


def instruction_of(question: str) -> str:
    """The instruction part of a zoo question (``sort the letters : c a b =>`` → ``sort the
    letters``): what the offline annotator embeds, since the items carry no skill."""
    from moerge.zoo.tasks import SEP

    return question.split(f" {SEP} ", 1)[0]


def _accuracy(final: dict[str, str], test: dict[str, dict[str, Any]]) -> dict[str, Any]:
    hit = {q: " ".join(str(final[q]).split()) == v["answer"] for q, v in test.items()}
    groups: dict[str, list[bool]] = {}
    for q, v in test.items():
        groups.setdefault(v["group"], []).append(hit[q])
    return {
        "accuracy": round(100 * sum(hit.values()) / len(hit), 1),
        "groups": {g: round(100 * sum(h) / len(h), 1) for g, h in groups.items()},
    }


def evaluate(
    zoo: Any,
    pool: Any = None,
    registry_root: str | Path | None = None,
    annotate: str = "instruction",
    per_query: bool = True,
    progress: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Symbolic-MoE on the zoo's pool (:mod:`moerge.zoo.symbolic`), with the issue's rows: the
    best single model (chosen by validation accuracy), random 3 + aggregator, the majority vote
    of Symbolic-MoE's recruits, Symbolic-MoE, and the oracle (a query counts when any pool model
    answers it). Profiles are stored in the pool's registry (or a copy at ``registry_root``).
    ``annotate``: what the offline annotator embeds — ``"instruction"`` or ``"question"``.
    ``per_query``: also time the naive loop on the same recruitment."""

    from moerge.registry import Registry
    from moerge.symbolic import NearestQuestionAnnotator, SymbolicMoE
    from moerge.symbolic.execute import compact_aggregate_prompt as aggregate_template
    from moerge.zoo.symbolic import load_pool

    t0 = time.perf_counter()
    pool = pool or load_pool(zoo, progress=progress)
    build_s = time.perf_counter() - t0
    if registry_root is not None:
        if not Path(registry_root).exists():
            Registry(pool.root / "registry").snapshot(registry_root)
        reg = Registry(registry_root)
    else:
        reg = pool.registry
    p = pool.preset
    validation, test = pool.validation(), pool.test()
    questions = {q: v["question"] for q, v in test.items()}
    if annotate not in ("instruction", "question"):
        raise ValueError(f"annotate must be 'instruction' or 'question', got {annotate!r}")
    annotator = NearestQuestionAnnotator(
        {v["question"]: v["keywords"] for v in validation.values()}, text=instruction_of if annotate == "instruction" else None
    )
    gen = {"max_new_tokens": p.max_new_tokens, "batch_size": 128}
    moe = SymbolicMoE(reg, pool.models, annotator, aggregate_template=aggregate_template, seed=seed, **gen)
    t = time.perf_counter()
    moe.profile(validation, progress=progress)
    profile_s = time.perf_counter() - t
    val_acc = moe.report["profile"]["accuracy"]
    gamma = moe.competency
    t = time.perf_counter()
    candidates = [pool.aggregator, *sorted(pool.models, key=lambda m: -gamma[m])[:2]]
    moe.select_aggregator(candidates)
    select_s = time.perf_counter() - t

    # every pool model on every test question (one load each): the best single model and the oracle
    def loader(name: str) -> Any:
        return load_model_expert(reg, name)

    everyone = {q: Recruitment(list(pool.models), None) for q in questions}
    every, _ = run_batched(everyone, questions, loader, progress=progress, **gen)
    right = {q: [" ".join(a.split()) == test[q]["answer"] for a in every[q]] for q in questions}
    best = max(pool.models, key=lambda m: (val_acc[m], -pool.models.index(m)))
    bi = pool.models.index(best)
    oracle = {q: test[q]["answer"] if any(right[q]) else every[q][bi] for q in questions}

    recruited = moe.recruit(questions)
    sym = moe.run(questions, recruited=recruited, progress=progress)
    naive = moe.run(questions, recruited=recruited, per_query=True, progress=progress) if per_query else None
    rng = random.Random(seed)
    uniform = {q: Recruitment(rng.choices(pool.models, k=moe.k), None, "uniform") for q in questions}
    rand = moe.run(questions, recruited=uniform, progress=progress)

    def finals(run: dict[str, Any], key: str = "final") -> dict[str, str]:
        return {q: r[key] for q, r in run["results"].items()}

    def competent(run: dict[str, Any]) -> dict[str, bool]:
        idx = {m: i for i, m in enumerate(pool.models)}
        return {q: any(right[q][idx[m]] for m in r["experts"]) for q, r in run["results"].items()}

    methods = {
        "best single model": {**_accuracy({q: every[q][bi] for q in questions}, test), "model": best},
        "random 3 + aggregator": _accuracy(finals(rand), test),
        "majority vote of the recruited": _accuracy(finals(sym, "majority"), test),
        "Symbolic-MoE": _accuracy(finals(sym), test),
        "oracle (best model per query)": _accuracy(oracle, test),
    }
    methods["Symbolic-MoE"].update(model_loads=sym["model_loads"], distinct_models=sym["distinct_models"])

    def aggregator_given(run: dict[str, Any]) -> dict[str, Any]:
        comp = competent(run)
        out = {}
        for name, want in (("with a correct candidate", True), ("without one", False)):
            qs = [q for q in questions if comp[q] == want]
            hits = sum(" ".join(str(run["results"][q]["final"]).split()) == test[q]["answer"] for q in qs)
            out[name] = {"queries": len(qs), "accuracy": round(100 * hits / len(qs), 1) if qs else None}
        return out

    uniform_fallback = sum(r["how"] == "uniform" for r in sym["results"].values())
    speed = None
    if naive is not None:
        speed = {
            "batched": {"model_loads": sym["model_loads"], "wall_s": round(sym["seconds"], 2)},
            "per_query": {"model_loads": naive["model_loads"], "wall_s": round(naive["seconds"], 2)},
            "speedup": round(naive["seconds"] / sym["seconds"], 1),
            "answers_agree": sum(sym["results"][q]["final"] == naive["results"][q]["final"] for q in questions) / len(questions),
        }
    return {
        "pool": {
            "models": pool.models,
            "aggregator": moe.aggregator,
            "root": str(pool.root),
            "build_s": round(build_s, 1),
            "validation_questions": len(validation),
            "test_questions": len(test),
        },  # fmt: skip
        "methods": methods,
        "best_single": best,
        "validation_accuracy": {m: round(100 * a, 1) for m, a in val_acc.items()},
        "competency": {m: round(g, 3) for m, g in gamma.items()},
        "aggregator_selection": {m: round(100 * s, 1) for m, s in moe.report["aggregator_scores"].items()},
        "recruited_competent": {
            "Symbolic-MoE": round(100 * sum(competent(sym).values()) / len(questions), 1),
            "random 3": round(100 * sum(competent(rand).values()) / len(questions), 1),
        },
        "aggregator_given": {"Symbolic-MoE": aggregator_given(sym), "random 3": aggregator_given(rand)},
        "uniform_fallback": uniform_fallback,
        "speed": speed,
        "seconds": {
            "pool_build_or_load": round(build_s, 1),
            "profile": round(profile_s, 1),
            "select_aggregator": round(select_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },  # fmt: skip
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict[str, Any]) -> str:
    """The demo's Symbolic-MoE table: accuracy (%) per task group and overall, then the batch run."""
    methods = result["methods"]
    groups = list(next(iter(methods.values()))["groups"])
    lines = ["| method | " + " | ".join(groups) + " | overall |", "|---|" + "---:|" * (len(groups) + 1)]
    for name, m in methods.items():
        label = f"{name} ({m['model']})" if "model" in m else name
        lines.append(f"| {label} | " + " | ".join(f"{m['groups'][g]:.1f}" for g in groups) + f" | {m['accuracy']:.1f} |")
    sym = methods["Symbolic-MoE"]
    notes = [
        f"\n{result['pool']['test_questions']} test questions; {len(result['pool']['models'])} pool models; aggregator "
        f"{result['pool']['aggregator']!r} (synthetic benchmark on validation: "
        + ", ".join(f"{m} {v:.1f} %" for m, v in result["aggregator_selection"].items())
        + ").",
        f"Recruited sets holding a model that answers correctly: Symbolic-MoE {result['recruited_competent']['Symbolic-MoE']:.1f} %, "
        f"random 3 {result['recruited_competent']['random 3']:.1f} %.",
        f"Batch run: {sym['model_loads']} model loads = {sym['distinct_models']} distinct recruited models + 1 aggregator.",
    ]
    if result.get("speed"):
        sp = result["speed"]
        notes.append(
            f"Per-query loop on the same recruitment: {sp['per_query']['model_loads']} loads, {sp['per_query']['wall_s']} s, "
            f"against {sp['batched']['wall_s']} s batched ({sp['speedup']}× faster; the same final answers for "
            f"{100 * sp['answers_agree']:.0f} % of queries)."
        )
    return "\n".join(lines) + "\n" + "\n".join(notes)
