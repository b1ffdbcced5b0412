"""Symbolic-MoE in ``moerge eval``: the registry's whole-model experts (kind ``model``) recruited
per query from skill profiles, answers aggregated; beside it the majority vote of the recruited
and the best single model. Everything Symbolic-MoE learns comes from the held-in tasks'
validation splits: each validation question's keyword is its task's name, the profiles are
each model's accuracy per keyword there (a model's answer is judged as the task judges it: cut at
its stop strings, its metric and normalisation, any of its targets; right when the score is at
least 0.5, i.e. 1 for the built-in metrics), and the aggregator is chosen there too unless the
caller names one. A test query takes the keywords of its nearest validation questions (MiniLM, the
offline annotator).

Chat-formatted tasks (one user message) are asked through each model's own chat template, as
:func:`moerge.symbolic.execute.generate` does for every model that has one."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from moerge.evaluation.metrics import cut_at_stop, metric_fn
from moerge.evaluation.report import MethodRow, QualityReport, method_row

#: models recruited per query (the paper's k)
K = 3


def task_check(tasks: Any) -> Any:
    """``check(response, answer)`` for Symbolic-MoE's profiling and aggregator choice, where
    ``answer`` is :func:`gold`'s key: the response is judged by its task's own metric."""
    fns = {t: metric_fn(tasks[t].spec.metric, tasks[t].spec.normalize) for t in tasks.tasks}

    def check(response: str, answer: str) -> bool:
        task, *targets = json.loads(answer)
        return fns[task](cut_at_stop(response, tasks[task].spec.stop), tuple(targets)) >= 0.5

    return check


def gold(task: str, targets: Any) -> str:
    """A validation question's answer as Symbolic-MoE stores it: its task and every right answer
    (JSON), so a profile is keyed by them and judged by that task's metric."""
    return json.dumps([task, *targets])


def evaluate_symbolic(pool: Any, specs: Mapping[str, Any], *, device: Any, dtype: Any, batch_size: int,
                      progress: bool | None, seed: int = 0, k: int = K, aggregator: str | None = None) -> QualityReport:  # fmt: skip
    """The table for ``specs`` (families ``symbolic``) over ``pool`` (a ``_Pool`` of model experts).
    ``seed``: recruiting's draws and the aggregator benchmark's; ``k``: models recruited per
    query; ``aggregator``: a registered whole model that aggregates (default: the pool's model
    best on the aggregation benchmark built from validation, spec §3.5)."""
    from moerge.symbolic import NearestQuestionAnnotator, SymbolicMoE
    from moerge.symbolic.execute import load_model_expert, run_batched
    from moerge.symbolic.recruit import Recruitment

    t0 = time.perf_counter()
    tasks = pool.tasks
    held_in, held_out = tasks.held_in, tasks.held_out
    validation = {
        f"{t}/{i}": {"question": p, "answer": gold(t, ts), "keywords": [t]}
        for t in held_in
        for i, (p, ts) in enumerate(zip(pool.prompts[t, "validation"], pool.targets[t, "validation"], strict=True))
    }
    if not validation:
        raise ValueError("Symbolic-MoE profiles its models on the held-in tasks' validation splits, and there are none")
    questions = {f"{t}/{i}": p for t in held_in + held_out for i, p in enumerate(pool.prompts[t, "test"])}
    task_of = {q: q.rsplit("/", 1)[0] for q in questions}
    max_new = max(tasks[t].spec.max_new_tokens for t in tasks.tasks)
    gen = {"max_new_tokens": max_new, "batch_size": batch_size}
    annotator = NearestQuestionAnnotator({v["question"]: v["keywords"] for v in validation.values()})
    moe = SymbolicMoE(pool.reg, pool.names, annotator, aggregator=aggregator, seed=seed, k=k, device=str(device),
                      dtype=dtype, check=task_check(tasks), **gen)  # fmt: skip
    moe.profile(validation, progress=progress)
    val_acc = moe.report["profile"]["accuracy"]
    if aggregator is None:
        moe.select_aggregator(progress=progress)

    def loader(name: str) -> Any:
        return load_model_expert(pool.reg, name, device=str(device), dtype=dtype)

    every, every_stats = run_batched({q: Recruitment(list(pool.names), None) for q in questions}, questions, loader,
                                     progress=progress, **gen)  # fmt: skip
    # every model has answered every test query already (the matrix): recruiting reuses those answers
    known = {m: {q: every[q][j] for q in questions} for j, m in enumerate(pool.names)}
    sym = moe.run(questions, progress=progress, known=known)

    def per_task(answers: Mapping[str, str]) -> dict[str, float]:
        out = {}
        for t in held_in + held_out:
            qs = [q for q in questions if task_of[q] == t]
            cut = [cut_at_stop(answers[q], tasks[t].spec.stop) for q in qs]
            out[t] = pool.score(t, "test", cut)
        return out

    matrix = {m: per_task({q: every[q][j] for q in questions}) for j, m in enumerate(pool.names)}
    report = QualityReport(held_in=held_in, held_out=held_out, experts=pool.names, matrix=matrix, rows=[],
                           groups=tasks.held_out_groups(), own_experts={t: pool.own[t] for t in held_in})  # fmt: skip
    own = report.own_scores()
    best = max(pool.names, key=lambda m: (val_acc[m], -pool.names.index(m)))  # chosen on validation
    rows: dict[str, MethodRow] = {
        "best_single": method_row(
            "best single model",
            matrix[best],
            held_in,
            held_out,
            own,
            f"{best}: the best validation accuracy ({100 * val_acc[best]:.1f} %)",
        ),  # fmt: skip
        "majority_vote": method_row(
            "majority vote of the recruited",
            per_task({q: r["majority"] for q, r in sym["results"].items()}),
            held_in,
            held_out,
            own,
            f"the {k} models Symbolic-MoE recruits per query, majority answer",
        ),  # fmt: skip
        "symbolic_moe": method_row(
            "Symbolic-MoE",
            per_task({q: r["final"] for q, r in sym["results"].items()}),
            held_in,
            held_out,
            own,
            f"{k} recruited per query from validation profiles (seed {seed}), aggregated by {sym['aggregator']} "
            f"({'chosen on validation' if aggregator is None else 'named by the caller'})",
        ),  # fmt: skip
    }
    for spec in specs.values():
        row = rows[spec.runs]
        if spec.runs == "symbolic_moe":
            loads = sym["model_loads"]
            row.notes += (f"; {loads} model load{'s' * (loads != 1)} for {len(questions)} queries (batch by model; "
                          f"{sym['reused_answers']} recruited answers reused from the every-model run)")  # fmt: skip
        row.test_prompts_in_preparation = sum(p in {v["question"] for v in validation.values()} for p in questions.values())
        report.rows.append(row)
    own_hit = [
        any(m in pool.own.get(task_of[q], []) for m in r["experts"]) for q, r in sym["results"].items() if task_of[q] in held_in
    ]
    report.meta = {
        "symbolic": {
            "k": k, "seed": seed, "aggregator": sym["aggregator"], "aggregator_chosen": aggregator is None,
            "aggregator_scores": moe.report.get("aggregator_scores"),
            "best_single": best, "validation_accuracy": val_acc, "profiles": moe.profiles,
            "model_loads": sym["model_loads"], "distinct_models": sym["distinct_models"],
            "reused_answers": sym["reused_answers"],
            "every_model_loads": every_stats.model_loads,
            "recruited_own_model_share": sum(own_hit) / len(own_hit) if own_hit else None,
            "seconds": time.perf_counter() - t0,
        }
    }  # fmt: skip
    return report
