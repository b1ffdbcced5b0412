"""Symbolic-MoE's recruiting maths (Chen et al., 2025; ``shared/docs/methods/symbolic-moe.md``
§3.2–3.4, §3.6), model-agnostic: it needs per-question keywords and per-model correctness on a
validation set, nothing else.

* :func:`parse_keywords` / :func:`consensus_keywords` — the annotator's output rule: text after
  ``Keywords:``, split on commas, stripped, lower-cased, periods deleted, longer than 20
  characters dropped; over 5 samples, a keyword is kept when ≥ 2 samples name it.
* :func:`build_profiles` — ``profile[m][k] += +1`` if model m answered a validation question
  with keyword k correctly, else ``−1`` (a keyword listed twice counts twice).
* :func:`global_competency` — γ_m: Σ_k profile_m[k], shifted to ≥ 1 when the minimum is
  negative, raised to 1/τ (τ = 0.5: squared) and normalised.
* :func:`recruit_distribution` — local suitability s_m(q) = Σ_{k∈K_q} profile_m[k] over models
  that know some k; candidates = {s > 0}, else every present model shifted by (−min + 1);
  p ∝ s·γ. No keyword known by any model → ``None`` (the caller's fallback: uniform).
* :func:`sample_experts` — k = 3 draws **with replacement**, seeded (a model may be recruited
  twice and then answers twice); the uniform fallback is labelled so.
* :func:`plan_by_model` — the batch-by-model schedule: every (query, recruited model) pair grouped
  by model, models in order of first appearance; model loads = distinct models (+ 1 aggregator).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: keywords longer than this are dropped (the released code's rule)
MAX_KEYWORD_CHARS = 20
#: samples of the annotator per question, and in how many a keyword must appear
ANNOTATOR_SAMPLES = 5
MIN_AGREEING_SAMPLES = 2
TAU = 0.5
K = 3

ANNOTATOR_PROMPT = (
    "Question: {question}\n\n"
    "What are the core knowledge, subjects or skills needed to solve this problem? "
    "List 2-5 keywords separated by commas. Example keywords: psychology, virology, behavioral theory, "
    "microbiology, diplomacy, political science, property law, finance, business. "
    "Give ONLY the keywords, no other words or explanation. Follow this format: Keywords: <keyword1>, <keyword2>..."
)


def parse_keywords(text: str) -> list[str]:
    """One annotator sample → its keywords (after the last ``Keywords:``; lower-cased, periods
    deleted, ≤ 20 characters, duplicates removed in order)."""
    tail = text.rsplit("Keywords:", 1)[-1] if "Keywords:" in text else text
    out: list[str] = []
    for part in tail.split(","):
        kw = part.strip().lower().replace(".", "").strip()
        if kw and len(kw) <= MAX_KEYWORD_CHARS and kw not in out:
            out.append(kw)
    return out


def consensus_keywords(samples: Sequence[str], min_count: int = MIN_AGREEING_SAMPLES) -> list[str]:
    """Keywords named by at least ``min_count`` of the annotator's samples (each sample counted
    once per keyword), in order of first appearance. May be empty."""
    counts: Counter[str] = Counter()
    order: list[str] = []
    for s in samples:
        for kw in parse_keywords(s):
            counts[kw] += 1
            if kw not in order:
                order.append(kw)
    return [kw for kw in order if counts[kw] >= min_count]


Profiles = dict[str, dict[str, int]]


def build_profiles(keywords: Mapping[str, Sequence[str]], correct: Mapping[str, Mapping[str, bool]]) -> Profiles:
    """``keywords``: validation question → its keywords; ``correct``: model → question → whether
    the model answered it correctly. Every model must be judged on every question."""
    profiles: Profiles = {}
    for model, judged in correct.items():
        missing = [q for q in keywords if q not in judged]
        if missing:
            raise ValueError(f"model {model!r} has no judgement for {len(missing)} validation question(s), e.g. {missing[0]!r}")
        prof: dict[str, int] = defaultdict(int)
        for q, kws in keywords.items():
            for kw in kws:
                prof[kw] += 1 if judged[q] else -1
        profiles[model] = dict(prof)
    return profiles


def global_competency(profiles: Mapping[str, Mapping[str, int]], tau: float = TAU) -> dict[str, float]:
    """γ_m = g'_m^{1/τ} / Σ_j g'_j^{1/τ}, g_m = Σ_k profile_m[k], shifted by (−min + 1) when the
    minimum is negative."""
    if not profiles:
        raise ValueError("no model profiles")
    g = {m: float(sum(p.values())) for m, p in profiles.items()}
    low = min(g.values())
    if low < 0:
        g = {m: v - low + 1 for m, v in g.items()}
    powered = {m: v ** (1.0 / tau) for m, v in g.items()}
    total = sum(powered.values())
    if total <= 0:  # every model at 0: no evidence either way
        return {m: 1.0 / len(g) for m in g}
    return {m: v / total for m, v in powered.items()}


def local_suitability(profiles: Mapping[str, Mapping[str, int]], query_keywords: Sequence[str]) -> dict[str, float]:
    """s_m(q) = Σ_{k∈K_q} profile_m[k], over the models whose profile has some k of K_q (a
    keyword listed twice counts twice)."""
    out: dict[str, float] = {}
    for m, prof in profiles.items():
        hits = [prof[k] for k in query_keywords if k in prof]
        if hits:
            out[m] = float(sum(hits))
    return out


def recruit_distribution(
    profiles: Mapping[str, Mapping[str, int]], gamma: Mapping[str, float], query_keywords: Sequence[str]
) -> dict[str, float] | None:
    """p_m ∝ s_m(q)·γ_m over the candidates (models with s > 0; if none, every present model,
    shifted by −min + 1). ``None`` when no model knows any of the query's keywords."""
    s = local_suitability(profiles, query_keywords)
    if not s:
        return None
    positive = {m: v for m, v in s.items() if v > 0}
    if not positive:
        low = min(s.values())
        positive = {m: v - low + 1 for m, v in s.items()}
    weights = {m: v * gamma[m] for m, v in positive.items()}
    total = sum(weights.values())
    if total <= 0:
        return {m: 1.0 / len(weights) for m in weights}
    return {m: w / total for m, w in weights.items()}


