"""The expert registry: a folder with an SQLite index (WAL) and one sub-folder per expert version.

Layout::

    <root>/index.sqlite              experts + artifacts tables
    <root>/experts/<name>/<version>/ record.json, weights (safetensors), artifacts/<producer>/<hash>.*
    <root>/group-artifacts/<producer>/<hash>.*   derived from a set of experts (e.g. a Twin-Merging router)
    <root>/.staging/                 registrations in progress (never read)

A registration stages every file, validates, then — under SQLite's write lock — takes the next
version number, renames the staged folder into place and commits the index row. A crash before
the commit leaves at most an unindexed folder, which the next registration of that version
replaces; readers never see a half expert.
"""

from __future__ import annotations

import builtins
import json
import logging
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from moerge.hints import did_you_mean
from moerge.registry import importers
from moerge.registry.files import (
    IntegrityError,
    atomic_save_tensors,
    atomic_write_json,
    config_hash,
    sha256_file,
    staging_dir,
    verify_file,
)
from moerge.registry.schema import KINDS, ExpertRecord, validate_name

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    base_model TEXT,
    base_fingerprint TEXT,
    created TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    producer TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name, version, producer, config_hash)
);
CREATE TABLE IF NOT EXISTS group_artifacts (
    producer TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    experts TEXT NOT NULL,
    config TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (producer, config_hash)
);
"""


class ExpertNotFoundError(KeyError):
    """No expert (or no such version) under that name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Selection:
    """Some records of one registry, in order (what ``compose``/``merge`` take as ``experts``)."""

    registry: Registry
    records: builtins.list[ExpertRecord]

    @property
    def names(self) -> builtins.list[str]:
        return [r.name for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.records)


