"""The quality table on the zoo: every method scored on every task (exact match), held-in
normalised score (expert on its own task = 100) and held-out accuracy. The table itself
(:class:`MethodRow`, :func:`method_row`, the heatmap) is :mod:`moerge.evaluation.report`'s."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.adapters import attach, detach, load_lora, one_hot, use_weights
from moerge.device import DeviceLike, module_device, resolve_device
from moerge.evaluation.report import MethodRow, method_row, plot_matrix
from moerge.evaluation.report import QualityReport as _Report
from moerge.progress import progress_bar
from moerge.zoo import Zoo, exact_match
from moerge.zoo.tasks import get_task
from moerge.zoo.train import generate_answers


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


def evaluate_zoo(zoo: Zoo, progress: bool | None = None, max_new_tokens: int = 8, device: DeviceLike = "cpu") -> QualityReport:
    """Base, every LoRA expert on every task (one mixed-expert batch per task through the
    multi-expert layer), the oracle and the best single expert."""
    t0 = time.perf_counter()
    reg = zoo.registry
    tok = zoo.tokenizer()
    model = zoo.load_base(device)
    experts = zoo.held_in
    tasks = zoo.held_in + zoo.held_out
    attach(model, [load_lora(name, registry=reg, device=module_device(model)) for name in experts])
    matrix: dict[str, dict[str, float]] = {e: {} for e in experts}
    base_scores: dict[str, float] = {}
    try:
        for task in progress_bar(tasks, desc="evaluate", progress=progress):
            test = zoo.test_split(task)
            prompts = [e.prompt for e in test]
            n = len(prompts)
            # rows: base (-1) then each expert, all in one mixed batch
            batch_prompts = prompts * (len(experts) + 1)
            assign = [-1] * n + [e for e in range(len(experts)) for _ in range(n)]
            answers: list[str] = []
            chunk = 256
            for i in range(0, len(batch_prompts), chunk):
                w = one_hot(assign[i : i + chunk], len(experts))
                with use_weights(model, w):
                    answers += generate_answers(
                        model, tok, batch_prompts[i : i + chunk], max_new_tokens=max_new_tokens, batch_size=chunk
                    )
            base_scores[task] = exact_match(answers[:n], test)
            for e, name in enumerate(experts):
                matrix[name][task] = exact_match(answers[(e + 1) * n : (e + 2) * n], test)
    finally:
        detach(model)
    own = {t: matrix[t][t] for t in zoo.held_in}
    rows = [method_row("base", base_scores, zoo.held_in, zoo.held_out, own, "the base model alone")]
    oracle = {t: matrix[t][t] for t in zoo.held_in}
    oracle.update({t: max(matrix[e][t] for e in experts) for t in zoo.held_out})
    rows.append(
        method_row(
            "oracle",
            oracle,
            zoo.held_in,
            zoo.held_out,
            own,
            "own expert per held-in task; best single expert per held-out task (hindsight)",
        )
    )
    singles = [method_row(f"expert:{e}", matrix[e], zoo.held_in, zoo.held_out, own) for e in experts]
    best = max(singles, key=lambda r: (r.held_in_normalized, r.held_out_accuracy))
    rows.append(MethodRow(**{**asdict(best), "name": "best single expert", "notes": best.name.removeprefix("expert:")}))
    return QualityReport(
        held_in=zoo.held_in,
        held_out=zoo.held_out,
        experts=experts,
        matrix=matrix,
        rows=rows,
        meta={
            "preset": zoo.preset.name,
            "n_test": zoo.preset.n_test,
            "eval_seconds": time.perf_counter() - t0,
            "zoo_build": zoo.meta.get("timings", {}),
            "threads": torch.get_num_threads(),
        },
    )


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


def _validation_score(model: Any, zoo: Zoo, max_new_tokens: int, n: int = 64) -> float:
    """Mean exact match over the held-in tasks' validation splits."""
    scores = []
    for task in zoo.held_in:
        val = zoo.val_split(task)[:n]
        scores.append(exact_match(model.generate([e.prompt for e in val], max_new_tokens=max_new_tokens, batch_size=256), val))
    return sum(scores) / len(scores)


