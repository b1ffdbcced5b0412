"""The task-set format ``moerge eval`` scores a pool on: a folder with ``tasks.yaml`` (or
``tasks.json``) and one sub-folder per task holding ``train.jsonl``, ``validation.jsonl`` and
``test.jsonl``. Everything is validated when the set is read, and a bad line is named by
``file:line``.

::

    tasks/
      tasks.yaml             tasks: {sort: {role: held_in, group: letters, metric: exact_match}, mirror: {role: held_out}}
      sort/train.jsonl       {"prompt": "...", "target": "..."} per line
      sort/validation.jsonl  or {"messages": [{"role": "user", "content": "..."}], "targets": ["...", "..."]}
      sort/test.jsonl
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.evaluation.metrics import NORMALIZERS, check_metric
from moerge.hints import did_you_mean
from moerge.registry.schema import InvalidNameError, validate_name

SPLITS = ("train", "validation", "test")
TASK_FILES = ("tasks.yaml", "tasks.yml", "tasks.json")


class TaskSetError(ValueError):
    """A task set that cannot be read: the message names the file (and line) and what is wrong."""


class TaskSpec(BaseModel):
    """One task's entry in ``tasks.yaml``. Defaults: exact match after stripping and collapsing
    whitespace, 16 new tokens, no stop strings."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["held_in", "held_out"]
    #: held-out tasks are reported by group too (``held_out_groups``); default: the task's role
    group: str | None = None
    description: str = ""
    #: ``exact_match``, ``prefix`` (the answer starts with a target), ``contains`` (a target
    #: occurs in the answer), or a user metric ``package.module:function`` (prediction, targets) → [0, 1]
    metric: str = "exact_match"
    #: applied to prediction and targets before the metric: ``strip``, ``whitespace`` (collapse
    #: runs of spaces), ``case`` (lower-case), ``punctuation`` (drop it)
    normalize: list[str] = Field(default_factory=lambda: ["strip", "whitespace"])
    max_new_tokens: int = Field(16, ge=1)
    #: the answer is cut at the first of these strings
    stop: list[str] = Field(default_factory=list)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return check_metric(v)

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, v: list[str]) -> list[str]:
        for n in v:
            if n not in NORMALIZERS:
                raise ValueError(f"unknown normalisation {n!r}{did_you_mean(n, NORMALIZERS)}; choose from {sorted(NORMALIZERS)}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class TaskSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, TaskSpec]

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        if not v:
            raise ValueError("the task set declares no task")
        for name in v:
            try:
                validate_name(name)
            except InvalidNameError as exc:
                raise ValueError(str(exc).replace("expert name", "task name")) from None
        if not any(t.role == "held_in" for t in v.values()):
            raise ValueError("the task set has no held_in task (the experts' own tasks: what the scores are normalised to)")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str


class ExampleLine(BaseModel):
    """One JSONL line: ``prompt`` or chat ``messages``; ``target`` or ``targets`` (any of them is right)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[Message] | None = None
    target: str | None = None
    targets: list[str] | None = None
    id: str | int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of_each(self) -> ExampleLine:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" and "messages"')
        if self.messages is not None and not self.messages:
            raise ValueError('"messages" is empty')
        if (self.target is None) == (self.targets is None):
            raise ValueError('give exactly one of "target" and "targets"')
        if self.targets is not None and not self.targets:
            raise ValueError('"targets" is empty')
        return self


@dataclass(frozen=True)
class TaskExample:
    """An example as read: a prompt (or chat messages, rendered later with the base's template)
    and its right answers; ``where`` is ``file:line``."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    targets: tuple[str, ...]
    where: str

    @property
    def target(self) -> str:
        """The first right answer (what a router trained on (prompt, target) pairs sees)."""
        return self.targets[0]

    @property
    def query(self) -> str | None:
        """What an instruction embedding (GLIDER's global router) reads for a chat example: its
        last user message, without the template's system prompt and markers; None for a plain
        prompt (the prompt itself is the query)."""
        if self.messages is None:
            return None
        return next((c for r, c in reversed(self.messages) if r == "user"), None)

    def render(self, chat_template: Callable[[list[dict[str, str]]], str] | None) -> str:
        if self.prompt is not None:
            return self.prompt
        if chat_template is None:
            raise TaskSetError(f"{self.where}: a chat example (messages), but the base's tokenizer has no chat template")
        return chat_template([{"role": r, "content": c} for r, c in self.messages or ()])


@dataclass
class Task:
    name: str
    spec: TaskSpec
    folder: Path
    splits: dict[str, list[TaskExample]] = field(default_factory=dict)
    #: sha256 of each split file's bytes (the score cache's key: an edited file is scored again)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def group(self) -> str:
        return self.spec.group or self.spec.role.replace("_", "-")

    def split(self, name: str) -> list[TaskExample]:
        return self.splits.get(name, [])


@dataclass
class TaskSet:
    """A read and validated task set."""

    root: Path
    tasks: dict[str, Task]

    @property
    def held_in(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.role == "held_in"]

    @property
    def held_out(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.role == "held_out"]

    def __getitem__(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise KeyError(f"no task {name!r} in {self.root}{did_you_mean(name, self.tasks)}") from None

    def held_out_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for n in self.held_out:
            groups.setdefault(self.tasks[n].group, []).append(n)
        return groups


def _read_spec(root: Path) -> TaskSetSpec:
    found = [root / n for n in TASK_FILES if (root / n).is_file()]
    if not root.is_dir():
        raise TaskSetError(f"task set folder {root} does not exist")
    if not found:
        raise TaskSetError(f"{root} has no {' / '.join(TASK_FILES)} (the task set's index of tasks)")
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # OSError, json's ValueError, yaml.YAMLError
        raise TaskSetError(f"{path}: cannot parse: {exc}") from None
    if isinstance(raw, dict) and isinstance(raw.get("tasks"), dict):
        for name, entry in raw["tasks"].items():
            if entry is None:
                raw["tasks"][name] = {}
    try:
        return TaskSetSpec.model_validate(raw)
    except ValidationError as exc:
        raise TaskSetError(f"{path}: {_explain(exc)}") from None


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + did_you_mean(str(err["loc"][-1]), [*TaskSpec.model_fields, *ExampleLine.model_fields])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_jsonl(path: Path) -> list[TaskExample]:
    """Every line of a JSONL split, validated; a bad line raises :class:`TaskSetError` naming ``file:line``."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskSetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(raw, dict):
                raise TaskSetError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            try:
                ex = ExampleLine.model_validate(raw)
            except ValidationError as err:
                raise TaskSetError(f"{where}: {_explain(err)}") from None
            targets = tuple(ex.targets) if ex.targets is not None else (ex.target or "",)
            msgs = tuple((m.role, m.content) for m in ex.messages) if ex.messages is not None else None
            out.append(TaskExample(ex.prompt, msgs, targets, where))
    return out


def load_task_set(root: str | Path, tasks: Sequence[str] | None = None) -> TaskSet:
    """Read and validate the task set at ``root`` (only ``tasks`` if given). A task needs
    ``test.jsonl``; ``train.jsonl`` (router preparation) and ``validation.jsonl``
    (hyper-parameter choice) are optional and their absence is reported where it matters."""
    root = Path(root).expanduser()
    spec = _read_spec(root)
    names = list(spec.tasks)
    if tasks is not None:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise TaskSetError(f"no task {unknown[0]!r} in {root}{did_you_mean(unknown[0], names)}")
        names = [n for n in names if n in tasks]
    out: dict[str, Task] = {}
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise TaskSetError(f"task {name!r} is declared in {root} but has no folder {folder}")
        task = Task(name, spec.tasks[name], folder)
        strays = sorted(p.name for p in folder.glob("*.jsonl") if p.stem not in SPLITS)
        if strays:
            hint = did_you_mean(Path(strays[0]).stem, SPLITS)
            raise TaskSetError(
                f"{folder}/{strays[0]} is not a split{hint}: the splits are {', '.join(s + '.jsonl' for s in SPLITS)}"
            )
        for split in SPLITS:
            path = folder / f"{split}.jsonl"
            if path.is_file():
                task.splits[split] = read_jsonl(path)
                task.hashes[split] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if not task.split("test"):
            raise TaskSetError(f"task {name!r} has no test examples ({folder}/test.jsonl is missing or empty)")
        out[name] = task
    return TaskSet(root, out)
