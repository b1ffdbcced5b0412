"""The quality table on the zoo: every method scored on every task (exact match), held-in
normalised score (expert on its own task = 100) and held-out accuracy. The table itself
(:class:`MethodRow`, :func:`method_row`, the heatmap) is :mod:`moerge.evaluation.report`'s."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moerge.device import DeviceLike
from moerge.evaluation.methods import METHODS, MethodSpec, call_params
from moerge.evaluation.report import QualityReport as _Report
from moerge.evaluation.report import plot_matrix
from moerge.zoo import Zoo
from moerge.zoo.tasks import get_task


@dataclass
class QualityReport(_Report):
    """The demo's table on the zoo: held-out tasks grouped by kind, and the other suites' sections."""

    #: RouterRetriever's Table 1 on the retrieval suite (:func:`moerge.bench.retrieval.run`), when run
    retrieval: dict[str, Any] | None = None
    #: Symbolic-MoE on the zoo's whole-model pool (:func:`moerge.bench.symbolic.evaluate`), when run
    symbolic: dict[str, Any] | None = None
    #: the positive control for token routing (:func:`moerge.bench.control.evaluate`), when run
    token_control: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.retrieval is not None:
            from moerge.bench.retrieval import to_json as retrieval_json

            out["retrieval"] = retrieval_json(self.retrieval)
        if self.symbolic is not None:
            out["symbolic"] = self.symbolic
        if self.token_control is not None:
            out["token_control"] = self.token_control
        return out

    def held_out_groups(self) -> dict[str, list[str]]:
        """The held-out tasks by kind: a held-in skill in unseen phrasings (one expert's skill:
        a router that finds that expert solves it) and compositions of two experts' skills."""
        groups: dict[str, list[str]] = {"unseen phrasings": [], "compositions": []}
        for t in self.held_out:
            groups["unseen phrasings" if len(get_task(t).uses) <= 1 else "compositions"].append(t)
        return groups


#: the routers in the demo table and how they are set up on the zoo
ZOO_ROUTERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "PHATGOOSE": ("phatgoose", {}, "top-2 per token and module; gates: 100 steps, batch 32"),
    "GLIDER": (
        "glider",
        {"expert_text": "description", "query_separator": " : "},
        "PHATGOOSE + α·cos(instruction, expert description); α chosen on the validation split",
    ),
    "GLIDER (templates shared)": (
        "glider",
        {"expert_text": "description+examples", "query_separator": " : "},
        "expert text = description + its training instructions, which are the held-in test templates; α on validation",
    ),
    "Arrow": ("arrow", {}, "top-2; prototype = top right singular vector of ΔW"),
    "retrieval": ("retrieval", {}, "top-1 expert of the nearest registered example (MiniLM)"),
}
#: GLIDER's α grid, scored on the held-in validation split (no test task's label is used)
GLIDER_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
#: the paper's presets, reported beside the chosen α for the headline GLIDER row
GLIDER_PRESETS = {"GLIDER, α=100 for all (paper's known-task preset)": 100.0, "GLIDER, α=3 for all (unseen-task preset)": 3.0}


def test_templates(zoo: Zoo) -> set[str]:
    """Every instruction template that occurs in the zoo's test prompts (all tasks)."""
    return {e.instruction for t in zoo.held_in + zoo.held_out for e in zoo.test_split(t)}


def preparation_texts(zoo: Zoo, router: str, config: dict[str, Any]) -> dict[str, list[str]]:
    """What a router of the demo is prepared from, by kind: ``expert_texts`` (GLIDER's global
    router), ``data`` (the experts' training prompts: PHATGOOSE/GLIDER gates, retrieval's bank)."""
    from moerge.routers.glider import expert_text

    out: dict[str, list[str]] = {}
    if router == "glider":
        reg = zoo.registry
        out["expert_texts"] = [expert_text(reg.get(e), config["expert_text"], config.get("query_separator")) for e in zoo.held_in]
    if router in ("phatgoose", "glider", "retrieval"):
        out["data"] = [p for e in zoo.held_in for p, _ in zoo.expert_data(e)]
    return out


