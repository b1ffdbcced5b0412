"""Symbolic-MoE (Chen et al., 2025): skill-based recruiting of whole-model experts.

The recruiting maths (keyword parsing and consensus, validation profiles, global competency γ,
local suitability, the recruiting distribution, seeded k = 3 sampling with replacement, keyword
mapping by MiniLM, the batch-by-model plan) are in :mod:`.recruit`; the LLM, embedding and
nearest-question annotators, profiling stored as registry artifacts and aggregator selection by
the synthetic benchmark in :mod:`.profile`; batch-by-model execution in process and on Ray (one
load per recruited model), the naive per-query loop and the aggregation pass in :mod:`.execute`;
the whole method as :class:`SymbolicMoE` in :mod:`.moe` (``moerge symbolic profile|run``). The
zoo's pool and aggregator are :mod:`moerge.zoo.symbolic`; serving is :mod:`moerge.serving.symbolic`.
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
