"""RouterRetriever's Table 1 on the embedded retrieval suite (``moerge demo``'s retrieval table).

Every row retrieves each domain's test queries from that domain's index (base-encoder document
embeddings) and reports nDCG@10 from trec_eval per domain and their mean (the paper's Avg):

* ``base``: the bundled MiniLM; ``single: <d>``: one domain's LoRA for every query;
  ``multi-task``: one LoRA trained on every domain's training queries;
* routers over the domain experts — ``DatasetRouter`` (nearest of 100 training queries per
  domain, that domain's expert), ``ClassificationHeadRouter`` (one linear layer over the base
  embedding, trained on the training queries labelled with their best expert, class-balanced;
  its weight decay chosen on the dev split), ``RouterRetriever`` (pilots by Algorithm 1 from the
  training queries; mean cosine, the paper) and the released code's variant (max, dot);
* oracles — ``DatasetOracle`` (each query to its own domain's expert) and ``InstanceOracle``
  (each query to the expert that retrieves it best, the ceiling of per-query routing).

Routing accuracy = share of test queries sent to their own domain's expert. Nothing a router
is prepared from comes from the test split; per-query scores of the fixed experts are computed
once and cached beside the suite (the RouterRetriever row is run end to end through its mixed
batches, not looked up).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from moerge.progress import progress_bar
from moerge.registry.files import atomic_write_json
from moerge.retrieval import evaluate
from moerge.retrieval.encoder import ExpertEncoder
from moerge.retrieval.router_retriever import Dataset, RouterRetriever
from moerge.zoo.retrieval import MULTITASK, Suite, load_suite

BASE = "__base__"
DATASET_ROUTER_QUERIES = 100
HEAD_WEIGHT_DECAYS = (0.0, 1e-3, 1e-2, 1e-1)


def _per_query(
    suite: Suite, encoders: dict[str, ExpertEncoder], split: str, progress: bool | None
) -> dict[str, dict[str, float]]:
    """expert (incl. base, multi-task) → query id → nDCG@10 on ``split``, over every domain."""
    out: dict[str, dict[str, float]] = {}
    names = [BASE, *suite.domains, MULTITASK]
    for name in progress_bar(names, desc=f"score experts on {split}", progress=progress):
        enc = encoders["multitask"] if name == MULTITASK else encoders["pool"]
        out[name] = {}
        for d in suite.domains:
            _, queries, qrels = suite.load(d, split)
            emb = enc.embed(list(queries.values()), None if name == BASE else name)
            run = suite.index(d).search(queries, k=100, embeddings=emb)
            out[name].update({q: v["ndcg@10"] for q, v in evaluate(run, qrels)["per_query"].items()})
    return out


def _cached_scores(suite: Suite, encoders: dict[str, ExpertEncoder], progress: bool | None) -> dict[str, Any]:
    refs = [r.ref for r in suite.registry.select(names=[*suite.domains, MULTITASK]).records]
    key = hashlib.sha256(json.dumps([suite.preset.key(), refs]).encode()).hexdigest()[:12]
    path = suite.root / "bench" / f"scores-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    scores = {split: _per_query(suite, encoders, split, progress) for split in ("train", "dev", "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, scores)
    return scores


def _domain_of(suite: Suite, split: str) -> dict[str, str]:
    out = {}
    for d in suite.domains:
        _, queries, _ = suite.load(d, split)
        out.update({q: d for q in queries})
    return out


def _texts(suite: Suite, split: str) -> dict[str, str]:
    out = {}
    for d in suite.domains:
        out.update(suite.load(d, split)[1])
    return out


def _train_head(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, seed: int = 0) -> torch.nn.Linear:
    """A T-way linear classifier on base embeddings, balanced by class weights, full batch Adam."""
    torch.manual_seed(seed)
    x = x.clone()  # embeddings come out of inference mode
    head = torch.nn.Linear(x.shape[1], classes)
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(x), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def _row(name: str, picks: dict[str, str], table: dict[str, dict[str, float]], domain: dict[str, str], domains: list[str],
         routed: bool = True, kind: str = "router") -> dict[str, Any]:  # fmt: skip
    per_domain = {}
    for d in domains:
        qs = [q for q in domain if domain[q] == d]
        per_domain[d] = 100 * sum(table[picks[q]][q] for q in qs) / len(qs)
    acc = 100 * sum(picks[q] == domain[q] for q in domain) / len(domain) if routed else None
    return {"method": name, "kind": kind, "ndcg_at_10": sum(per_domain.values()) / len(domains),
            "per_domain": per_domain, "routing_accuracy": acc}  # fmt: skip


def run(
    preset: str = "retrieval", cache_dir: str | Path | None = None, progress: bool | None = None, suite: Suite | None = None
) -> dict[str, Any]:
    """The table's rows (each: method, kind, ndcg_at_10 (mean over domains, in points),
    per_domain, routing_accuracy) and timings."""
    t0 = time.perf_counter()
    suite = suite or load_suite(preset, cache_dir, progress)
    t_suite = time.perf_counter() - t0
    reg, domains = suite.registry, suite.domains
    encoders = {
        "pool": ExpertEncoder(None, reg.select(names=domains)),
        "multitask": ExpertEncoder(None, reg.select(names=[MULTITASK])),
    }
    scores = _cached_scores(suite, encoders, progress)
    test, dev = scores["test"], scores["dev"]
    dom_test, dom_dev = _domain_of(suite, "test"), _domain_of(suite, "dev")
    rows = [_row("base (MiniLM)", {q: BASE for q in dom_test}, test, dom_test, domains, routed=False, kind="single")]
    for d in domains:
        rows.append(_row(f"single: {d}", {q: d for q in dom_test}, test, dom_test, domains, routed=False, kind="single"))
    rows.append(_row("multi-task LoRA", {q: MULTITASK for q in dom_test}, test, dom_test, domains, routed=False, kind="single"))

    pool = encoders["pool"]
    test_texts, dev_texts = _texts(suite, "test"), _texts(suite, "dev")
    z_test = pool.embed(list(test_texts.values()), None)
    z_dev = pool.embed(list(dev_texts.values()), None)

    # DatasetRouter: nearest of 100 training queries per domain (seeded sample), that domain's expert
    rng = random.Random(0)
    sample, labels = [], []
    for d in domains:
        _, queries, qrels = suite.load(d, "train")
        picked = rng.sample(sorted(qrels), min(DATASET_ROUTER_QUERIES, len(qrels)))
        sample += [queries[q] for q in picked]
        labels += [d] * len(picked)
    z_sample = pool.embed(sample, None)
    nearest = (z_test @ z_sample.T).argmax(1)
    rows.append(
        _row("DatasetRouter", {q: labels[int(i)] for q, i in zip(test_texts, nearest, strict=True)}, test, dom_test, domains)
    )

    # ClassificationHeadRouter: labels = each training query's best expert (Algorithm 1's e_max; ties dropped)
    from moerge.retrieval.router_retriever import best_experts

    train_texts = _texts(suite, "train")
    best = best_experts({e: scores["train"][e] for e in domains}, domains, "drop")
    tq = [q for q in train_texts if q in best]
    x = pool.embed([train_texts[q] for q in tq], None)
    y = torch.tensor([domains.index(best[q]) for q in tq])
    choice = []
    for wd in HEAD_WEIGHT_DECAYS:  # chosen on dev nDCG@10
        head = _train_head(x, y, len(domains), wd)
        with torch.no_grad():
            picks = {q: domains[int(i)] for q, i in zip(dev_texts, head(z_dev).argmax(1), strict=True)}
        choice.append((_row("", picks, dev, dom_dev, domains)["ndcg_at_10"], -wd, head))
    dev_score, neg_wd, head = max(choice, key=lambda c: (c[0], c[1]))
    with torch.no_grad():
        picks = {q: domains[int(i)] for q, i in zip(test_texts, head(z_test).argmax(1), strict=True)}
    row = _row("ClassificationHeadRouter", picks, test, dom_test, domains)
    row["chosen_on_dev"] = {"weight_decay": -neg_wd, "dev_ndcg_at_10": dev_score}
    rows.append(row)

    # RouterRetriever: pilots from the training splits (stored in the suite's registry)
    t_rr = time.perf_counter()
    train_sets = {}
    for d in domains:
        _, queries, qrels = suite.load(d, "train")
        train_sets[d] = Dataset(suite.index(d), {q: queries[q] for q in qrels}, qrels)
    rr = RouterRetriever(pool)
    precomputed = {d: {e: {q: scores["train"][e][q] for q in train_sets[d].queries} for e in domains} for d in domains}
    rr.build_or_load(reg, train_sets, scores=precomputed)  # Algorithm 1 from the cached scores where no pilots are stored
    routed = rr.route(list(test_texts.values()), base=z_test)
    picks = dict(zip(test_texts, routed, strict=True))
    emb = rr.embed(list(test_texts.values()), base=z_test)  # the real path: routed, then mixed-expert batches
    ndcg = {}
    offset = 0
    for d in domains:
        _, queries, qrels = suite.load(d, "test")
        res = evaluate(suite.index(d).search(queries, k=100, embeddings=emb[offset : offset + len(queries)]), qrels)
        ndcg[d] = 100 * res["ndcg@10"]
        offset += len(queries)
    row = _row("RouterRetriever", picks, test, dom_test, domains)
    row["per_domain_end_to_end"] = ndcg
    row["pilots"] = {e: rr.library.provenance.get(e, []) for e in domains}
    row["dropped_train_queries"] = dict(rr.library.dropped)
    row["seconds"] = time.perf_counter() - t_rr
    rows.append(row)
    code = RouterRetriever(pool, agg="max", sim="dot")
    code.library = rr.library
    rows.append(_row("RouterRetriever (code: max, dot)", dict(zip(test_texts, code.route(list(test_texts.values()), base=z_test), strict=True)),
                     test, dom_test, domains))  # fmt: skip

    rows.append(_row("DatasetOracle", dict(dom_test), test, dom_test, domains, kind="oracle"))
    inst = {q: max(domains, key=lambda e: test[e][q]) for q in dom_test}
    rows.append(_row("InstanceOracle", inst, test, dom_test, domains, routed=False, kind="oracle"))
    return {
        "domains": domains,
        "rows": rows,
        "queries": {"test": len(dom_test), "dev": len(dom_dev), "train": len(train_texts)},
        "suite": {"preset": suite.preset.name, "root": str(suite.root), "sizes": suite.meta["sizes"]},
        "seconds": {"suite": t_suite, "total": time.perf_counter() - t0},
    }


def format_table(result: dict[str, Any]) -> str:
    domains = result["domains"]
    head = f"{'method':34s}" + "".join(f"{d[:8]:>9s}" for d in domains) + f"{'mean':>8s}{'route%':>8s}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        acc = "" if r["routing_accuracy"] is None else f"{r['routing_accuracy']:.1f}"
        lines.append(
            f"{r['method']:34s}" + "".join(f"{r['per_domain'][d]:9.1f}" for d in domains) + f"{r['ndcg_at_10']:8.1f}{acc:>8s}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    domains = result["domains"]
    lines = [
        "| method | " + " | ".join(domains) + " | mean nDCG@10 | routing accuracy (%) |",
        "|---|" + "---:|" * (len(domains) + 2),
    ]
    for r in result["rows"]:
        acc = "" if r["routing_accuracy"] is None else f"{r['routing_accuracy']:.1f}"
        cells = " | ".join(f"{r['per_domain'][d]:.1f}" for d in domains)
        lines.append(f"| {r['method']} | {cells} | {r['ndcg_at_10']:.1f} | {acc} |")
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """``results.json``'s ``retrieval`` entry: every method by name with its mean nDCG@10 (points)
    under ``ndcg_at_10``, per-domain scores and routing accuracy."""
    methods = {}
    for r in result["rows"]:
        methods[r["method"]] = {k: v for k, v in r.items() if k != "method"}
    return {"methods": methods, **{k: v for k, v in result.items() if k != "rows"}}
