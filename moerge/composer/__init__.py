"""The user-facing composition API: ``compose(base, experts, router=...)`` → :class:`ComposedModel`."""

from moerge.composer.compose import ComposedModel, CompositionSpec, compose, load_base, load_composition
from moerge.composer.explain import Explanation

__all__ = ["ComposedModel", "CompositionSpec", "Explanation", "compose", "load_base", "load_composition"]
