"""Figures with their spread: each run of ``moerge bench all`` (one seed: one independent build of
every suite) reduced to ``table → row → column → value``; over runs, each cell becomes mean ± sd
(sample sd, n stated), and an ordering between two rows is claimed only where the paired
difference over seeds exceeds its own spread.

The rule for an ordering (:func:`compare`): with n ≥ 2 paired runs, the differences
``a_i − b_i`` have mean m and sample sd s; "a > b" is claimed when every difference has the
same sign and |m| > s; otherwise the verdict is "no difference measured". With n = 1 nothing is
claimed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Figures = dict[str, dict[str, dict[str, float]]]


def _pct(x: float | None) -> float | None:
    return None if x is None or x != x else 100.0 * x


def figures(result: Mapping[str, Any]) -> Figures:
    """One run's quality figures (a ``moerge bench all`` ``results.json``, one seed) as
    ``table → row → column → value``; columns with no value for a row are left out."""
    out: Figures = {}
    main: dict[str, dict[str, float]] = {}
    for name, m in result.get("methods", {}).items():
        row = {"held-in normalised": m["held_in_normalized"], "held-out (%)": _pct(m["held_out_accuracy"])}
        for g, v in (m.get("held_out_groups") or {}).items():
            row[f"held-out: {g} (%)"] = v
        row["routing (%)"] = _pct(m.get("routing_accuracy"))
        main[name] = {k: float(v) for k, v in row.items() if v is not None}
    if main:
        out["zoo"] = main
    if result.get("retrieval"):
        ret: dict[str, dict[str, float]] = {}
        for name, m in result["retrieval"]["methods"].items():
            row = {"mean nDCG@10": m["ndcg_at_10"], **{d: v for d, v in m["per_domain"].items()}}
            row["routing (%)"] = m.get("routing_accuracy")
            ret[name] = {k: float(v) for k, v in row.items() if v is not None}
        singles = {n: r for n, r in ret.items() if n.startswith("single: ")}
        if singles:  # the best single domain expert on test (hindsight: the baseline's most favourable reading)
            best = max(singles, key=lambda n: singles[n]["mean nDCG@10"])
            ret["best single expert (on test)"] = dict(singles[best])
        out["retrieval"] = ret
    if result.get("symbolic"):
        sym: dict[str, dict[str, float]] = {}
        for name, m in result["symbolic"]["methods"].items():
            sym[name] = {"overall (%)": float(m["accuracy"]), **{f"{g} (%)": float(v) for g, v in m.get("groups", {}).items()}}
        out["symbolic"] = sym
    if result.get("token_control"):
        ctl: dict[str, dict[str, float]] = {}
        for name, m in result["token_control"]["methods"].items():
            row = {
                "held-out segments right (%)": m.get("held_out_segment_accuracy"),
                "routing, input tokens (%)": m.get("routing_accuracy_inputs"),
            }
            ctl[name] = {k: float(v) for k, v in row.items() if v is not None}
        best = result["token_control"].get("best_single")
        if best:
            ctl["best single expert"] = {"held-out segments right (%)": float(best["held_out_segment_accuracy"])}
        out["control"] = ctl
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd


def summarize(runs: Sequence[Figures]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Per table, row and column: ``{"mean", "sd", "n", "values"}`` over the runs that have the cell."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for run in runs:
        for table, rows in run.items():
            for row, cols in rows.items():
                for col, v in cols.items():
                    out.setdefault(table, {}).setdefault(row, {}).setdefault(col, {"values": []})["values"].append(v)
    for rows in out.values():
        for cols in rows.values():
            for cell in cols.values():
                cell["mean"], cell["sd"] = mean_sd(cell["values"])
                cell["n"] = len(cell["values"])
    return out


def cell(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return ""
    return f"{c['mean']:.1f} ± {c['sd']:.1f}" if c["n"] > 1 else f"{c['mean']:.1f}"


def markdown(summary: Mapping[str, Any], table: str, columns: Sequence[str] | None = None) -> str:
    """One table as Markdown, every cell mean ± sd."""
    rows = summary[table]
    cols = list(columns) if columns else list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def compare(runs: Sequence[Figures], table: str, column: str, a: str, b: str) -> dict[str, Any] | None:
    """The paired difference ``a − b`` in ``column`` over the runs that have both (None if none)."""
    diffs = [r[table][a][column] - r[table][b][column] for r in runs
             if table in r and a in r[table] and b in r[table] and column in r[table][a] and column in r[table][b]]  # fmt: skip
    if not diffs:
        return None
    m, sd = mean_sd(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    claimed = len(diffs) > 1 and same_sign and abs(m) > sd
    if len(diffs) < 2:
        verdict = "one run: not tested"
    else:
        verdict = (f"{a} > {b}" if m > 0 else f"{a} < {b}") if claimed else "no difference measured"
    return {"table": table, "column": column, "a": a, "b": b, "diff_mean": m, "diff_sd": sd, "n": len(diffs),
            "diffs": diffs, "verdict": verdict}  # fmt: skip


#: the orderings the papers claim (or our docs discuss), tested on every run of ``moerge bench all``
CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("zoo", "held-in normalised", "GLIDER", "oracle"),
    ("zoo", "held-in normalised", "GLIDER", "PHATGOOSE"),
    ("zoo", "held-out (%)", "PHATGOOSE", "best single expert"),
    ("zoo", "held-out (%)", "GLIDER", "retrieval"),
    ("zoo", "held-in normalised", "Twin-Merging", "TIES"),
    ("zoo", "held-in normalised", "Twin-Merging", "task arithmetic"),
    ("zoo", "held-in normalised", "TIES", "task arithmetic"),
    ("zoo", "held-in normalised", "Arrow", "PHATGOOSE"),
    ("retrieval", "mean nDCG@10", "RouterRetriever", "best single expert (on test)"),
    ("retrieval", "mean nDCG@10", "RouterRetriever", "multi-task LoRA"),
    ("retrieval", "mean nDCG@10", "RouterRetriever", "base (MiniLM)"),
    ("symbolic", "overall (%)", "Symbolic-MoE", "best single model"),
    ("symbolic", "overall (%)", "Symbolic-MoE", "majority vote of the recruited"),
    ("symbolic", "overall (%)", "Symbolic-MoE", "random 3 + aggregator"),
    ("control", "held-out segments right (%)", "PHATGOOSE", "best single expert"),
)


def orderings(runs: Sequence[Figures], claims: Sequence[tuple[str, str, str, str]] = CLAIMS) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS` whose two rows the runs have, with its verdict."""
    return [c for c in (compare(runs, *claim) for claim in claims) if c is not None]


def orderings_markdown(found: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| table | figure | a − b | paired difference (mean ± sd, n) | verdict |", "|---|---|---|---:|---|"]
    for c in found:
        lines.append(f"| {c['table']} | {c['column']} | {c['a']} − {c['b']} | {c['diff_mean']:+.1f} ± {c['diff_sd']:.1f} "
                     f"(n={c['n']}) | {c['verdict']} |")  # fmt: skip
    return "\n".join(lines)