@dataclass
class Recruitment:
    """The experts recruited for one query (with repeats) and how they were drawn."""

    experts: list[str]
    distribution: dict[str, float] | None
    #: "profile" (p ∝ s·γ) or "uniform" (no keyword of the query is in any profile: the spec's fallback)
    how: str = "profile"
    keywords: list[str] = field(default_factory=list)


def sample_experts(
    distribution: Mapping[str, float] | None, models: Sequence[str], rng: random.Random, k: int = K, keywords: Sequence[str] = ()
) -> Recruitment:
    """k draws with replacement from ``distribution`` (``random.choices``, as the released code);
    ``None`` → k uniform draws from ``models``, marked ``how="uniform"``."""
    if distribution is None:
        return Recruitment(rng.choices(list(models), k=k), None, "uniform", list(keywords))
    names = list(distribution)
    return Recruitment(
        rng.choices(names, weights=[distribution[n] for n in names], k=k), dict(distribution), "profile", list(keywords)
    )


def recruit(
    queries_keywords: Mapping[str, Sequence[str]],
    profiles: Mapping[str, Mapping[str, int]],
    k: int = K,
    seed: int = 0,
    tau: float = TAU,
) -> dict[str, Recruitment]:
    """Recruit k experts for every query (keywords already mapped to validation keywords), one
    seeded generator over the queries in order."""
    gamma = global_competency(profiles, tau)
    rng = random.Random(seed)
    models = list(profiles)
    return {
        q: sample_experts(recruit_distribution(profiles, gamma, kws), models, rng, k, kws) for q, kws in queries_keywords.items()
    }


def plan_by_model(recruited: Mapping[str, Recruitment]) -> dict[str, list[tuple[str, int]]]:
    """model → [(query, sample index), …] over every query, duplicates kept (a model recruited
    twice for a query answers twice); models in order of first appearance, as the released code."""
    plan: dict[str, list[tuple[str, int]]] = {}
    for q, r in recruited.items():
        for i, m in enumerate(r.experts):
            plan.setdefault(m, []).append((q, i))
    return plan


def majority_vote(answers: Iterable[Any]) -> Any:
    """The most frequent answer (ties: the first to reach the top count, in order)."""
    answers = list(answers)
    if not answers:
        raise ValueError("no answers to vote on")
    counts = Counter(answers)
    top = max(counts.values())
    return next(a for a in answers if counts[a] == top)
