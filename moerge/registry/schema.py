"""The expert record: the registry's typed, validated metadata for one expert version."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ExpertKind = Literal["lora", "dense", "embedding", "model"]
KINDS: tuple[str, ...] = ("lora", "dense", "embedding", "model")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: a finite float (NaN and ±inf have no JSON form: one would make the record unreadable)
Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_NAME_LEN = 100


class InvalidNameError(ValueError):
    """An expert name that cannot be stored safely."""


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe expert name, else raise :class:`InvalidNameError` saying why."""
    if not isinstance(name, str):
        raise InvalidNameError(f"expert name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidNameError("expert name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"expert name {name[:20]!r}… is {len(name)} characters; the limit is {MAX_NAME_LEN}")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"expert name {name!r} contains a path separator")
    if ".." in name:
        raise InvalidNameError(f"expert name {name!r} contains '..'")
    if not _NAME_RE.fullmatch(name):  # match() with $ would let a trailing newline through
        raise InvalidNameError(
            f"expert name {name!r} may only use letters, digits, '.', '_' and '-', and must start with a letter or digit"
        )
    return name


def validate_task_names(tasks: Any) -> list[str]:
    """Task names as a de-duplicated list (order kept); each follows the expert-name rules (a
    task names a folder of a task set)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for t in tasks:
        try:
            validate_name(t)
        except InvalidNameError as exc:
            raise InvalidNameError(str(exc).replace("expert name", "task name")) from None
        if t not in out:
            out.append(t)
    return out


class LoraSpec(BaseModel):
    """What a LoRA expert's factors mean: PEFT's rank/alpha bookkeeping, kept verbatim."""

    model_config = ConfigDict(extra="forbid")

    r: Annotated[int, Field(strict=True, ge=1)]
    lora_alpha: Finite
    target_modules: list[str]
    rank_pattern: dict[str, Annotated[int, Field(strict=True, ge=1)]] = Field(default_factory=dict)
    alpha_pattern: dict[str, Finite] = Field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    #: module paths (relative to the base model) that carry factors, as found in the weights
    modules: list[str] = Field(default_factory=list)


class ExpertRecord(BaseModel):
    """One registered expert version. ``files`` maps each stored file (relative to the
    version's folder) to its sha256; weights are always safetensors."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    kind: ExpertKind
    base_model: str | None = None
    base_fingerprint: str | None = None
    description: str = ""
    skills: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    #: the tasks (names in a task set, :mod:`moerge.evaluation`) this expert was trained on: its
    #: own tasks define the evaluator's oracle and the held-in normalisation
    tasks: list[str] = Field(default_factory=list)
    metrics: dict[str, Finite] = Field(default_factory=dict)
    created: str
    files: dict[str, str]
    lora: LoraSpec | None = None
    #: for dense experts: "task_vector" (θ_ft − θ_base) or "whole" (no base given)
    #: "reference": a whole model kept where it is (a folder or hub id, in ``source``), not copied
    storage: Literal["peft", "task_vector", "whole", "folder", "reference"]
    source: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, v: list[str]) -> list[str]:
        return validate_task_names(v)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
