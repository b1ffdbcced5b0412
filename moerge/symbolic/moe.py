"""``SymbolicMoE``: the whole method over registered whole-model experts — profile on a
validation set, recruit per query, answer batch-by-model, aggregate (spec §3.2–3.7).

    moe = SymbolicMoE(registry, ["math-7b", "bio-8b", ...], annotator=EmbeddingAnnotator(skills))
    moe.profile(validation)            # {qid: {"question", "answer"[, "keywords"]}}; stored per model
    moe.select_aggregator()            # the synthetic benchmark (or SymbolicMoE(..., aggregator=name))
    result = moe.run(test_questions)   # {qid: text} -> per query: experts, answers, final, majority
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moerge.symbolic.execute import (
    AggregateTemplate,
    aggregate,
    aggregate_prompt,
    load_model_expert,
    run_batched,
    run_batched_ray,
    run_per_query,
)
from moerge.symbolic.profile import profile_models, select_aggregator
from moerge.symbolic.recruit import TAU, K, Recruitment, global_competency, majority_vote, recruit
from moerge.symbolic.skills import map_keywords


def exact_match(response: str, answer: str) -> bool:
    return response.strip() == answer.strip()


def read_questions(source: str | Path | Mapping[str, Mapping[str, Any]], need_answer: bool) -> dict[str, dict[str, Any]]:
    """Questions from a JSONL file — rows ``{"id", "question"[, "answer"][, "keywords"]}``, a
    broken line named by file:line — or as given (``{id: row}``)."""
    if isinstance(source, Mapping):
        rows = {str(q): dict(v) for q, v in source.items()}
        where = "the validation set"
    else:
        from moerge.retrieval.beir import iter_jsonl

        rows, where = {}, str(source)
        for n, row in iter_jsonl(source):
            if not isinstance(row, dict) or "id" not in row or "question" not in row or (need_answer and "answer" not in row):
                raise ValueError(f"{source}:{n}: needs 'id', 'question'{' and answer' if need_answer else ''}")
            rows[str(row["id"])] = row
    if not rows:
        raise ValueError(f"{where} has no questions")
    bad = [q for q, v in rows.items() if "question" not in v or (need_answer and "answer" not in v)]
    if bad:
        raise ValueError(f"question {bad[0]!r} in {where} needs 'question'{' and answer' if need_answer else ''}")
    return rows


def make_annotator(
    registry: Any,
    validation: Mapping[str, Mapping[str, Any]],
    skills: Sequence[str] | None = None,
    annotator: str | None = None,
    instruction_sep: str | None = None,
    device: str = "cpu",
) -> Callable[[Sequence[str]], list[list[str]]]:
    """The annotator a user asks for: a registered instruction-tuned model (the paper's
    :class:`LLMAnnotator`), a skill vocabulary (:class:`EmbeddingAnnotator`, offline), or
    neither — the keywords of the nearest validation questions (:class:`NearestQuestionAnnotator`,
    offline; every validation question must then carry keywords). ``instruction_sep``: the
    nearest-question annotator embeds only the text before it."""
    from moerge.symbolic.profile import EmbeddingAnnotator, LLMAnnotator, NearestQuestionAnnotator

    if annotator:
        return LLMAnnotator(load_model_expert(registry, annotator, device=device))
    if skills:
        return EmbeddingAnnotator(list(skills))
    unlabelled = [q for q, v in validation.items() if not v.get("keywords")]
    if unlabelled:
        raise ValueError(
            f"validation question {unlabelled[0]!r} has no keywords: give a skill vocabulary (skills=, --skills) or an "
            "annotator model (annotator=, --annotator); without either, questions take their nearest validation "
            "questions' keywords, so every validation question needs them"
        )
    sep = instruction_sep
    return NearestQuestionAnnotator(
        {v["question"]: v["keywords"] for v in validation.values()}, text=(lambda q: q.split(sep, 1)[0]) if sep else None
    )


class SymbolicMoE:
    def __init__(
        self,
        registry: Any,
        models: Sequence[str],
        annotator: Callable[[Sequence[str]], list[list[str]]],
        aggregator: str | None = None,
        k: int = K,
        tau: float = TAU,
        seed: int = 0,
        check: Callable[[str, str], bool] = exact_match,
        prompt: Callable[[str], str] = lambda q: q,
        answer_format: str = "",
        aggregate_template: AggregateTemplate = aggregate_prompt,
        device: str = "cpu",
        dtype: Any = "auto",
        **generation: Any,
    ) -> None:
        missing = [m for m in models if registry._resolve(m).kind != "model"]
        if missing:
            raise ValueError(f"Symbolic-MoE recruits whole models (kind 'model'); not one: {missing}")
        self.registry, self.models, self.annotator = registry, list(models), annotator
        self.aggregator, self.k, self.tau, self.seed = aggregator, k, tau, seed
        self.check, self.prompt, self.answer_format, self.device, self.dtype = check, prompt, answer_format, device, dtype
        self.aggregate_template = aggregate_template
        self.generation = {"max_new_tokens": 16, **generation}
        self.profiles: dict[str, dict[str, int]] | None = None
        self.validation: dict[str, dict[str, Any]] | None = None
        self.report: dict[str, Any] = {}

    def _loader(self, name: str) -> Any:
        return load_model_expert(self.registry, name, device=self.device, dtype=self.dtype)

    def profile(self, validation: Mapping[str, Mapping[str, Any]], progress: bool | None = None) -> dict[str, dict[str, int]]:
        """Annotate the questions without ``keywords``, then profile every model (stored profiles
        are loaded; only new models run)."""
        todo = [q for q, v in validation.items() if "keywords" not in v]
        kws = dict(zip(todo, self.annotator([validation[q]["question"] for q in todo]), strict=True)) if todo else {}
        self.validation = {q: {**v, "keywords": list(v.get("keywords", kws.get(q, [])))} for q, v in validation.items()}
        self.profiles, self.report["profile"] = profile_models(
            self.registry, self.models, self.validation, self.check, self._loader, self.prompt, progress, **self.generation
        )
        return self.profiles

    def _need_profiles(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
        if self.profiles is None or self.validation is None:
            raise RuntimeError("profile(validation) first: recruiting needs the models' profiles")
        return self.profiles, self.validation

    @property
    def competency(self) -> dict[str, float]:
        return global_competency(self._need_profiles()[0], self.tau)

    def select_aggregator(self, candidates: Sequence[str] | None = None, progress: bool | None = None) -> str:
        _, validation = self._need_profiles()
        self.aggregator, self.report["aggregator_scores"] = select_aggregator(
            self.registry, list(candidates or self.models), self.models, validation, self.check, self._loader,
            self.answer_format, self.seed, self.aggregate_template, progress, **self.generation,
        )  # fmt: skip
        return self.aggregator

    def recruit(self, questions: Mapping[str, str]) -> dict[str, Any]:
        """Per query: its keywords (annotated, then mapped to the nearest validation keyword) and
        k recruited experts; a query whose keywords no profile knows is recruited uniformly
        (``how="uniform"``, the spec's fallback)."""
        profiles, validation = self._need_profiles()
        raw = dict(zip(questions, self.annotator(list(questions.values())), strict=True))
        vocabulary = sorted({k for v in validation.values() for k in v["keywords"]})
        mapped, sims = map_keywords(raw, vocabulary)
        out = recruit(mapped, profiles, self.k, self.seed, self.tau)
        self.report["keyword_similarity"] = sims
        return out

    def run(
        self,
        questions: Mapping[str, str],
        on_ray: bool = False,
        progress: bool | None = None,
        recruited: Mapping[str, Recruitment] | None = None,
        per_query: bool = False,
        known: Mapping[str, Mapping[str, str]] | None = None,
        **ray_options: Any,
    ) -> dict[str, Any]:
        """Recruit (unless ``recruited`` is given), answer grouped by model (in process, or one
        Ray task per model), aggregate. ``per_query=True`` runs the naive loop instead — each
        query loads each of its recruited models and then the aggregator — for comparison.

        Returns ``{"results": {qid: {experts, how, keywords, answers, final, majority,
        final_from}}, "model_loads", "distinct_models", "aggregator", "seconds"}``. ``final`` is the
        aggregator's answer; where the aggregator answers nothing (or there is none) it is the
        majority vote of the recruited answers and ``final_from`` says ``"majority"``.

        ``known``: model → {qid: answer} already generated for these questions (this instance's
        prompt and generation settings, greedy), e.g. by a run of every model over the test set;
        recruited pairs found there are not generated again (in-process batched runs only)."""
        t0 = time.perf_counter()
        if recruited is None:
            recruited = self.recruit(questions)
        unknown = sorted(set(questions) ^ set(recruited))
        if unknown:
            raise ValueError(f"recruited and questions must have the same ids; differ on {unknown[:3]}")
        prompts = {q: self.prompt(t) for q, t in questions.items()}
        if per_query and on_ray:
            raise ValueError("per_query is the naive in-process loop; it does not run on Ray")
        if known and (per_query or on_ray):
            raise ValueError("known answers are reused by the in-process batched run only, not with per_query or on_ray")
        if on_ray:
            answers, stats = run_batched_ray(recruited, prompts, str(self.registry.root), progress=progress,
                                             **{"dtype": self.dtype, **ray_options}, **self.generation)  # fmt: skip
        elif per_query:
            answers, stats = run_per_query(recruited, prompts, self._loader, progress=progress, **self.generation)
        else:
            answers, stats = run_batched(recruited, prompts, self._loader, progress=progress, known=known,
                                         **self.generation)  # fmt: skip
        loads = stats.model_loads
        final: dict[str, str] = {}
        if self.aggregator is not None:
            groups = [[q] for q in questions] if per_query else [list(questions)]
            for group in groups:
                agg, astats = aggregate({q: questions[q] for q in group}, answers, self._loader, self.aggregator,
                                        self.answer_format, self.aggregate_template, **self.generation)  # fmt: skip
                final.update({q: a for q, a in agg.items() if a.strip()})
                loads += astats.model_loads
        results = {}
        for q, r in recruited.items():
            majority = majority_vote(answers[q])
            results[q] = {"experts": r.experts, "how": r.how, "keywords": r.keywords, "answers": answers[q],
                          "final": final.get(q, majority), "majority": majority,
                          "final_from": "aggregator" if q in final else "majority"}  # fmt: skip
        return {"results": results, "model_loads": loads, "distinct_models": stats.distinct_models,
                "aggregator": self.aggregator, "reused_answers": stats.reused,
                "seconds": time.perf_counter() - t0}  # fmt: skip
