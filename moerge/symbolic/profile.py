"""Skill annotation and model profiling for Symbolic-MoE (spec §3.2–3.3).

* :class:`LLMAnnotator` — the paper's: an instruction-tuned model asked for 2–5 keywords, 5
  samples at temperature 0.7, a keyword kept when ≥ 2 samples name it (≤ 20 characters).
* :class:`EmbeddingAnnotator` — offline: the ``top_k`` entries of a skill vocabulary nearest to
  the question by the bundled MiniLM (for pools without an instruction-tuned annotator, and the
  embedded default, whose tiny models cannot follow the annotator prompt).
* :func:`profile_models` — every model answers every validation question once (grouped by model:
  one load each); ``profile[m][k] ± 1`` per keyword. Each model's profile is a registry artifact
  keyed by the validation set's fingerprint (questions, answers, keywords): profiling again, or
  after adding a model, loads only the models without one; a profile made on another validation
  set is never used for this one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from moerge.symbolic.recruit import ANNOTATOR_PROMPT, ANNOTATOR_SAMPLES, build_profiles, consensus_keywords

PRODUCER = "symbolic_profile"


class EmbeddingAnnotator:
    """Keywords = the ``top_k`` vocabulary skills nearest to the question (MiniLM cosine)."""

    def __init__(self, vocabulary: Sequence[str], top_k: int = 2, embedder: Any = None) -> None:
        if not vocabulary:
            raise ValueError("the skill vocabulary is empty")
        if embedder is None:
            from moerge.routers.embedding import load_embedder

            embedder = load_embedder(None)
        self.vocabulary, self.top_k, self.embedder = list(vocabulary), top_k, embedder
        self._v = torch.nn.functional.normalize(embedder.encode(self.vocabulary).float(), dim=-1)

    def __call__(self, questions: Sequence[str]) -> list[list[str]]:
        q = torch.nn.functional.normalize(self.embedder.encode(list(questions)).float(), dim=-1)
        top = (q @ self._v.T).topk(min(self.top_k, len(self.vocabulary)), dim=1).indices
        return [[self.vocabulary[int(i)] for i in row] for row in top]


class NearestQuestionAnnotator:
    """Keywords of a question = those named by ≥ ``min_votes`` of its ``neighbours`` nearest
    labelled questions (MiniLM cosine) — the paper's 2-of-5 rule, with the five nearest
    validation questions in place of five LLM samples. Offline; needs a validation set whose
    questions carry keywords. ``text`` picks what is embedded (default: the whole question).
    A question whose neighbours agree on nothing gets no keywords, and is recruited uniformly."""

    def __init__(
        self,
        labelled: Mapping[str, Sequence[str]],
        neighbours: int = ANNOTATOR_SAMPLES,
        min_votes: int = 2,
        text: Callable[[str], str] | None = None,
        embedder: Any = None,
    ) -> None:
        if not labelled:
            raise ValueError("NearestQuestionAnnotator needs labelled questions (question → keywords)")
        if not 1 <= min_votes <= neighbours:
            raise ValueError(f"min_votes must be in 1..neighbours ({neighbours}), got {min_votes}")
        if embedder is None:
            from moerge.routers.embedding import load_embedder

            embedder = load_embedder(None)
        self.text = text or (lambda q: q)
        self.questions = list(labelled)
        self.keywords = [list(labelled[q]) for q in self.questions]
        self.neighbours, self.min_votes, self.embedder = min(neighbours, len(self.questions)), min_votes, embedder
        self._v = self._embed(self.questions)

    def _embed(self, questions: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(self.embedder.encode([self.text(q) for q in questions]).float(), dim=-1)

    def __call__(self, questions: Sequence[str]) -> list[list[str]]:
        top = (self._embed(questions) @ self._v.T).topk(self.neighbours, dim=1).indices
        out = []
        for row in top:
            votes: dict[str, int] = {}
            for i in row:
                for k in dict.fromkeys(self.keywords[int(i)]):
                    votes[k] = votes.get(k, 0) + 1
            out.append([k for k, n in votes.items() if n >= self.min_votes])
        return out


class LLMAnnotator:
    """The paper's annotator over a loaded instruction-tuned model (:func:`~moerge.symbolic.execute.load_model_expert`)."""

    def __init__(
        self, loaded: Any, samples: int = ANNOTATOR_SAMPLES, temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0
    ) -> None:
        self.loaded, self.samples, self.temperature, self.max_new_tokens, self.seed = (
            loaded,
            samples,
            temperature,
            max_new_tokens,
            seed,
        )

    def __call__(self, questions: Sequence[str]) -> list[list[str]]:
        from moerge.symbolic.execute import generate

        prompts = [ANNOTATOR_PROMPT.format(question=q) for q in questions]
        runs = [
            generate(self.loaded, prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed + s)
            for s in range(self.samples)
        ]
        return [consensus_keywords([run[i] for run in runs]) for i in range(len(questions))]


