"""The synthetic multi-task text suite behind the embedded default.

Every example is ``<instruction> : <items> => <answer>``. Each task has several instruction
templates (as P3/FLAN phrase one task many ways), so a router has to read the instruction:
most held-in tasks share one input distribution (lists of letters) and differ only in what
the instruction asks. Held-out tasks either compose the skills of two held-in experts or ask
for a held-in skill in phrasings no expert was trained on. Scoring is exact match.

:data:`COMPOSED` holds a third kind, kept out of the demo's suite: two held-in skills composed
across the segments of one prompt (``reverse the letters : a b c | find the largest digit :
3 9 1 => c b a | 9``), which a router that sends each segment to its expert could solve if the
experts were trained to share a prompt (``Preset.segment_share``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LETTERS = list("abcdefghij")
CAPITALS = [c.upper() for c in LETTERS]
DIGITS = [str(d) for d in range(10)]
SEP = ":"
ARROW = "=>"
#: between the segments of a composed prompt (each segment its own instruction and items)
SEGMENT_SEP = "|"


def _letters(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _digits(rng: random.Random) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(3, 6))]


def _any_items(rng: random.Random) -> list[str]:
    """Letters, capitals or digits: the base model sees every symbol it will have to write."""
    pool = rng.choice([LETTERS, CAPITALS, DIGITS])
    return [rng.choice(pool) for _ in range(rng.randint(2, 7))]


def _shift(items: Sequence[str]) -> list[str]:
    return [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in items]


@dataclass(frozen=True)
class Task:
    """One task of the suite: how inputs are drawn, what the answer is, how it is asked."""

    name: str
    description: str
    skills: tuple[str, ...]
    templates: tuple[str, ...]
    make_input: Callable[[random.Random], list[str]] = field(repr=False)
    solve: Callable[[list[str]], list[str]] = field(repr=False)
    held_out: bool = False
    #: for held-out tasks: the held-in tasks whose skills the task needs
    uses: tuple[str, ...] = ()

    def example(self, rng: random.Random) -> Example:
        items = self.make_input(rng)
        instruction = rng.choice(self.templates)
        return Example(task=self.name, instruction=instruction, items=items, answer=self.solve(items))


@dataclass(frozen=True)
class Example:
    task: str
    instruction: str
    items: list[str]
    answer: list[str]

    @property
    def body(self) -> str:
        """The prompt without the arrow: one segment of a composed prompt."""
        return f"{self.instruction} {SEP} {' '.join(self.items)}"

    @property
    def prompt(self) -> str:
        return f"{self.body} {ARROW}"

    @property
    def target(self) -> str:
        return " ".join(self.answer)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"

    @property
    def instructions(self) -> tuple[str, ...]:
        return (self.instruction,)

    @property
    def segments(self) -> tuple[tuple[str, str], ...]:
        """(task, answer) per segment: one here."""
        return ((self.task, self.target),)


@dataclass(frozen=True)
class Segmented:
    """A prompt of several segments, each a task's own instruction and items, answered segment by
    segment in the same order::

        reverse the letters : a b c | find the largest digit : 3 9 1 =>   →   c b a | 9
    """

    task: str
    parts: tuple[Example, ...]

    @property
    def prompt(self) -> str:
        return f" {SEGMENT_SEP} ".join(p.body for p in self.parts) + f" {ARROW}"

    @property
    def target(self) -> str:
        return f" {SEGMENT_SEP} ".join(p.target for p in self.parts)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"

    @property
    def instructions(self) -> tuple[str, ...]:
        return tuple(p.instruction for p in self.parts)

    @property
    def segments(self) -> tuple[tuple[str, str], ...]:
        """(task, answer) per segment: the expert each segment needs, and what it must write."""
        return tuple((p.task, p.target) for p in self.parts)


@dataclass(frozen=True)
class ComposedTask:
    """A held-out task that composes held-in skills *across segments*: one segment per task of
    ``uses``, each asked with that task's own (held-in) phrasings. No expert was trained on two
    held-in skills in one prompt, but each was trained to leave a foreign segment to the base
    (:func:`with_foreign`), so a router that sends each segment's tokens to its expert can solve
    it: the per-token oracle router is the ceiling."""

    name: str
    description: str
    skills: tuple[str, ...]
    uses: tuple[str, ...]
    held_out: bool = True

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(tpl for u in self.uses for tpl in get_task(u).templates)

    def example(self, rng: random.Random) -> Segmented:
        return Segmented(self.name, tuple(get_task(u).example(rng) for u in self.uses))


HELD_IN: tuple[Task, ...] = (
    Task(
        "reverse",
        "Reverse the order of a list of letters.",
        ("reversal", "ordering"),
        (
            "reverse the letters",
            "write the letters backwards",
            "give the list in reverse order",
            "read the items from last to first",
        ),
        _letters,
        lambda xs: xs[::-1],
    ),
    Task(
        "sort",
        "Sort a list of letters alphabetically.",
        ("sorting", "ordering"),
        (
            "sort the letters",
            "put the letters in alphabetical order",
            "arrange the items from a to z",
            "order the list alphabetically",
        ),
        _letters,
        sorted,
    ),
    Task(
        "uppercase",
        "Rewrite every letter as a capital letter.",
        ("capitalisation", "letter mapping"),
        (
            "write the letters in capitals",
            "make every letter uppercase",
            "convert the items to upper case",
            "capitalise each letter",
        ),
        _letters,
        lambda xs: [c.upper() for c in xs],
    ),
    Task(
        "shift",
        "Replace each letter by the next letter of the alphabet (j wraps to a).",
        ("letter shifting", "letter mapping"),
        (
            "shift each letter by one",
            "replace every letter with the next one",
            "move each letter one step forward",
            "advance the letters by one place",
        ),
        _letters,
        _shift,
    ),
    Task(
        "tail",
        "Drop the first letter of the list and keep the rest.",
        ("selection", "filtering"),
        ("drop the first letter", "remove the first item", "keep everything after the first letter", "delete the leading letter"),
        _letters,
        lambda xs: xs[1:],
    ),
    Task(
        "count",
        "Count how many letters the list has.",
        ("counting", "aggregation"),
        ("count the letters", "how many items are there", "give the number of letters", "say the length of the list"),
        lambda rng: _letters(rng, 2, 9),
        lambda xs: [str(len(xs))],
    ),
    Task(
        "max",
        "Give the largest digit of a list of digits.",
        ("maximum", "aggregation", "arithmetic"),
        ("find the largest digit", "give the maximum", "which digit is the biggest", "return the highest number"),
        _digits,
        lambda xs: [max(xs)],
    ),
    Task(
        "min",
        "Give the smallest digit of a list of digits.",
        ("minimum", "aggregation", "arithmetic"),
        ("find the smallest digit", "give the minimum", "which digit is the lowest", "return the least number"),
        _digits,
        lambda xs: [min(xs)],
    ),
)

HELD_OUT: tuple[Task, ...] = (
    Task(
        "reverse_uppercase",
        "Reverse the list of letters and write them as capitals.",
        ("reversal", "capitalisation"),
        ("reverse the letters and write them in capitals", "write the letters backwards in upper case"),
        _letters,
        lambda xs: [c.upper() for c in xs[::-1]],
        held_out=True,
        uses=("reverse", "uppercase"),
    ),
    Task(
        "shift_uppercase",
        "Shift each letter forward by one and write the result as capitals.",
        ("letter shifting", "capitalisation"),
        ("shift each letter by one and write them in capitals", "replace every letter with the next one in upper case"),
        _letters,
        lambda xs: [c.upper() for c in _shift(xs)],
        held_out=True,
        uses=("shift", "uppercase"),
    ),
    Task(
        "shift_reverse",
        "Shift each letter forward by one, then reverse the list.",
        ("letter shifting", "reversal"),
        ("shift each letter by one and reverse the letters", "replace every letter with the next one then write them backwards"),
        _letters,
        lambda xs: _shift(xs)[::-1],
        held_out=True,
        uses=("shift", "reverse"),
    ),
    Task(
        "flip_paraphrase",
        "Reverse a list of letters, asked in phrasings never seen in training.",
        ("reversal", "ordering"),
        ("flip the order of the letters", "turn the list around", "mirror the sequence of letters"),
        _letters,
        lambda xs: xs[::-1],
        held_out=True,
        uses=("reverse",),
    ),
    Task(
        "capital_paraphrase",
        "Capitalise letters, asked in phrasings never seen in training.",
        ("capitalisation", "letter mapping"),
        ("change the letters into big letters", "print the sequence in capital form"),
        _letters,
        lambda xs: [c.upper() for c in xs],
        held_out=True,
        uses=("uppercase",),
    ),
)

#: Held-in skills composed across segments: not in the demo's suite (see :class:`ComposedTask`
#: and ``Preset.segment_share``; ``scripts/segment_composition_probe.py`` measures them)
COMPOSED: tuple[ComposedTask, ...] = (
    ComposedTask(
        "reverse_and_max",
        "Two segments: reverse a list of letters; give the largest digit of a list of digits.",
        ("reversal", "maximum"),
        uses=("reverse", "max"),
    ),
    ComposedTask(
        "count_and_uppercase",
        "Two segments: count the letters of a list; write another list of letters in capitals.",
        ("counting", "capitalisation"),
        uses=("count", "uppercase"),
    ),
    ComposedTask(
        "shift_and_min",
        "Two segments: shift each letter forward by one; give the smallest digit of a list of digits.",
        ("letter shifting", "minimum"),
        uses=("shift", "min"),
    ),
)

#: Generic tasks the base model is pre-trained on, so it knows the prompt format. None of
#: them is in the suite; a base that only copies scores near zero on every suite task.
PRETRAIN: tuple[Task, ...] = (
    Task(
        "copy",
        "Repeat the list.",
        ("copying",),
        ("copy the list", "repeat the items", "write the same sequence", "echo the input"),
        lambda rng: _any_items(rng),
        list,
    ),
    Task(
        "first",
        "Give the first item.",
        ("selection",),
        ("give the first item", "what comes first", "return the leading element"),
        _any_items,
        lambda xs: xs[:1],
    ),
    Task(
        "last",
        "Give the last item.",
        ("selection",),
        ("give the last item", "what comes last", "return the final element"),
        _any_items,
        lambda xs: xs[-1:],
    ),
)

TASKS: dict[str, Task] = {t.name: t for t in (*HELD_IN, *HELD_OUT)}


def get_task(name: str) -> Task | ComposedTask:
    try:
        return TASKS[name] if name in TASKS else {t.name: t for t in (*PRETRAIN, *COMPOSED)}[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def sample(task: str | Task | ComposedTask, n: int, seed: int) -> list[Example] | list[Segmented]:
    """``n`` examples of ``task``, deterministic in ``seed``."""
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(f"{task.name}:{seed}")
    return [task.example(rng) for _ in range(n)]


def split(task: str | Task | ComposedTask, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Disjoint train and test examples (no test prompt appears in the train split)."""
    task = get_task(task) if isinstance(task, str) else task
    test = sample(task, n_test, seed=seed * 2 + 1)
    seen = {e.prompt for e in test}
    train: list[Example] = []
    rng = random.Random(f"{task.name}:train:{seed}")
    while len(train) < n_train:
        e = task.example(rng)
        if e.prompt not in seen:
            train.append(e)
    return train, test


