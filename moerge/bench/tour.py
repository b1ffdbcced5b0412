"""``moerge demo``: a short tour of moerge on the embedded zoo, end to end on trained experts.

The registry (experts, versions, tasks, the artifacts routers stored), then one compact table per
method family — baselines, the routers (PHATGOOSE, GLIDER, Arrow, retrieval), the merges (static
and Twin-Merging), RouterRetriever on the retrieval suite and Symbolic-MoE on the zoo's
whole-model pool — each with a line saying what it shows. Everything is built here, once, into
the moerge cache; the evaluator's answers are cached beside the zoo (keyed by expert weights,
settings, tasks and device), so a rerun reads them instead of generating again. The full tables
with their spread are ``moerge bench all``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moerge.bench.quality import QualityReport

#: the tour's rows: the four routers, then the five merges (each a seed method or a baseline)
TOUR_ROUTERS = ("PHATGOOSE", "GLIDER", "Arrow", "retrieval")
TOUR_MERGES = ("uniform average", "task arithmetic", "TIES", "DARE-TIES", "Twin-Merging")
BASELINES = ("base", "best single expert", "oracle")

#: one line per table: what the table shows (not what it found; the figures say that)
WHAT = {
    "registry": "the experts this tour routes and merges: LoRAs trained on the zoo's tasks, registered with their tasks; "
    "the artifacts are what the routers prepared from them and stored once",
    "baselines": "the reference points: the base alone, the one expert best on validation for every task, and the "
    "oracle (each held-in task's own expert)",
    "routers": "routing among the LoRA experts per token (PHATGOOSE, GLIDER, Arrow) or per prompt (retrieval): "
    "compare with the oracle above; routing accuracy is the share of a task's prompt tokens × modules whose top-1 expert is the task's own",
    "merges": "one merged model for every task (static merges, hyper-parameters chosen on validation) against "
    "Twin-Merging's per-input merge of a shared model and compressed exclusive knowledge",
    "retrieval": "RouterRetriever: per-domain query-encoder LoRAs, routed per query by pilot embeddings, against "
    "the base encoder, one multi-task LoRA and the oracles (nDCG@10 from trec_eval)",
    "symbolic": "Symbolic-MoE: whole models recruited per question by skill profiles from validation, their answers "
    "aggregated by a model chosen on validation, against the best single model and random recruiting",
}


@dataclass
class Tour:
    """What the tour measured: the zoo's table (a :class:`QualityReport`, with the retrieval and
    Symbolic-MoE sections when run) and the registry's listing."""

    report: QualityReport
    registry: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)

    def sections(self) -> list[tuple[str, str, str]]:
        """(key, title, Markdown table) per section, in order."""
        from moerge.bench import retrieval as retrieval_bench
        from moerge.bench import symbolic as symbolic_bench

        r = self.report
        pre = f"zoo preset `{r.meta.get('preset')}`, {r.meta.get('n_test')} test prompts per task"
        out = [
            ("registry", f"The registry ({len(self.registry)} experts)", registry_markdown(self.registry)),
            ("baselines", f"Baselines ({pre})", r.markdown([n for n in BASELINES])),
        ]
        routers = list(r.meta.get("routers", {}))
        if routers:
            out.append(("routers", f"Routers ({pre})", r.markdown(["oracle", *routers])))
        merges = [n for n in r.meta.get("merges", {})]
        if merges:
            out.append(("merges", f"Merges ({pre})", r.markdown(["oracle", *merges])))
        if r.retrieval is not None:
            title = f"RouterRetriever (retrieval suite `{r.retrieval.get('preset', '?')}`, nDCG@10 per domain)"
            out.append(("retrieval", title, retrieval_bench.markdown(r.retrieval)))
        if r.symbolic is not None:
            title = (
                f"Symbolic-MoE (the zoo's whole-model pool, {r.symbolic['pool']['test_questions']} test questions, accuracy %)"
            )
            out.append(("symbolic", title, symbolic_bench.markdown(r.symbolic)))
        return out

    def markdown(self) -> str:
        parts = []
        for key, title, table in self.sections():
            parts.append(f"## {title}\n\n*What this shows:* {WHAT[key]}.\n\n{table}")
        return "\n\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), "registry": self.registry, "tour_seconds": self.seconds}


