"""IR metrics from trec_eval (``pytrec_eval``), never computed by hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: our names → trec_eval's
MEASURES = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "map": "map", "mrr": "recip_rank"}


def evaluate(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = ("ndcg@10", "recall@100"),
) -> dict[str, Any]:
    """Score ``run`` (``{query_id: {doc_id: score}}``) against ``qrels``: the mean of each
    measure over the judged queries, and ``per_query``. A run for a query without judgments is
    refused (trec_eval would skip it silently and the mean would mean something else); a judged
    query missing from the run scores 0, as in trec_eval's ``-c``."""
    import pytrec_eval

    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; known: {sorted(MEASURES)}")
    unjudged = sorted(set(run) - set(qrels))
    if unjudged:
        raise ValueError(
            f"the run has {len(unjudged)} queries without judgments in qrels (e.g. {unjudged[:3]}); "
            "evaluate the judged queries only, or add their qrels"
        )
    trec = [MEASURES[m] for m in measures]
    evaluator = pytrec_eval.RelevanceEvaluator({q: dict(d) for q, d in qrels.items()}, set(trec))
    scored = evaluator.evaluate({q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()})
    per_query = {q: {m: float(scored.get(q, {}).get(t, 0.0)) for m, t in zip(measures, trec, strict=True)} for q in qrels}
    out: dict[str, Any] = {m: sum(v[m] for v in per_query.values()) / len(per_query) for m in measures}
    out["per_query"] = per_query
    return out