def evaluate_routers(
    zoo: Zoo,
    report: QualityReport,
    routers: Sequence[str] = tuple(ZOO_ROUTERS),
    progress: bool | None = None,
    max_new_tokens: int = 8,
    device: DeviceLike = "cpu",
) -> list[MethodRow]:
    """Add a row per router (composed over the zoo's LoRA experts; per-expert artifacts are
    prepared once and cached in the zoo's registry): exact match per task, and routing accuracy
    on held-in tasks. GLIDER's α is chosen on the held-in validation split from
    :data:`GLIDER_ALPHAS` and used for every test task (a deployed router does not know whether a
    task is held out); the headline GLIDER row also reports the paper's two presets. Each row
    says how many test instruction templates occur in what the router was prepared from."""
    from moerge.composer import compose

    reg = zoo.registry
    own = report.own_scores()
    rows = []
    n_templates = len(test_templates(zoo))

    def score(model: Any, label: str) -> tuple[dict[str, float], dict[str, Any]]:
        from moerge.bench.diagnostics import routing_breakdown

        per_task: dict[str, float] = {}
        for task in progress_bar(zoo.held_in + zoo.held_out, desc=label, progress=progress):
            test = zoo.test_split(task)
            answers = model.generate([e.prompt for e in test], max_new_tokens=max_new_tokens, batch_size=256)
            per_task[task] = exact_match(answers, test)
        examples = [e for t in zoo.held_in for e in zoo.test_split(t)[:ROUTING_EXAMPLES]]
        own = [model.experts.index(t) for t in zoo.held_in for _ in zoo.test_split(t)[:ROUTING_EXAMPLES]]
        return per_task, routing_breakdown(model, examples, own)

    for label in routers:
        name, cfg, notes = ZOO_ROUTERS[label]
        t0 = time.perf_counter()
        model = compose(
            zoo.base_path,
            reg.select(names=zoo.held_in),
            name,
            data=zoo.expert_data,
            progress=progress,
            device=device,
            dtype="float32",
            **cfg,
        )
        prep = time.perf_counter() - t0
        meta: dict[str, Any] = {}
        if name == "glider":
            val = {}
            for a in GLIDER_ALPHAS:
                model.router.config = model.router.config.model_copy(update={"alpha": a})
                val[a] = _validation_score(model, zoo, max_new_tokens)
            alpha = max(GLIDER_ALPHAS, key=lambda a: val[a])  # ties: the smaller α (first in the grid)
            model.router.config = model.router.config.model_copy(update={"alpha": alpha})
            meta["alpha_validation"] = {str(a): v for a, v in val.items()}
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
        per_task, breakdown = score(model, label)
        row = method_row(label, per_task, zoo.held_in, zoo.held_out, own, notes)
        row.routing_accuracy = breakdown["by_type"]["input"]
        if name == "phatgoose":
            meta["gate_snr"] = _gate_snr(zoo, model, device, progress)
        report.meta.setdefault("routers", {})[label] = {
            "routing": breakdown,
            "router": name,
            "config": model.router.config.to_json(),
            "prepare_seconds": prep,
            "seconds": time.perf_counter() - t0,
            **meta,
        }
        rows.append(row)
        report.rows.append(row)
        if label == "GLIDER":
            for plabel, a in GLIDER_PRESETS.items():
                if a == meta["alpha"]:  # the chosen α's row already says it
                    continue
                model.router.config = model.router.config.model_copy(update={"alpha": a})
                per_task, breakdown = score(model, plabel)
                prow = method_row(plabel, per_task, zoo.held_in, zoo.held_out, own, "the headline GLIDER with the preset's α")
                prow.routing_accuracy = breakdown["by_type"]["input"]
                report.meta["routers"][plabel] = {"router": "glider", "alpha": a, "routing": breakdown}
                rows.append(prow)
                report.rows.append(prow)
    return rows


#: the merges in the demo table: label → (method, hyper-parameter grid, notes). Every grid
#: point is scored on the zoo's validation split (held-in normalised); the best is reported on test.
ZOO_MERGES: dict[str, tuple[str, list[dict[str, Any]], str]] = {
    "uniform average": ("average", [{}], "mean of the experts' ΔW"),
    "task arithmetic": ("task_arithmetic", [{"lambda": x} for x in (0.3, 0.5, 1.0)], "λ·Σ ΔW"),
    "TIES": ("ties", [{"density": d, "lambda": x} for d in (0.2, 0.5) for x in (0.5, 1.0)], "trim, elect sign, disjoint mean"),
    "DARE-TIES": (
        "dare_ties",
        [{"density": d, "lambda": x, "seed": 0} for d in (0.3, 0.5) for x in (0.5, 1.0)],
        "drop-and-rescale, then TIES",
    ),
    "Twin-Merging": (
        "twin",
        [{"rank": r, "shared_params": {"lambda": x}} for r in (None, 16, 32) for x in (0.3, 0.5)],
        "TA shared expert + SVD twin vectors + MLP router, exact per-input merge",
    ),
}


