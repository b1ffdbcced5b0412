"""``SymbolicMoE``: the whole method over registered whole-model experts — profile on a
validation set, recruit per query, answer batch-by-model, aggregate (spec §3.2–3.7).

    moe = SymbolicMoE(registry, ["math-7b", "bio-8b", ...], annotator=EmbeddingAnnotator(skills))
    moe.profile(validation)            # {qid: {"question", "answer"[, "keywords"]}}; stored per model
    moe.select_aggregator()            # the synthetic benchmark (or SymbolicMoE(..., aggregator=name))
    result = moe.run(test_questions)   # {qid: text} -> per query: experts, answers, final, majority
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moerge.symbolic.execute import aggregate, load_model_expert, run_batched, run_batched_ray
from moerge.symbolic.profile import profile_models, select_aggregator
from moerge.symbolic.recruit import TAU, K, global_competency, majority_vote, recruit
from moerge.symbolic.skills import map_keywords


def exact_match(response: str, answer: str) -> bool:
    return response.strip() == answer.strip()


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
        device: str = "cpu",
        **generation: Any,
    ) -> None:
        missing = [m for m in models if registry._resolve(m).kind != "model"]
        if missing:
            raise ValueError(f"Symbolic-MoE recruits whole models (kind 'model'); not one: {missing}")
        self.registry, self.models, self.annotator = registry, list(models), annotator
        self.aggregator, self.k, self.tau, self.seed = aggregator, k, tau, seed
        self.check, self.prompt, self.answer_format, self.device = check, prompt, answer_format, device
        self.generation = {"max_new_tokens": 16, **generation}
        self.profiles: dict[str, dict[str, int]] | None = None
        self.validation: dict[str, dict[str, Any]] | None = None
        self.report: dict[str, Any] = {}

    def _loader(self, name: str) -> Any:
        return load_model_expert(self.registry, name, device=self.device)

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
            self.answer_format, self.seed, **self.generation,
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
        self, questions: Mapping[str, str], on_ray: bool = False, progress: bool | None = None, **ray_options: Any
    ) -> dict[str, Any]:
        """Recruit, answer grouped by model (in process, or one Ray task per model), aggregate.
        Returns ``{"results": {qid: {experts, how, answers, final, majority}}, "model_loads",
        "distinct_models"}``; ``final`` is None without an aggregator (majority vote only)."""
        recruited = self.recruit(questions)
        prompts = {q: self.prompt(t) for q, t in questions.items()}
        if on_ray:
            answers, stats = run_batched_ray(recruited, prompts, str(self.registry.root), progress=progress,
                                             **ray_options, **self.generation)  # fmt: skip
        else:
            answers, stats = run_batched(recruited, prompts, self._loader, progress=progress, **self.generation)
        loads = stats.model_loads
        final: dict[str, str | None] = dict.fromkeys(questions)
        if self.aggregator is not None:
            agg, astats = aggregate(questions, answers, self._loader, self.aggregator, self.answer_format, **self.generation)
            final.update(agg)
            loads += astats.model_loads
        results = {
            q: {"experts": r.experts, "how": r.how, "keywords": r.keywords, "answers": answers[q], "final": final[q],
                "majority": majority_vote(answers[q])}
            for q, r in recruited.items()
        }  # fmt: skip
        return {"results": results, "model_loads": loads, "distinct_models": stats.distinct_models, "aggregator": self.aggregator}