def template_overlap(zoo: Zoo, router: str, config: dict[str, Any]) -> dict[str, int]:
    """Per kind of preparation text: how many of the test prompts' instruction templates occur in
    it (as a substring: a template quoted in an expert text counts)."""
    templates = test_templates(zoo)
    out = {}
    for kind, texts in preparation_texts(zoo, router, config).items():
        blob = "\n".join(texts)
        out[kind] = sum(t in blob for t in templates)
    return out


#: held-in test prompts per task for the routing breakdown
ROUTING_EXAMPLES = 50


def _gate_snr(zoo: Zoo, model: Any, device: DeviceLike, progress: bool | None) -> dict[str, float]:
    """PHATGOOSE's gates trained again with another seed (stored like the first), compared."""
    from moerge.bench.diagnostics import gate_signal_to_noise
    from moerge.composer import compose

    other = compose(zoo.base_path, zoo.registry.select(names=zoo.held_in), "phatgoose", data=zoo.expert_data,
                    progress=progress, device=device, dtype="float32", seed=model.router.config.seed + 1)  # fmt: skip
    return gate_signal_to_noise(model.router.keys, other.router.keys)


#: the merges in the demo table: moerge eval's own merge methods under the demo's labels. Every grid point is scored on the
#: zoo's validation split (mean exact match over the held-in tasks); the best is reported on test. LoRAHub has no grid: its
#: weights are searched on each task's first validation examples.
ZOO_MERGES: dict[str, MethodSpec] = {
    METHODS[m].label: replace(METHODS[m], name=METHODS[m].label, router=m)
    for m in (
        "average",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "twin",
        "lorahub",
        "adamerging",
        # mergekit's other merges over task vectors, run by name (bench all --merges ...)
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "sce",
        "model_stock",
        "multislerp",
    )  # fmt: skip
}


#: the methods with a seed of their own (gate training, the Twin router's training, DARE's drop masks)
SEEDED = ("phatgoose", "glider", "twin", "dare_ties", "della", "lorahub", "adamerging")


def router_specs(routers: Sequence[str]) -> list[MethodSpec]:
    """The demo's router rows as evaluator methods (GLIDER's α on validation; after the headline
    GLIDER, the paper's two presets)."""
    out = []
    for label in routers:
        name, cfg, notes = ZOO_ROUTERS[label]
        grid = {"alpha": GLIDER_ALPHAS} if name == "glider" else {}
        live = frozenset({"top_k", "alpha", "temperature"})
        uses_data = name in ("phatgoose", "glider", "retrieval")
        out.append(MethodSpec(label, "router", label, notes, grid=grid, fixed=cfg, live=live, uses_data=uses_data, router=name))
        if label == "GLIDER":
            for plabel, a in GLIDER_PRESETS.items():
                out.append(MethodSpec(plabel, "router", plabel, "the headline GLIDER with the preset's α",
                                      grid={"alpha": (a,)}, fixed=cfg, live=live, uses_data=True, router="glider"))  # fmt: skip
    return out


def _routing_hook(zoo: Zoo, device: DeviceLike, progress: bool | None) -> Any:
    """The demo's routing accuracy: token routers on the held-in test prompts' item tokens
    (:func:`~moerge.bench.diagnostics.routing_breakdown`, by token type), PHATGOOSE's gate
    signal-to-noise, and Twin-Merging's per-input choice on the first 100 prompts per task."""
    from moerge.bench.diagnostics import routing_breakdown

    def hook(spec: MethodSpec, model: Any, prompts: dict[str, list[str]]) -> dict[str, Any]:
        if spec.family == "twin":
            top, _ = model.token_routing([e.prompt for t in zoo.held_in for e in zoo.test_split(t)[:100]])
            labels = torch.tensor([model.experts.index(t) for t in zoo.held_in for _ in zoo.test_split(t)[:100]])
            acc = float((top[0, :, -1] == labels).float().mean())
            return {"accuracy": acc, "router": model.router.router_metrics, "stored": model.router.stored}
        examples = [e for t in zoo.held_in for e in zoo.test_split(t)[:ROUTING_EXAMPLES]]
        own = [model.experts.index(t) for t in zoo.held_in for _ in zoo.test_split(t)[:ROUTING_EXAMPLES]]
        breakdown = routing_breakdown(model, examples, own)
        out = {"accuracy": breakdown["by_type"]["input"], "breakdown": breakdown, "config": model.router.config.to_json()}
        if spec.runs == "phatgoose":
            out["gate_snr"] = _gate_snr(zoo, model, device, progress)
        return out

    return hook


