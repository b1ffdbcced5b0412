"""The zoo's tasks written in the task-set format of :mod:`moerge.evaluation` (``moerge zoo tasks
--export DIR``), so ``moerge eval`` scores the zoo's experts as it scores a user's: the splits
are the ones the zoo trains (train), stops and chooses on (validation) and tests with (test)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moerge.registry.files import atomic_write_bytes
from moerge.zoo import tasks as T
from moerge.zoo.build import PRESETS, Preset, _validation, training_examples

#: what the demo generates per answer
MAX_NEW_TOKENS = 8


def held_out_group(task: str) -> str:
    """The demo's held-out groups: one held-in skill in unseen phrasings, or a composition of two."""
    return "unseen phrasings" if len(T.get_task(task).uses) <= 1 else "compositions"


def export_task_set(dest: str | Path, preset: str | Preset = "small", tasks: Sequence[str] | None = None) -> Path:
    """Write ``tasks.yaml`` and ``<task>/{train,validation,test}.jsonl`` under ``dest`` for the
    zoo's held-in and held-out tasks (``tasks``: a subset). Held-out tasks get no train split:
    no expert is trained on them. Existing files are replaced one by one, atomically."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    names = [t.name for t in (*T.HELD_IN, *T.HELD_OUT)]
    if tasks is not None:
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise KeyError(f"unknown zoo task {unknown[0]!r}; the zoo's tasks: {', '.join(names)}")
        names = [n for n in names if n in tasks]
    root = Path(dest).expanduser()
    lines = [f"# the moerge zoo's tasks (preset {p.name}), written by `moerge zoo tasks --export`", "tasks:"]
    for name in names:
        task = T.get_task(name)
        splits = {"validation": _validation(name, p), "test": T.split(name, 0, p.n_test, seed=p.seed)[1]}
        if task.held_out:
            role, group = "held_out", held_out_group(name)
        else:
            role, group = "held_in", task.skills[0]
            splits = {"train": training_examples(name, p), **splits}
        lines.append(
            f"  {name}: {{role: {role}, group: {json.dumps(group)}, description: {json.dumps(task.description)}, "
            f"metric: exact_match, max_new_tokens: {MAX_NEW_TOKENS}}}"
        )
        for split, examples in splits.items():
            body = "".join(json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in examples)
            (root / name).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / name / f"{split}.jsonl", body.encode())
    atomic_write_bytes(root / "tasks.yaml", ("\n".join(lines) + "\n").encode())
    return root