class Registry:
    """A persistent catalogue of experts. ``Registry(path)`` creates or opens ``path``;
    ``Registry()`` (or ``Registry(":memory:")``) is a throw-away registry in a temp folder."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if path is None or str(path) == ":memory:":
            self._tmp = tempfile.TemporaryDirectory(prefix="moerge-registry-")
            path = self._tmp.name
        self.root = Path(path).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"registry path {self.root} exists and is not a folder")
        (self.root / "experts").mkdir(parents=True, exist_ok=True)
        self._db_path = self.root / "index.sqlite"
        with self._connect() as con:
            con.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self._db_path, timeout=120, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=120000")
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (BEGIN IMMEDIATE)."""
        con = self._connect()
        try:
            for attempt in range(200):
                try:
                    con.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:  # database is locked beyond busy_timeout
                    if "locked" not in str(exc) or attempt == 199:
                        raise
                    time.sleep(0.05)
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, experts={len(self)})"

    def __len__(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(DISTINCT name) FROM experts").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._connect() as con:
            return con.execute("SELECT 1 FROM experts WHERE name=? LIMIT 1", (name,)).fetchone() is not None

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.list())

    def names(self) -> builtins.list[str]:
        return [r.name for r in self.list()]

    def path(self, expert: Any, version: int | None = None) -> Path:
        """The folder holding one expert version's files."""
        rec = self._resolve(expert, version)
        return self.root / "experts" / rec.name / str(rec.version)

    # ------------------------------------------------------------------ register

    def register(
        self,
        source: Any,
        name: str,
        *,
        description: str = "",
        skills: Iterable[str] = (),
        tags: Iterable[str] = (),
        examples: Iterable[str] = (),
        metrics: dict[str, float] | None = None,
        base: Any = None,
        kind: str | None = None,
        adapter_name: str | None = None,
        allow_pickle: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> ExpertRecord:
        """Register ``source`` under ``name`` (a new version if the name exists) and return its record.

        ``source`` is a PEFT adapter folder (or the hub id of one, ``org/name[@revision]``,
        fetched through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses the cache alone), a live ``PeftModel`` (``adapter_name`` picks one
        adapter), a dense fine-tuned Hugging Face model folder (stored as a task vector against
        ``base`` when given, whole otherwise) or a sentence-transformers folder (kind
        ``embedding``). ``base`` is a local folder, a hub id in the local cache, or a live model;
        for a LoRA it defaults to the adapter's ``base_model_name_or_path`` and is used to check
        every module's shape. Pickle weights are refused unless ``allow_pickle=True``.
        """
        validate_name(name)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown expert kind {kind!r}; expected one of {KINDS}")
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        staging_root = self.root / ".staging"
        with staging_dir(staging_root) as stage, staging_dir(staging_root) as scratch:
            files_dir = stage / "files"
            files_dir.mkdir()
            base_info: importers.BaseInfo | None = None
            lora_spec = None
            if hasattr(source, "peft_config") and hasattr(source, "save_pretrained"):
                folder = importers.save_live_peft(source, adapter_name, scratch)
                if base is None:
                    base = source.get_base_model()
                source_desc = f"PeftModel adapter {adapter_name or 'default'}"
            else:
                folder, source_desc = importers.resolve_source(source)  # a folder, or a hub id via the HF cache
            detected = importers.detect_kind(folder)
            kind = kind or detected
            if kind == "lora":
                if detected != "lora":
                    raise ValueError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
                declared = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
                base_info = importers.resolve_base(base if base is not None else declared, allow_pickle=allow_pickle)
                lora_spec, _ = importers.stage_lora(folder, files_dir, base_info, allow_pickle)
                storage = "peft"
            elif kind == "dense":
                base_info = importers.resolve_base(base, allow_pickle=allow_pickle, required=base is not None)
                storage = importers.stage_dense(folder, files_dir, base_info, allow_pickle)
            else:  # embedding / model: stored whole, as a folder
                base_info = importers.resolve_base(base, allow_pickle=allow_pickle) if base is not None else None
                importers.stage_folder(folder, files_dir, allow_pickle)
                storage = "folder"
            files = {str(p.relative_to(files_dir)): sha256_file(p) for p in sorted(files_dir.rglob("*")) if p.is_file()}
            draft = dict(
                name=name,
                kind=kind,
                base_model=base_info.id if base_info else None,
                base_fingerprint=base_info.fingerprint if base_info else None,
                description=description,
                skills=builtins.list(skills),
                tags=builtins.list(tags),
                examples=builtins.list(examples),
                metrics=metrics,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                files=files,
                lora=lora_spec,
                storage=storage,
                source=source_desc,
                extra=extra or {},
            )
            ExpertRecord(version=1, **draft)  # validate everything before taking the lock
            return self._commit(stage, files_dir, draft)

    def _commit(self, stage: Path, files_dir: Path, draft: dict[str, Any]) -> ExpertRecord:
        name = draft["name"]
        with self._write() as con:
            row = con.execute("SELECT MAX(version) FROM experts WHERE name=?", (name,)).fetchone()
            version = (row[0] or 0) + 1
            record = ExpertRecord(version=version, **draft)
            atomic_write_json(files_dir / "record.json", record.model_dump(mode="json"))
            final = self.root / "experts" / name / str(version)
            if final.exists():  # left by a crash between rename and commit: never indexed
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            files_dir.rename(final)
            try:
                con.execute(
                    "INSERT INTO experts VALUES (?,?,?,?,?,?,?)",
                    (
                        name,
                        version,
                        record.kind,
                        record.base_model,
                        record.base_fingerprint,
                        record.created,
                        record.model_dump_json(),
                    ),
                )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        log.info("registered %s (%s)", record.ref, record.kind)
        return record

    # ------------------------------------------------------------------ read

    def _resolve(self, expert: Any, version: int | None = None) -> ExpertRecord:
        if isinstance(expert, ExpertRecord):
            return expert if version is None else self.get(expert.name, version)
        if isinstance(expert, tuple):
            return self.get(expert[0], expert[1])
        return self.get(str(expert), version)

    def get(self, name: str, version: int | None = None) -> ExpertRecord:
        """The record of ``name`` (its latest version unless ``version`` is given)."""
        if isinstance(name, str) and "@" in name and version is None:
            name, v = name.rsplit("@", 1)
            version = int(v)
        with self._connect() as con:
            if version is None:
                row = con.execute("SELECT record FROM experts WHERE name=? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
            else:
                row = con.execute("SELECT record FROM experts WHERE name=? AND version=?", (name, int(version))).fetchone()
        if row is None:
            known = self.names()
            what = f"expert {name!r}" + (f" version {version}" if version is not None else "")
            hint = did_you_mean(name, known) if version is None or name not in known else ""
            raise ExpertNotFoundError(
                f"{what} is not in the registry at {self.root}{hint} (it has: {', '.join(known) or 'none'})"
            )
        return ExpertRecord.model_validate_json(row[0])

    def versions(self, name: str) -> builtins.list[ExpertRecord]:
        with self._connect() as con:
            rows = con.execute("SELECT record FROM experts WHERE name=? ORDER BY version", (name,)).fetchall()
        if not rows:
            raise ExpertNotFoundError(f"expert {name!r} is not in the registry at {self.root}{did_you_mean(name, self.names())}")
        return [ExpertRecord.model_validate_json(r[0]) for r in rows]

    def list(
        self,
        kind: str | None = None,
        base: str | None = None,
        skill: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
    ) -> builtins.list[ExpertRecord]:
        """Records (latest version of each name unless ``all_versions``), sorted by name.
        ``base`` matches the base model id or its config fingerprint."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown expert kind {kind!r}; expected one of {KINDS}")
        query = "SELECT record FROM experts e"
        if not all_versions:
            query += " WHERE version = (SELECT MAX(version) FROM experts x WHERE x.name = e.name)"
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY name, version").fetchall()
        out = [ExpertRecord.model_validate_json(r[0]) for r in rows]
        if kind is not None:
            out = [r for r in out if r.kind == kind]
        if base is not None:
            out = [r for r in out if base in (r.base_model, r.base_fingerprint)]
        if skill is not None:
            out = [r for r in out if skill in r.skills]
        if tag is not None:
            out = [r for r in out if tag in r.tags]
        return out

    def select(
        self,
        names: Sequence[str] | None = None,
        kind: str | None = None,
        base: str | None = None,
        skill: str | None = None,
        tag: str | None = None,
    ) -> Selection:
        """A set of experts to compose or merge: named ones (``"name"`` or ``"name@version"``)
        and/or the latest versions matching the filters."""
        if names is not None:
            records = [self._resolve(n) for n in names]
            filt = {r.ref for r in self.list(kind=kind, base=base, skill=skill, tag=tag, all_versions=True)}
            dropped = [r.ref for r in records if r.ref not in filt]
            if dropped:
                raise ValueError(f"experts {dropped} do not match the filters kind={kind} base={base} skill={skill} tag={tag}")
        else:
            records = self.list(kind=kind, base=base, skill=skill, tag=tag)
        if not records:
            raise ValueError(f"no expert in {self.root} matches kind={kind} base={base} skill={skill} tag={tag}")
        return Selection(self, records)

    def file(self, expert: Any, relname: str, version: int | None = None, verify: bool = True) -> Path:
        """Path of one stored file of an expert, after checking its sha256 (unless ``verify=False``)."""
        rec = self._resolve(expert, version)
        if relname not in rec.files:
            raise FileNotFoundError(f"expert {rec.ref} has no file {relname!r} (it has {sorted(rec.files)})")
        path = self.path(rec) / relname
        if verify:
            verify_file(path, rec.files[relname])
        return path

    def load_tensors(
        self, expert: Any, relname: str | None = None, version: int | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The verified tensors of an expert's main weight file, loaded straight onto ``device``."""
        from safetensors.torch import load_file

        rec = self._resolve(expert, version)
        if relname is None:
            relname = {"peft": "adapter_model.safetensors", "task_vector": "task_vector.safetensors"}.get(
                rec.storage, "model.safetensors"
            )
        return load_file(self.file(rec, relname), device=str(device))

    # ------------------------------------------------------------------ remove / export

    def remove(self, name: str, version: int | None = None) -> builtins.list[ExpertRecord]:
        """Remove one version (or every version) of ``name`` with its artifacts; returns what was removed."""
        targets = self.versions(name) if version is None else [self.get(name, version)]
        trash = self.root / ".staging" / f"trash-{uuid.uuid4().hex}"
        trash.mkdir(parents=True)
        try:
            with self._write() as con:
                for rec in targets:
                    con.execute("DELETE FROM experts WHERE name=? AND version=?", (rec.name, rec.version))
                    con.execute("DELETE FROM artifacts WHERE name=? AND version=?", (rec.name, rec.version))
                    for producer, chash, refs, file in con.execute(
                        "SELECT producer, config_hash, experts, file FROM group_artifacts"
                    ).fetchall():
                        if rec.ref in json.loads(refs):
                            con.execute("DELETE FROM group_artifacts WHERE producer=? AND config_hash=?", (producer, chash))
                            gpath = self.root / file
                            if gpath.exists():
                                gpath.rename(trash / f"group-{chash}{gpath.suffix}")
                    folder = self.root / "experts" / rec.name / str(rec.version)
                    if folder.exists():
                        folder.rename(trash / str(rec.version))
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        parent = self.root / "experts" / name
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
        return targets

    def export(self, name: str, dest: str | Path, version: int | None = None, base: Any = None) -> Path:
        """Write an expert back out as a folder its ecosystem loads: a PEFT adapter folder
        (``PeftModel.from_pretrained``), an HF model folder (``from_pretrained``; a task vector is
        added back onto ``base`` or the recorded base), or the stored folder as it was."""
        rec = self._resolve(name, version)
        dest = Path(dest).expanduser()
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"export destination {dest} exists and is not empty")
        src = self.path(rec)
        for rel, sha in rec.files.items():
            verify_file(src / rel, sha)
        with staging_dir(dest.parent) as stage:
            if rec.storage == "task_vector":
                base_info = importers.resolve_base(base if base is not None else rec.base_model, required=True)
                if rec.base_fingerprint and base_info.fingerprint and base_info.fingerprint != rec.base_fingerprint:
                    raise ValueError(
                        f"base {base_info.id!r} has config fingerprint {base_info.fingerprint}, but {rec.ref} was "
                        f"registered against {rec.base_fingerprint}"
                    )
                tau = self.load_tensors(rec)
                out: dict[str, torch.Tensor] = {}
                base_weights = base_info.tensors()
                keys = base_weights.keys()
                for key in keys:
                    b = base_weights.get(key) if not isinstance(base_weights, dict) else base_weights[key]
                    out[key] = (b.to(torch.float32) + tau[key].to(torch.float32)).to(b.dtype) if key in tau else b
                for rel in rec.files:
                    if rel not in ("task_vector.safetensors", "record.json"):
                        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src / rel, stage / rel)
                atomic_save_tensors(stage / "model.safetensors", out, {"format": "pt"})
            else:
                for rel in rec.files:
                    if rel == "record.json":
                        continue
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / rel, stage / rel)
            if dest.exists():
                dest.rmdir()
            stage.rename(dest)
            stage.mkdir()  # staging_dir cleans up the (now empty) path
        return dest

    # ------------------------------------------------------------------ artifacts

    def put_artifact(self, expert: Any, producer: str, config: Any, data: Any) -> Path:
        """Store something derived from one expert (tensors → safetensors, else JSON), keyed by
        ``producer`` and a hash of ``config``; replaces an artifact with the same key."""
        rec = self._resolve(expert)
        validate_name(producer)
        chash = config_hash(config)
        path = _write_artifact(self.path(rec) / "artifacts" / producer / chash, producer, data)
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?)",
                (
                    rec.name,
                    rec.version,
                    producer,
                    chash,
                    json.dumps(config, sort_keys=True, default=str),
                    str(path.relative_to(self.path(rec))),
                    sha256_file(path),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                ),
            )
        return path

    def get_artifact(self, expert: Any, producer: str, config: Any) -> Any:
        """The artifact stored for (expert, producer, config), or ``None`` if there is none."""
        rec = self._resolve(expert)
        with self._connect() as con:
            row = con.execute(
                "SELECT file, sha256 FROM artifacts WHERE name=? AND version=? AND producer=? AND config_hash=?",
                (rec.name, rec.version, producer, config_hash(config)),
            ).fetchone()
        if row is None:
            return None
        return _read_artifact(self.path(rec) / row[0], row[1])

    def list_artifacts(self, expert: Any) -> builtins.list[dict[str, Any]]:
        rec = self._resolve(expert)
        with self._connect() as con:
            rows = con.execute(
                "SELECT producer, config_hash, config, file, created FROM artifacts WHERE name=? AND version=?",
                (rec.name, rec.version),
            ).fetchall()
        return [dict(producer=p, config_hash=h, config=json.loads(c), file=f, created=t) for p, h, c, f, t in rows]

    # ------------------------------------------------------------ group artifacts

    def _group_key(self, experts: Iterable[Any], config: Any) -> tuple[builtins.list[str], str]:
        refs = sorted(self._resolve(e).ref for e in experts)
        if not refs:
            raise ValueError("a group artifact needs at least one expert")
        return refs, config_hash({"experts": refs, "config": config})

    def put_group_artifact(self, experts: Iterable[Any], producer: str, config: Any, data: Any) -> Path:
        """Store something derived from a *set* of experts (e.g. a router trained over all of
        them), keyed by ``producer``, the experts' refs (name@version) and a hash of ``config``.
        Removing any of those experts removes it."""
        validate_name(producer)
        refs, chash = self._group_key(experts, config)
        path = _write_artifact(self.root / "group-artifacts" / producer / chash, producer, data)
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO group_artifacts VALUES (?,?,?,?,?,?,?)",
                (
                    producer,
                    chash,
                    json.dumps(refs),
                    json.dumps(config, sort_keys=True, default=str),
                    str(path.relative_to(self.root)),
                    sha256_file(path),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                ),
            )
        return path

    def get_group_artifact(self, experts: Iterable[Any], producer: str, config: Any) -> Any:
        """The group artifact for (these experts, producer, config), or ``None``."""
        _, chash = self._group_key(experts, config)
        with self._connect() as con:
            row = con.execute(
                "SELECT file, sha256 FROM group_artifacts WHERE producer=? AND config_hash=?", (producer, chash)
            ).fetchone()
        return None if row is None else _read_artifact(self.root / row[0], row[1])

    def list_group_artifacts(self) -> builtins.list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT producer, config_hash, experts, config, file, created FROM group_artifacts").fetchall()
        return [
            dict(producer=p, config_hash=h, experts=json.loads(e), config=json.loads(c), file=f, created=t)
            for p, h, e, c, f, t in rows
        ]


def _write_artifact(stem: Path, producer: str, data: Any) -> Path:
    """Tensors → ``stem.safetensors``, anything else JSON-serialisable → ``stem.json`` (atomic)."""
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        path = stem.with_suffix(".safetensors")
        atomic_save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in data.items()})
        return path
    try:
        payload = json.dumps(data)
    except TypeError as exc:
        raise TypeError(f"artifact data for {producer!r} must be a dict of tensors or JSON-serialisable: {exc}") from None
    from moerge.registry.files import atomic_write_bytes

    path = stem.with_suffix(".json")
    atomic_write_bytes(path, payload.encode())
    return path


def _read_artifact(path: Path, sha: str) -> Any:
    verify_file(path, sha)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return json.loads(path.read_text())


__all__ = ["Registry", "ExpertNotFoundError", "IntegrityError"]