def registry_listing(registry: Any, names: Sequence[str], tasks: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Per expert: name, version, kind, tasks (its registered tags, else ``tasks[name]``), rank,
    and the artifacts stored for it (by producer)."""
    rows = []
    for name in names:
        rec = registry.get(name)
        producers = sorted({a["producer"] for a in registry.list_artifacts(rec)})
        own = list(rec.tasks) or list((tasks or {}).get(name, []))
        rows.append({"name": rec.name, "version": rec.version, "kind": rec.kind, "tasks": own,
                     "rank": rec.lora.r if rec.lora else None, "artifacts": producers})  # fmt: skip
    return rows


def registry_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| expert | version | kind | tasks | LoRA rank | stored artifacts |", "|---|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['version']} | {r['kind']} | {', '.join(r['tasks']) or '–'} | {r['rank'] or '–'} | "
                     f"{', '.join(r['artifacts']) or '–'} |")  # fmt: skip
    return "\n".join(lines)


def write(tour: Tour, out_dir: str | Path, json_path: str | Path | None = None) -> dict[str, Path]:
    """report.md, results.json (or ``json_path``) and cross_task.png under ``out_dir``."""
    from moerge.evaluation.report import plot_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_matrix(tour.report, out / "cross_task.png")
    md = out / "report.md"
    md.write_text(
        f"# moerge demo — a tour on the zoo preset `{tour.report.meta.get('preset')}`\n\n{tour.markdown()}\n\n"
        f"## Cross-task matrix (exact match %)\n\n{tour.report.matrix_markdown()}\n\n![cross-task matrix](cross_task.png)\n\n"
        f"The full tables, mean ± sd over seeds: `moerge bench all`.\n"
    )
    js = Path(json_path) if json_path else out / "results.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(tour.to_json(), indent=2))
    return {"markdown": md, "json": js, "png": png}


def run(
    zoo: Any,
    routers: Sequence[str] = TOUR_ROUTERS,
    merges: Sequence[str] = TOUR_MERGES,
    retrieval: str | None = "retrieval-small",
    symbolic: bool = True,
    cache_dir: str | Path | None = None,
    device: Any = "cpu",
    progress: bool | None = None,
    before_retrieval: Any = None,
    echo: Any = None,
) -> Tour:
    """The tour on a loaded ``zoo``: its table through :func:`~moerge.bench.quality.evaluate_zoo`
    (answers cached under ``<zoo>/eval-cache``), then RouterRetriever on the ``retrieval`` suite
    preset and Symbolic-MoE on the zoo's pool (without the per-query loading baseline, which is
    ``moerge bench symbolic``'s). ``before_retrieval``: called first (the demo waits there for
    its second process); ``echo``: a one-line progress printer."""
    from moerge.bench.quality import evaluate_zoo

    say = echo or (lambda _msg: None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    say(f"evaluating base, {len(zoo.held_in)} experts on {len(zoo.held_in) + len(zoo.held_out)} tasks, oracle, "
        f"routers ({', '.join(routers) or 'none'}), merges ({', '.join(merges) or 'none'}) through moerge.evaluate ...")  # fmt: skip
    report = evaluate_zoo(zoo, routers, merges, progress=progress, device=device, breakdown=False,
                          cache_dir=zoo.root / "eval-cache")  # fmt: skip
    seconds["evaluate"] = time.perf_counter() - t
    if symbolic:
        from moerge.bench import symbolic as symbolic_bench

        say("Symbolic-MoE: the whole-model pool (group models and aggregator trained once, cached), profiles, recruiting ...")
        t = time.perf_counter()
        report.symbolic = symbolic_bench.evaluate(zoo, per_query=False, progress=progress)
        seconds["symbolic"] = time.perf_counter() - t
    if retrieval is not None:
        from moerge.bench import retrieval as retrieval_bench

        if before_retrieval is not None:
            t = time.perf_counter()
            before_retrieval()
            seconds["retrieval_wait"] = time.perf_counter() - t
        say(f"RouterRetriever: retrieval suite {retrieval!r} (domain LoRAs trained once, cached) ...")
        t = time.perf_counter()
        report.retrieval = retrieval_bench.run(retrieval, cache_dir=cache_dir, progress=progress)
        report.retrieval.setdefault("preset", retrieval)
        seconds["retrieval"] = time.perf_counter() - t
    listing = registry_listing(zoo.registry, zoo.held_in, {t: [t] for t in zoo.held_in})  # the zoo's expert t: task t
    return Tour(report, listing, seconds)
