"""Symbolic-MoE (issue 15; in progress): skill-based recruiting of whole-model experts.

This first increment is the method's model-agnostic core — keyword parsing and consensus,
validation profiles, global competency γ, local suitability, the recruiting distribution,
seeded k = 3 sampling with replacement, keyword mapping by MiniLM, and the batch-by-model plan.
Whole-model experts in the registry, the annotator and aggregator runs, Ray execution, the zoo's
pool and the demo rows are not built yet (README).
"""

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
    "Recruitment",
    "build_profiles",
    "consensus_keywords",
    "global_competency",
    "local_suitability",
    "majority_vote",
    "map_keywords",
    "parse_keywords",
    "plan_by_model",
    "recruit",
    "recruit_distribution",
    "sample_experts",
]
