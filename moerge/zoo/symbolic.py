"""The embedded Symbolic-MoE pool: whole-model experts that differ in skill, a validation set
with skills per question, a mixed test set and an aggregator trained on the zoo.

* **Specialists** — the zoo's eight dense fine-tunes, registered as whole models (kind ``model``)
  by reference: nothing is copied.
* **Group models** — the zoo's base fine-tuned on a group of tasks (ordering: reverse, sort,
  tail; mapping: uppercase, shift; numbers: count, max, min), so the pool holds generalists
  beside specialists and no model is good at everything.
* **Aggregator** — the base fine-tuned on the synthetic aggregation task (spec §3.5) built from
  the *training* split: the pool answers training prompts; each example shows the question and
  three of those answers — one correct and two incorrect, or two correct and one incorrect, or
  three correct, shuffled — and the target is the correct answer. It learns to pick the answer
  that fits the question; it is never shown a case with no correct candidate, so it cannot
  rebuild one (the demo reports how it does then). Its prompt is compact
  (:func:`moerge.symbolic.execute.compact_aggregate_prompt`): the zoo's word-level models cannot read the paper's English one.
* **Validation** — the zoo's validation split of each held-in task; each question's keywords
  are its task's skills (``moerge.zoo.tasks``). Profiles are built on it; the offline annotator
  labels new questions from it (the nearest validation questions' keywords).
* **Test** — the zoo's test split of the held-in tasks plus two held-out tasks that ask for a
  held-in skill in phrasings no model and no validation question uses, grouped for reporting.

Built once per zoo (seeded) and cached beside it; the build is atomic (a folder renamed into
place), so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moerge.progress import progress_bar
from moerge.registry import Registry, config_fingerprint
from moerge.symbolic.execute import compact_aggregate_prompt
from moerge.zoo import tasks as T

SYMBOLIC_FORMAT = 1
AGGREGATOR = "aggregator"
#: at most this many words of each response go into the aggregator's prompt (the zoo's base has
#: 64 positions; a correct answer has ≤ 9 words)


@dataclass(frozen=True)
class SymbolicPreset:
    """Everything that determines a pool build besides the zoo itself (its hash names the folder)."""

    name: str
    groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("ordering", ("reverse", "sort", "tail")),
        ("mapping", ("uppercase", "shift")),
        ("numbers", ("count", "max", "min")),
    )
    #: held-out tasks in the test set: a held-in skill asked in unseen phrasings
    unseen: tuple[str, ...] = ("flip_paraphrase", "capital_paraphrase")
    group_steps_per_task: int = 150
    group_lr: float = 1e-3
    aggregator_prompts_per_task: int = 1000
    #: candidate triples drawn per training prompt
    aggregator_draws: int = 2
    aggregator_steps: int = 1500
    aggregator_lr: float = 2e-3
    batch: int = 64
    #: validation / test questions per task
    n_val: int = 40
    n_test: int = 40
    max_new_tokens: int = 10
    seed: int = 0

    def key(self, zoo_key: str) -> str:
        return config_fingerprint({**asdict(self), "zoo": zoo_key, "format": SYMBOLIC_FORMAT})

    def group_of(self, task: str) -> str:
        for group, members in self.groups:
            if task in members:
                return group
        if task in self.unseen:
            return "unseen phrasings"
        raise KeyError(f"task {task!r} is in no group of preset {self.name!r}")


SYMBOLIC_PRESETS: dict[str, SymbolicPreset] = {
    # for tests: the same pipeline at a fraction of the training
    "small": SymbolicPreset(
        "small", group_steps_per_task=80, aggregator_prompts_per_task=300, aggregator_steps=400, n_val=16, n_test=10
    ),  # fmt: skip
    "default": SymbolicPreset("default"),
}


class Pair(NamedTuple):
    """A (prompt, target) training pair, shaped like :class:`moerge.zoo.tasks.Example` for the trainer."""

    prompt: str
    target: str


@dataclass
class SymbolicPool:
    """A built pool on disk: its registry (specialists, group models, aggregator) and data."""

    root: Path
    preset: SymbolicPreset
    meta: dict[str, Any]

    @property
    def registry(self) -> Registry:
        return Registry(self.root / "registry")

    @property
    def models(self) -> list[str]:
        """The recruitable experts (the aggregator is not one of them)."""
        return list(self.meta["models"])

    @property
    def aggregator(self) -> str:
        return AGGREGATOR

    def validation(self) -> dict[str, dict[str, Any]]:
        """qid → question, answer, keywords (the task's skills), task."""
        return json.loads((self.root / "validation.json").read_text())

    def test(self) -> dict[str, dict[str, Any]]:
        """qid → question, answer, task, group (no keywords: the annotator finds them)."""
        return json.loads((self.root / "test.json").read_text())


def validation_set(zoo: Any, p: SymbolicPreset) -> dict[str, dict[str, Any]]:
    out = {}
    for task in zoo.held_in:
        for i, e in enumerate(zoo.val_split(task)[: p.n_val]):
            out[f"val-{task}-{i}"] = {"question": e.prompt, "answer": e.target, "keywords": list(T.get_task(task).skills),
                                      "task": task}  # fmt: skip
    return out


def test_set(zoo: Any, p: SymbolicPreset) -> dict[str, dict[str, Any]]:
    out = {}
    for task in (*zoo.held_in, *p.unseen):
        for i, e in enumerate(zoo.test_split(task)[: p.n_test]):
            out[f"test-{task}-{i}"] = {"question": e.prompt, "answer": e.target, "task": task, "group": p.group_of(task)}
    return out


def load_pool(
    zoo: Any, preset: str | SymbolicPreset | None = None, root: str | Path | None = None, progress: bool | None = None
) -> SymbolicPool:
    """The pool for ``zoo`` (preset: the zoo preset's name), built on first use and cached in
    ``root`` (default: ``<zoo cache>/symbolic/<zoo>-<key>``)."""
    from moerge.runtime import locked

    if preset is None:
        preset = zoo.preset.name if zoo.preset.name in SYMBOLIC_PRESETS else "small"
    if isinstance(preset, str):
        if preset not in SYMBOLIC_PRESETS:
            raise KeyError(f"unknown symbolic pool preset {preset!r}; choose one of {sorted(SYMBOLIC_PRESETS)}")
        from moerge.runtime import seeded

        preset = seeded(SYMBOLIC_PRESETS[preset])  # $MOERGE_ZOO_SEED: another build of the named preset
    missing = [t for _, ts in preset.groups for t in ts if t not in zoo.held_in]
    if missing:
        raise ValueError(f"the pool's groups name tasks the zoo has no expert for: {missing}")
    key = preset.key(zoo.root.name)
    folder = Path(root) if root is not None else zoo.root.parent.parent / "symbolic" / f"{zoo.root.name}-{key}"
    with locked(folder.with_name(f".{folder.name}.lock")):
        if not (folder / "meta.json").exists():
            _build(zoo, preset, folder, progress)
    return SymbolicPool(folder, preset, json.loads((folder / "meta.json").read_text()))


def _train(model: torch.nn.Module, tok: Any, pairs: Sequence[Any], steps: int, lr: float, p: SymbolicPreset,
           seed: int, desc: str, progress: bool | None) -> float:  # fmt: skip
    from moerge.zoo.train import train_loop

    losses = train_loop(model, tok, pairs, steps=steps, batch_size=p.batch, lr=lr, seed=seed, desc=desc, progress=progress)
    return sum(losses[-20:]) / len(losses[-20:])


def _build(zoo: Any, p: SymbolicPreset, root: Path, progress: bool | None) -> None:
    from moerge.symbolic.execute import load_model_expert, run_batched
    from moerge.symbolic.recruit import Recruitment
    from moerge.zoo.train import generate_answers

    t0 = time.perf_counter()
    tmp = root.with_name(root.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    reg = Registry(tmp / "registry")
    tok = zoo.tokenizer()
    base = zoo.load_base()
    timings: dict[str, float] = {}
    for task in zoo.held_in:
        t = T.get_task(task)
        reg.register(zoo.dense_path(task), task, kind="model", reference=True, skills=list(t.skills),
                     description=f"specialist: the zoo's dense fine-tune on {task} ({t.description})",
                     tags=["zoo", "symbolic", "specialist"])  # fmt: skip
    groups: dict[str, dict[str, Any]] = {}
    bar = progress_bar(list(p.groups), desc="group models", progress=progress)
    for i, (group, members) in enumerate(bar):
        t1 = time.perf_counter()
        model = copy.deepcopy(base)
        pairs = [e for task in members for e in zoo.train_split(task)]
        loss = _train(model, tok, pairs, p.group_steps_per_task * len(members), p.group_lr, p, p.seed * 100 + i,
                      f"group {group}", progress)  # fmt: skip
        val = {t: T.exact_match(generate_answers(model, tok, [e.prompt for e in zoo.val_split(t)[: p.n_val]]),
                                zoo.val_split(t)[: p.n_val]) for t in members}  # fmt: skip
        folder = tmp / "build" / f"group-{group}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        skills = sorted({s for t in members for s in T.get_task(t).skills})
        reg.register(folder, f"group-{group}", kind="model", skills=skills, metrics={f"val_exact_match_{t}": v for t, v in val.items()},
                     description=f"the zoo's base fine-tuned on the {group} tasks ({', '.join(members)})",
                     tags=["zoo", "symbolic", "group"])  # fmt: skip
        groups[group] = {"tasks": list(members), "final_loss": loss, "val_exact_match": val, "seconds": time.perf_counter() - t1}
    timings["groups_s"] = time.perf_counter() - t0
    models = [*zoo.held_in, *(f"group-{g}" for g, _ in p.groups)]

    # the synthetic aggregation task, from the pool's answers to training prompts
    t1 = time.perf_counter()
    rng = random.Random(p.seed)
    train = [e for task in zoo.held_in for e in zoo.train_split(task)[: p.aggregator_prompts_per_task]]
    prompts = {f"t{i}": e.prompt for i, e in enumerate(train)}
    answers, _ = run_batched({q: Recruitment(list(models), None) for q in prompts}, prompts,
                             lambda name: load_model_expert(reg, name), progress=progress,
                             max_new_tokens=p.max_new_tokens, batch_size=128)  # fmt: skip
    pairs: list[Pair] = []
    for i, e in enumerate(train):
        wrong = sorted({a for a in answers[f"t{i}"] if " ".join(a.split()) != e.target})
        for _ in range(p.aggregator_draws):
            n_right = rng.choices([1, 2, 3], weights=[0.6, 0.25, 0.15])[0]
            picked = [e.target] * n_right + [rng.choice(wrong) if wrong else "" for _ in range(3 - n_right)]
            rng.shuffle(picked)
            pairs.append(Pair(compact_aggregate_prompt(e.prompt, picked), e.target))
    timings["aggregator_data_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    agg = copy.deepcopy(base)
    agg_loss = _train(agg, tok, pairs, p.aggregator_steps, p.aggregator_lr, p, p.seed + 7, "aggregator", progress)
    folder = tmp / "build" / AGGREGATOR
    agg.save_pretrained(folder)
    tok.save_pretrained(folder)
    reg.register(folder, AGGREGATOR, kind="model", skills=["answer aggregation"],
                 description="the zoo's base fine-tuned to pick the correct answer among three (the synthetic aggregation task)",
                 tags=["zoo", "symbolic", "aggregator"])  # fmt: skip
    timings["aggregator_s"] = time.perf_counter() - t1
    shutil.rmtree(tmp / "build")
    (tmp / "validation.json").write_text(json.dumps(validation_set(zoo, p), indent=1))
    (tmp / "test.json").write_text(json.dumps(test_set(zoo, p), indent=1))
    timings["total_s"] = time.perf_counter() - t0
    meta = {"preset": asdict(p), "zoo": str(zoo.root), "format": SYMBOLIC_FORMAT, "models": models,
            "aggregator": AGGREGATOR, "groups": groups, "aggregator_training": {"examples": len(pairs), "final_loss": agg_loss},
            "timings": timings, "torch": torch.__version__}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


def with_overrides(preset: str, **overrides: Any) -> SymbolicPreset:
    """A pool preset with some fields changed (its cache key changes with them)."""
    return replace(SYMBOLIC_PRESETS[preset], **overrides)
