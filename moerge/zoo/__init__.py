"""The embedded default: a synthetic task suite, a tiny base model and experts trained on it,
so every part of moerge runs offline on a laptop CPU."""

from moerge.zoo.build import PRESETS, Preset, Zoo, default_cache_dir, load, with_overrides
from moerge.zoo.tasks import HELD_IN, HELD_OUT, PRETRAIN, TASKS, Example, Task, exact_match, get_task, sample, split

__all__ = [
    "HELD_IN",
    "HELD_OUT",
    "PRESETS",
    "PRETRAIN",
    "TASKS",
    "Example",
    "Preset",
    "Task",
    "Zoo",
    "default_cache_dir",
    "exact_match",
    "get_task",
    "load",
    "sample",
    "split",
    "with_overrides",
]
