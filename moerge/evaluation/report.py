"""The comparison table every evaluation produces (``moerge eval``, ``moerge demo``): one row per
method with its per-task scores, held-in normalised score (each task's own expert = 100),
held-out accuracy by group, routing accuracy and storage; the cross-task matrix and its heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moerge.plotting import pyplot, save_figure


@dataclass
class MethodRow:
    """One row of the table: a method's per-task scores and the two summary figures."""

    name: str
    per_task: dict[str, float]
    held_in_normalized: float
    held_out_accuracy: float
    notes: str = ""
    #: routers: share of held-in tokens (× modules; which tokens: ``QualityReport.routing_tokens``) whose top-1 expert is the task's own
    routing_accuracy: float | None = None
    #: merges: bytes stored beyond the base (fp32), and the same for keeping every expert
    stored_bytes: int | None = None
    experts_bytes: int | None = None
    #: hyper-parameters chosen on validation (``moerge eval``)
    chosen: dict[str, Any] | None = None
    #: how many test prompts occur in what the method was prepared from (``moerge eval``)
    test_prompts_in_preparation: int | None = None


@dataclass
class QualityReport:
    held_in: list[str]
    held_out: list[str]
    experts: list[str]
    #: matrix[expert][task]: the score of each single expert on each task
    matrix: dict[str, dict[str, float]]
    rows: list[MethodRow]
    meta: dict[str, Any] = field(default_factory=dict)
    #: held-out group → its tasks (None: one group per kind, decided by a subclass)
    groups: dict[str, list[str]] | None = None
    #: task → the experts trained on it (default: the expert named as the task)
    own_experts: dict[str, list[str]] | None = None
    #: which tokens the routing accuracy counts: the evaluator's own counts every prompt token; the
    #: zoo's breakdown (``moerge bench all``) the item tokens between ``:`` and ``=>``
    routing_tokens: str = "prompt tokens"

    def own_scores(self) -> dict[str, float]:
        """Each held-in task's own expert on it (the best of them when several): the 100 of the normalised score."""
        own = self.own_experts or {t: [t] for t in self.held_in}
        return {t: max(self.matrix[e][t] for e in own[t]) for t in self.held_in}

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": {r.name: {**asdict(r), "held_out_groups": self.group_accuracy(r)} for r in self.rows},
            "held_out_groups": self.held_out_groups(),
            "cross_task_matrix": self.matrix,
            "held_in": self.held_in,
            "held_out": self.held_out,
            "meta": self.meta,
        }

    def held_out_groups(self) -> dict[str, list[str]]:
        return dict(self.groups) if self.groups is not None else {"held-out": list(self.held_out)}

    def group_accuracy(self, row: MethodRow) -> dict[str, float | None]:
        """Mean score (%) of ``row`` over each held-out group (None for an empty group)."""
        return {g: (100 * sum(row.per_task[t] for t in ts) / len(ts) if ts else None) for g, ts in self.held_out_groups().items()}

    def markdown(self, names: Sequence[str] | None = None) -> str:
        """The table (``names``: only these rows, in the report's order)."""
        groups = self.held_out_groups()
        lines = [
            "| method | held-in normalised (expert = 100) | held-out accuracy (%) | held-out: " + " / ".join(groups) + " (%) "
            f"| routing accuracy, held-in {self.routing_tokens} (%) | stored (vs every expert) | notes |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows if names is None else [r for r in self.rows if r.name in names]:
            ra = "" if r.routing_accuracy is None else f"{100 * r.routing_accuracy:.1f}"
            st = "" if r.stored_bytes is None else f"{r.stored_bytes / 1024:.0f} KB ({r.stored_bytes / r.experts_bytes:.2f}×)"
            acc = " / ".join("–" if v is None else f"{v:.1f}" for v in self.group_accuracy(r).values())
            lines.append(
                f"| {r.name} | {r.held_in_normalized:.1f} | {_pct(r.held_out_accuracy)} | {acc} | {ra} | {st} | {r.notes} |"
            )
        return "\n".join(lines)

    def matrix_markdown(self) -> str:
        tasks = self.held_in + self.held_out
        head = "| expert \\ task | " + " | ".join(tasks) + " |"
        sep = "|---|" + "---:|" * len(tasks)
        body = [f"| {e} | " + " | ".join(f"{100 * self.matrix[e][t]:.0f}" for t in tasks) + " |" for e in self.experts]
        base = next((r for r in self.rows if r.name == "base"), None)
        if base:
            body.append("| *base* | " + " | ".join(f"{100 * base.per_task[t]:.0f}" for t in tasks) + " |")
        return "\n".join([head, sep, *body])


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}"  # NaN: no held-out task


def method_row(
    name: str, per_task: dict[str, float], held_in: Sequence[str], held_out: Sequence[str], own: dict[str, float], notes: str = ""
) -> MethodRow:
    """Summarise per-task scores: mean of 100·score/own over held-in, mean accuracy over held-out
    (NaN when there is no held-out task)."""
    norm = [100 * per_task[t] / own[t] if own[t] > 0 else 0.0 for t in held_in]
    return MethodRow(
        name=name,
        per_task=dict(per_task),
        held_in_normalized=sum(norm) / len(norm),
        held_out_accuracy=sum(per_task[t] for t in held_out) / len(held_out) if held_out else float("nan"),
        notes=notes,
    )


def plot_matrix(report: QualityReport, path: str | Path) -> Path:
    """Heatmap of the cross-task matrix (experts × tasks, score %), the base (when scored) as the last row."""
    plt = pyplot()

    tasks = report.held_in + report.held_out
    base = next((r.per_task for r in report.rows if r.name == "base"), None)
    rows = report.experts + (["base"] if base is not None else [])
    data = [[100 * report.matrix[e][t] for t in tasks] for e in report.experts]
    if base is not None:
        data.append([100 * base[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(tasks), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.axvline(len(report.held_in) - 0.5, color="white", lw=2)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xlabel("task (held-in | held-out)")
    ax.set_ylabel("expert")
    ax.set_title("Score (%) of each expert on each task")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return save_figure(fig, path)