def evaluate_zoo(
    zoo: Zoo,
    routers: Sequence[str] = (),
    merges: Sequence[str] = (),
    progress: bool | None = None,
    device: DeviceLike = "cpu",
    breakdown: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> QualityReport:
    """The demo's table on the zoo, through :func:`moerge.evaluate`: the zoo's tasks exported in
    the task-set format (under the zoo's folder), its LoRA experts tagged with their own task,
    the base, every expert on every task, the oracle, the best single expert, then ``routers``
    (:data:`ZOO_ROUTERS`) and ``merges`` (:data:`ZOO_MERGES`), each hyper-parameter chosen on
    the validation split. What is the zoo's own: the method variants, the routing breakdown by
    token type, and the meta the demo has always written (``meta.routers``, ``meta.merges``).

    ``breakdown=False`` (the tour): routing accuracy is the evaluator's own (top-1 expert over
    every held-in prompt token × module), cached like the answers, and PHATGOOSE's gate
    signal-to-noise is not measured. ``cache_dir``: keep the evaluator's answers there (keyed
    by expert weights, settings, tasks and device), so a rerun recomputes only what changed;
    None: a scratch folder for this run. ``seed``: the methods' own seeds (PHATGOOSE's and
    GLIDER's gate training, Twin-Merging's router, DARE's masks); the zoo has its own."""
    import tempfile

    from moerge.evaluation import evaluate
    from moerge.zoo.export import export_task_set

    t0 = time.perf_counter()
    tasks = export_task_set(zoo.root / "tasks", zoo.preset)
    specs = [METHODS["base"], METHODS["experts"], METHODS["oracle"], *router_specs(routers), *(ZOO_MERGES[m] for m in merges)]
    if seed:  # seed 0 is every method's default: the specs (and their cache keys) stay as they are
        specs = [replace(s, fixed={**s.fixed, "seed": seed}) if s.router in SEEDED else s for s in specs]
    with tempfile.TemporaryDirectory(prefix="moerge-demo-") as scratch:  # shares answers between equal grid points in this run
        ev = evaluate(
            zoo.registry, tasks, base=str(zoo.base_path), methods=specs, experts=zoo.held_in,
            expert_tasks={t: [t] for t in zoo.held_in}, device=device, dtype="float32", batch_size=256,
            cache_dir=cache_dir or scratch, progress=progress,
            routing=_routing_hook(zoo, device, progress) if breakdown else None,
        )  # fmt: skip
    report_cache = ev.meta.get("cache", {})
    rows = [r for r in ev.rows if not r.name.startswith("expert:")]
    report = QualityReport(held_in=zoo.held_in, held_out=zoo.held_out, experts=zoo.held_in, matrix=ev.matrix, rows=[],
                           routing_tokens="item tokens" if breakdown else "prompt tokens",
                           meta={"preset": zoo.preset.name, "n_test": zoo.preset.n_test, "zoo_build": zoo.meta.get("timings", {}),
                                 "threads": torch.get_num_threads(), "evaluation": {k: ev.meta[k] for k in ("seconds", "tasks")},
                                 "eval_cache": {k: report_cache.get(k) for k in ("hits", "misses")}})  # fmt: skip
    methods, seconds = ev.meta["methods"], ev.meta["seconds"]
    n_templates = len(test_templates(zoo))
    chosen_alpha = methods.get("GLIDER", {}).get("chosen", {}).get("alpha")
    for row in rows:
        res = methods.get(row.name)
        if row.name in GLIDER_PRESETS and GLIDER_PRESETS[row.name] == chosen_alpha:
            continue  # the chosen α's row already says it
        report.rows.append(row)
        if res is None:
            continue
        if row.name in ZOO_ROUTERS:
            name, cfg, notes = ZOO_ROUTERS[row.name]
            routing = res.get("routing", {})  # the zoo's breakdown, when measured
            meta: dict[str, Any] = {"routing": routing.get("breakdown"), "router": name, "config": routing.get("config"),
                                    "prepare_seconds": seconds.get(f"{row.name} build", 0.0), "seconds": seconds.get(row.name, 0.0)}  # fmt: skip
            if name == "glider":
                alpha = res["chosen"]["alpha"]
                meta["alpha_validation"] = {str(v["params"]["alpha"]): v["mean"] for v in res["validation"]}
                meta["alpha"] = alpha
                notes = f"{notes} (α={alpha:g})"
            overlap = template_overlap(zoo, name, cfg)
            meta["test_templates_in_preparation"] = {**overlap, "of": n_templates}
            if overlap:
                notes += "; test templates in its " + ", ".join(
                    f"{k.replace('_', ' ')}: {v}/{n_templates}" for k, v in overlap.items()
                )
            else:
                notes += "; prepared from the weights alone"
            if "gate_snr" in routing:
                meta["gate_snr"] = routing["gate_snr"]
            row.notes = notes
            report.meta.setdefault("routers", {})[row.name] = meta
        elif row.name in GLIDER_PRESETS:
            row.notes = "the headline GLIDER with the preset's α"
            report.meta.setdefault("routers", {})[row.name] = {"router": "glider", "alpha": GLIDER_PRESETS[row.name], "routing": res.get("routing", {}).get("breakdown")}  # fmt: skip
        elif row.name in ZOO_MERGES:
            spec = ZOO_MERGES[row.name]
            meta = {"method": spec.runs, "chosen": call_params(spec, res["chosen"]),
                    "grid": [{"params": call_params(spec, v["params"]), "val_exact_match": 100 * v["mean"]} for v in res["validation"]],
                    "seconds": seconds.get(row.name, 0.0)}  # fmt: skip
            if spec.family == "twin" and "routing" in res:
                meta.update(router=res["routing"]["router"], stored=res["routing"]["stored"])
            if spec.family == "lorahub":  # each task's searched weights and its examples' loss before and after
                meta.update(weights=res["weights"], loss=res["loss"])
            if spec.family == "adamerging":  # the learnt λ and the summed entropy at the prior and at the end
                meta.update(res["learnt"])
            report.meta.setdefault("merges", {})[row.name] = meta
    report.meta["eval_seconds"] = time.perf_counter() - t0
    return report


def write_report(report: QualityReport, out_dir: str | Path, json_path: str | Path | None = None) -> dict[str, Path]:
    """report.md, results.json (or ``json_path``) and cross_task.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_matrix(report, out / "cross_task.png")
    md = out / "report.md"
    build = report.meta.get("zoo_build", {})
    md.write_text(
        f"# moerge bench all — zoo preset `{report.meta.get('preset')}`\n\n"
        f"{report.markdown()}\n\n"
        "Held-in normalised: mean over held-in tasks of 100 × score / (the task's own expert's score). "
        f"Held-out: mean exact match over {', '.join(report.held_out)}.\n\n"
        f"## Cross-task matrix (exact match %, {report.meta.get('n_test')} test prompts per task)\n\n"
        f"{report.matrix_markdown()}\n\n![cross-task matrix](cross_task.png)\n\n"
        f"Zoo build: {build.get('total_s', float('nan')):.0f} s (when built); evaluation: {report.meta['eval_seconds']:.0f} s.\n"
    )
    if report.retrieval is not None:
        from moerge.bench.retrieval import markdown as retrieval_markdown

        with open(md, "a", encoding="utf-8") as fh:
            fh.write(
                f"\n## Retrieval (RouterRetriever's Table 1, nDCG@10 on each domain's test queries)\n\n{retrieval_markdown(report.retrieval)}\n"
            )
    if report.symbolic is not None:
        from moerge.bench.symbolic import markdown as symbolic_markdown

        with open(md, "a", encoding="utf-8") as fh:
            fh.write(
                f"\n## Symbolic-MoE (accuracy %, exact match, on the zoo's whole-model pool)\n\n{symbolic_markdown(report.symbolic)}\n"
            )
    if report.token_control is not None:
        from moerge.bench.control import markdown as control_markdown

        with open(md, "a", encoding="utf-8") as fh:
            fh.write(
                f"\n## Token routing, positive control (disjoint-vocabulary experts)\n\n{control_markdown(report.token_control)}\n"
            )
    js = Path(json_path) if json_path else out / "results.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report.to_json(), indent=2))
    return {"markdown": md, "json": js, "png": png}