def _lora_bytes(loras: Sequence[Any]) -> int:
    return 4 * sum(f.A.numel() + f.B.numel() for e in loras for f in e.modules.values())


def _dense_delta_bytes(loras: Sequence[Any]) -> int:
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for e in loras for m, f in e.modules.items()}
    return 4 * sum(a * b for a, b in shapes.values())


def _score(zoo: Zoo, answer: Any, tasks: Sequence[str], split: str) -> dict[str, float]:
    out = {}
    for task in tasks:
        data = zoo.val_split(task) if split == "val" else zoo.test_split(task)
        out[task] = exact_match(answer([e.prompt for e in data]), data)
    return out


def evaluate_merges(
    zoo: Zoo,
    report: QualityReport,
    merges: Sequence[str] = tuple(ZOO_MERGES),
    progress: bool | None = None,
    max_new_tokens: int = 8,
    device: DeviceLike = "cpu",
) -> list[MethodRow]:
    """Add a row per merge: static merges folded into the base, Twin-Merging composed; each
    grid point scored on the validation split, the best (held-in normalised) then on test."""
    from moerge.composer import compose, merge

    reg = zoo.registry
    own = report.own_scores()
    tok = zoo.tokenizer()
    loras = [load_lora(n, registry=reg) for n in zoo.held_in]
    experts_bytes = _lora_bytes(loras)
    rows = []
    for label in merges:
        method, grid, notes = ZOO_MERGES[label]
        t0 = time.perf_counter()
        best: tuple[float, dict[str, Any], Any] | None = None
        tried = []
        for params in progress_bar(grid, desc=label, progress=progress):
            if method == "twin":
                built = compose(
                    zoo.base_path,
                    reg.select(names=zoo.held_in),
                    "twin",
                    data=zoo.expert_data,
                    device=device,
                    dtype="float32",
                    **params,
                )

                def answer(prompts: list[str], m: Any = built) -> list[str]:
                    return m.generate(prompts, max_new_tokens=max_new_tokens, batch_size=256)

            else:
                built = merge(zoo.base_path, reg.select(names=zoo.held_in), method, output="model", device=device, **params).to(
                    resolve_device(device)
                )

                def answer(prompts: list[str], m: Any = built) -> list[str]:
                    return generate_answers(m, tok, prompts, max_new_tokens=max_new_tokens, batch_size=256)

            val_scores = _score(zoo, answer, zoo.held_in, "val")
            score = 100 * sum(val_scores.values()) / len(val_scores)  # mean validation exact match (%)
            tried.append({"params": params, "val_exact_match": score})
            if best is None or score > best[0]:
                best = (score, params, (built, answer))
        assert best is not None
        _, params, (built, answer) = best
        row = method_row(label, _score(zoo, answer, zoo.held_in + zoo.held_out, "test"), zoo.held_in, zoo.held_out, own)
        shown = ", ".join(f"{k}={v}" for k, v in _flat(params).items() if k != "seed") or "no parameters"
        row.notes = f"{notes}; {shown} (chosen on validation)"
        row.experts_bytes = experts_bytes
        if method == "twin":
            st = built.router.stored
            row.stored_bytes = 4 * (st["twin_params"] + st["shared_params"] + st["router_params"])
            top, mask = built.token_routing([e.prompt for t in zoo.held_in for e in zoo.test_split(t)[:100]])
            labels = torch.tensor([built.experts.index(t) for t in zoo.held_in for _ in zoo.test_split(t)[:100]])
            row.routing_accuracy = float((top[0, :, -1] == labels).float().mean())
        else:
            row.stored_bytes = _dense_delta_bytes(loras)
        report.meta.setdefault("merges", {})[label] = {
            "method": method,
            "chosen": params,
            "grid": tried,
            "seconds": time.perf_counter() - t0,
            **({"router": built.router.router_metrics, "stored": built.router.stored} if method == "twin" else {}),
        }
        rows.append(row)
        report.rows.append(row)
    return rows


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v))
        elif k == "rank" and v is None:
            out["rank"] = "10 % of min(d)"
        else:
            out[k] = v
    return out


def write_report(report: QualityReport, out_dir: str | Path, json_path: str | Path | None = None) -> dict[str, Path]:
    """report.md, results.json (or ``json_path``) and cross_task.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_matrix(report, out / "cross_task.png")
    md = out / "report.md"
    build = report.meta.get("zoo_build", {})
    md.write_text(
        f"# moerge demo — zoo preset `{report.meta.get('preset')}`\n\n"
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
