"""Symbolic-MoE (issue 15; in progress): skill-based recruiting of whole-model experts.

Built so far: the recruiting maths (keyword parsing and consensus, validation profiles, global
competency γ, local suitability, the recruiting distribution, seeded k = 3 sampling with
replacement, keyword mapping by MiniLM, the batch-by-model plan) in :mod:`.recruit`; the LLM and
the offline embedding annotators and profiling stored as registry artifacts in :mod:`.profile`;
in-process batch-by-model execution (one load per recruited model), the naive per-query loop and
the aggregation pass and one Ray task per model (``run_batched_ray``) in :mod:`.execute`;
aggregator selection by the synthetic benchmark in :mod:`.profile`; the whole method as
:class:`SymbolicMoE` (and ``moerge symbolic profile|run``). Not yet: the zoo's pool and
aggregator, the demo rows and serving (README).
"""

from moerge.symbolic.moe import SymbolicMoE
from moerge.symbolic.profile import EmbeddingAnnotator, LLMAnnotator, NearestQuestionAnnotator, profile_models
from moerge.symbolic.recruit import (
    ANNOTATOR_PROMPT,
    Recruitment,
    build_profiles,
    consensus_keywords,
    global_competency,
    local_suitability,
    majority_vote,
    parse_keywords,
    plan_by_model,
    recruit,
    recruit_distribution,
    sample_experts,
)
from moerge.symbolic.skills import map_keywords

__all__ = [
    "ANNOTATOR_PROMPT",
    "EmbeddingAnnotator",
    "LLMAnnotator",
    "NearestQuestionAnnotator",
    "Recruitment",
    "SymbolicMoE",
    "build_profiles",
    "consensus_keywords",
    "global_competency",
    "local_suitability",
    "majority_vote",
    "map_keywords",
    "parse_keywords",
    "plan_by_model",
    "profile_models",
    "recruit",
    "recruit_distribution",
    "sample_experts",
]