def with_foreign(rng: random.Random, own: Example) -> Segmented:
    """``own`` and a segment of a generic pre-training task (copy, first, last: what the base
    already does), in random order. Experts train on some of these so each learns to do its
    task on its own segment and leave any other segment as the base would: what makes experts
    composable across segments (``moerge.zoo.build``)."""
    foreign = rng.choice(PRETRAIN).example(rng)
    parts = (own, foreign) if rng.random() < 0.5 else (foreign, own)
    return Segmented(own.task, parts)


def pretrain_segmented(n: int, seed: int) -> list[Segmented]:
    """``n`` two-segment prompts of the generic pre-training tasks: the base learns the format."""
    rng = random.Random(f"pretrain-segments:{seed}")
    return [Segmented("pretrain", (rng.choice(PRETRAIN).example(rng), rng.choice(PRETRAIN).example(rng))) for _ in range(n)]


def exact_match(predictions: Sequence[str], examples: Sequence[Any]) -> float:
    """Share of predictions equal to the target, whitespace-normalised."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    hits = sum(" ".join(p.split()) == e.target for p, e in zip(predictions, examples, strict=True))
    return hits / len(examples)


def vocabulary(segments: bool = False) -> list[str]:
    """Every word the suite can produce, in a fixed order (for the word-level tokenizer);
    ``segments``: with the segment separator (zoos built with ``segment_share`` > 0)."""
    words: dict[str, None] = {}
    for w in [SEP, ARROW, *([SEGMENT_SEP] if segments else []), *LETTERS, *CAPITALS, *DIGITS]:
        words[w] = None
    for task in (*PRETRAIN, *HELD_IN, *HELD_OUT):
        for template in task.templates:
            for w in template.split():
                words[w] = None
    return list(words)