def validation_fingerprint(validation: Mapping[str, Mapping[str, Any]]) -> str:
    """What a profile depends on: every validation question, its answer and its keywords."""
    rows = {q: [v["question"], v["answer"], list(v["keywords"])] for q, v in validation.items()}
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def profile_models(
    registry: Any,
    models: Sequence[str],
    validation: Mapping[str, Mapping[str, Any]],
    check: Callable[[str, str], bool],
    loader: Callable[[str], Any],
    prompt: Callable[[str], str] = lambda q: q,
    progress: bool | None = None,
    **gen: Any,
) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """Profiles of ``models`` on ``validation`` (question id → ``{"question", "answer",
    "keywords"}``); ``check(response, answer)`` judges a response. Stored profiles are loaded;
    the rest are computed batch-by-model and stored. Returns (profiles, report: which models were
    profiled now, their validation accuracy, model loads)."""
    from moerge.symbolic.execute import run_batched
    from moerge.symbolic.recruit import Recruitment

    if not validation:
        raise ValueError("the validation set is empty")
    missing = [q for q, v in validation.items() if not {"question", "answer", "keywords"} <= set(v)]
    if missing:
        raise ValueError(f"validation question {missing[0]!r} needs 'question', 'answer' and 'keywords'")
    key = {"validation": validation_fingerprint(validation), "questions": len(validation)}
    profiles: dict[str, dict[str, int]] = {}
    accuracy: dict[str, float] = {}
    todo = []
    for m in models:
        stored = registry.get_artifact(m, PRODUCER, key)
        if stored is None:
            todo.append(m)
        else:
            profiles[m], accuracy[m] = stored["profile"], stored["accuracy"]
    loads = 0
    if todo:
        recruited = {q: Recruitment(list(todo), None) for q in validation}  # every model answers every question once
        prompts = {q: prompt(v["question"]) for q, v in validation.items()}
        answers, stats = run_batched(recruited, prompts, loader, progress=progress, **gen)
        loads = stats.model_loads
        keywords = {q: list(v["keywords"]) for q, v in validation.items()}
        for j, m in enumerate(todo):
            correct = {q: bool(check(answers[q][j], validation[q]["answer"])) for q in validation}
            profiles[m] = build_profiles(keywords, {m: correct})[m]
            accuracy[m] = sum(correct.values()) / len(correct)
            registry.put_artifact(
                m,
                PRODUCER,
                key,
                {
                    "profile": profiles[m],
                    "accuracy": accuracy[m],
                    "correct": correct,
                    "answers": {q: answers[q][j] for q in validation},
                },
            )
    return {m: profiles[m] for m in models}, {"profiled_now": todo, "accuracy": accuracy, "model_loads": loads}


def stored_answers(
    registry: Any, models: Sequence[str], validation: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """model → its stored validation run (``answers``, ``correct``) for this validation set."""
    key = {"validation": validation_fingerprint(validation), "questions": len(validation)}
    out = {}
    for m in models:
        art = registry.get_artifact(m, PRODUCER, key)
        if art is None:
            raise ValueError(f"model {m!r} has no profile for this validation set: run profile_models first")
        out[m] = art
    return out


def aggregator_benchmark(
    registry: Any, models: Sequence[str], validation: Mapping[str, Mapping[str, Any]], seed: int = 0
) -> dict[str, list[str]]:
    """The synthetic aggregation task (spec §3.5): per validation question, one random correct
    and two random incorrect answers of the pool's models (an empty string where there are none),
    shuffled. Seeded."""
    import random

    rng = random.Random(seed)
    runs = stored_answers(registry, models, validation)
    out = {}
    for q in validation:
        right = [runs[m]["answers"][q] for m in models if runs[m]["correct"][q]]
        wrong = [runs[m]["answers"][q] for m in models if not runs[m]["correct"][q]]
        picked = [
            rng.choice(right) if right else "",
            *(rng.sample(wrong, 2) if len(wrong) >= 2 else wrong + [""] * (2 - len(wrong))),
        ]
        rng.shuffle(picked)
        out[q] = picked
    return out


def select_aggregator(
    registry: Any,
    candidates: Sequence[str],
    pool: Sequence[str],
    validation: Mapping[str, Mapping[str, Any]],
    check: Callable[[str, str], bool],
    loader: Callable[[str], Any],
    answer_format: str = "",
    seed: int = 0,
    template: Callable[[str, Sequence[str], str], str] | None = None,
    progress: bool | None = None,
    **gen: Any,
) -> tuple[str, dict[str, float]]:
    """Each candidate aggregates the synthetic benchmark once (one load each); the most accurate
    is the aggregator (ties: the first candidate). The prompt is the one deployment uses
    (:func:`~moerge.symbolic.execute.aggregate_prompt`) — the released code's benchmark put the
    question first (spec pitfall 4)."""
    from moerge.progress import progress_bar
    from moerge.symbolic.execute import aggregate, aggregate_prompt

    bench = aggregator_benchmark(registry, pool, validation, seed)
    questions = {q: v["question"] for q, v in validation.items()}
    scores = {}
    for c in progress_bar(list(candidates), desc="aggregator candidates (one load each)", progress=progress):
        final, _ = aggregate(questions, bench, loader, c, answer_format, template or aggregate_prompt, **gen)
        scores[c] = sum(bool(check(final[q], validation[q]["answer"])) for q in validation) / len(validation)
    best = max(candidates, key=lambda c: scores[c])
    return best, scores
