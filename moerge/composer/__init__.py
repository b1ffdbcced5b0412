"""The user-facing API: ``compose(base, experts, router=...)`` → :class:`ComposedModel`, and
``merge(base, experts, method=...)`` → a merged model or LoRA, and ``lorahub(base, experts,
examples)`` → one LoRA whose per-expert weights were searched on a few examples."""

from moerge.composer.adamerging import AdaMergingReport, adamerging
from moerge.composer.compose import ComposedModel, CompositionSpec, compose, load_base, load_composition
from moerge.composer.explain import Explanation
from moerge.composer.lorahub import LoraHubReport, lorahub
from moerge.composer.merge import MergeReport, merge
from moerge.composer.mergekit import MergeConfigError, merge_from_config

__all__ = [
    "AdaMergingReport",
    "adamerging",
    "ComposedModel",
    "CompositionSpec",
    "Explanation",
    "MergeConfigError",
    "MergeReport",
    "compose",
    "load_base",
    "load_composition",
    "LoraHubReport",
    "lorahub",
    "merge",
    "merge_from_config",
]
