"""The expert registry: a folder with an SQLite index (WAL) and one sub-folder per expert version.

Layout::

    <root>/index.sqlite              experts + artifacts tables
    <root>/experts/<name>/<version>/ record.json, weights (safetensors), artifacts/<producer>/<hash>.*
    <root>/group-artifacts/<producer>/<hash>.*   derived from a set of experts (e.g. a Twin-Merging router)
    <root>/.staging/                 registrations in progress (never read)

A registration stages every file, validates, then — under SQLite's write lock — takes the next
version number, renames the staged folder into place and commits the index row. A crash before
the commit leaves at most an unindexed folder (``verify`` reports it, ``verify --repair``
removes it); readers never see a half expert.

Reliability rules (each tested with injected crash points, ``MOERGE_FAILPOINT``):

* version numbers are never reused: ``<root>/experts/<name>/.last-version`` and the ``names``
  table keep the highest number ever given, through removals and index rebuilds;
* a removal moves the version's folder aside inside the transaction and deletes it only after
  the commit; a crash in between is undone at the next open (the folder is put back);
* staging folders belong to a live process (an ``flock``); a dead process's are removed at open;
* every connection is closed when its operation ends (nothing survives a ``fork``);
* a writer that cannot get the lock within ``lock_timeout`` gives up naming the holder;
* an empty or damaged index is detected at open; ``rebuild_index`` recreates it from the
  ``record.json`` (and artifact ``.meta.json``) files on disk.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads where tensors are read or written: listing a registry needs none
    import torch

from moerge.hints import did_you_mean
from moerge.registry import importers
from moerge.registry.files import (
    IntegrityError,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    config_hash,
    sha256_file,
    staging_dir,
    verify_file,
)
from moerge.registry.importers import MoergeWarning
from moerge.registry.schema import KINDS, ExpertRecord, validate_name, validate_task_names

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
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
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


#: seconds a writer waits for the registry's lock before giving up (env MOERGE_REGISTRY_LOCK_TIMEOUT)
DEFAULT_LOCK_TIMEOUT = 60.0
WRITER_FILE = ".writer.json"
#: the id of the index this registry's files belong to (also in the index's meta table): an
#: index that was emptied or replaced does not carry it
INDEX_ID_FILE = ".index-id"
LAST_VERSION_FILE = ".last-version"


def _failpoint(name: str) -> None:
    """Crash here — the process dies at once, as under kill -9 — when ``MOERGE_FAILPOINT`` names
    this point: how the tests put a crash exactly between two steps of a write."""
    if os.environ.get("MOERGE_FAILPOINT") == name:
        os._exit(86)


class RegistryIndexError(RuntimeError):
    """The registry's index is missing, empty or damaged while expert files are on disk."""


class RegistryLockedError(TimeoutError):
    """Another writer held the registry's lock for longer than ``lock_timeout``."""


def _lock(path: Path, blocking: bool = True) -> Any:
    """An open file holding an exclusive ``flock`` on ``path``, or None if another process holds
    it (non-blocking). Released when the file is closed or the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): staging folders are then never judged stale
        return open(path, "a") if blocking else None  # noqa: SIM115
    fh = open(path, "a")  # noqa: SIM115 - kept open as the lock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.close()
        return None
    return fh


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

    def __init__(self, path: str | Path | None = None, *, lock_timeout: float | None = None, check: bool = True) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if path is None or str(path) == ":memory:":
            self._tmp = tempfile.TemporaryDirectory(prefix="moerge-registry-")
            path = self._tmp.name
        self.root = Path(path).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"registry path {self.root} exists and is not a folder")
        if lock_timeout is None:
            lock_timeout = float(os.environ.get("MOERGE_REGISTRY_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
        self.lock_timeout = float(lock_timeout)
        (self.root / "experts").mkdir(parents=True, exist_ok=True)
        self._db_path = self.root / "index.sqlite"
        self._open_index(check)
        self._clean_staging()

    # ------------------------------------------------------------------ plumbing

    def _connect(self, busy_s: float = 0.1) -> sqlite3.Connection:
        """A connection whose statements wait up to ``busy_s`` for a lock (readers wait as long
        as a writer may take; a writer's BEGIN waits briefly and loops, see :meth:`_write`).
        WAL mode is set once, when the index is opened."""
        con = sqlite3.connect(self._db_path, timeout=busy_s, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for one read, closed when it ends (none outlives an operation, so a
        forked process never shares one)."""
        con = self._connect(busy_s=max(self.lock_timeout, 1.0))
        try:
            yield con
        finally:
            con.close()

    def _rebuild_hint(self) -> str:
        return f"rebuild it from the records on disk with `moerge registry rebuild-index --registry {self.root}`"

    def _on_disk(self) -> builtins.list[Path]:
        """Every version folder on disk that holds a record.json."""
        return sorted(p.parent for p in (self.root / "experts").glob("*/*/record.json") if p.parent.name.isdigit())

    def _open_index(self, check: bool) -> None:
        """Open (or create) the index and check that it is this registry's own: a damaged file,
        or one that was emptied or replaced while the expert files stayed, is refused by name."""
        id_file = self.root / INDEX_ID_FILE
        on_file = id_file.read_text().strip() if id_file.exists() else None
        try:
            with self._read() as con:
                if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    con.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if not {"experts", "artifacts", "names", "meta", "group_artifacts"} <= tables:
                    con.executescript(_SCHEMA)  # a write: only when a table is missing
                listed = con.execute("SELECT COUNT(*) FROM experts").fetchone()[0]
                row = con.execute("SELECT value FROM meta WHERE key='index_id'").fetchone()
                index_id = row[0] if row else None
                if index_id is None:  # a new registry, one made before index ids, or a lost index (checked below)
                    if check and on_file is None and listed == 0 and self._on_disk():
                        self._refuse_index(listed)
                    index_id = uuid.uuid4().hex
                    con.execute("INSERT INTO meta VALUES ('index_id', ?)", (index_id,))
        except sqlite3.DatabaseError as exc:
            raise RegistryIndexError(f"the registry index {self._db_path} is damaged ({exc}); {self._rebuild_hint()}") from None
        if check and on_file is not None and index_id != on_file and self._on_disk():
            self._refuse_index(listed)  # (with no version on disk there is nothing it could hide)
        if on_file != index_id:
            atomic_write_bytes(id_file, index_id.encode())

    def _refuse_index(self, listed: int) -> None:
        raise RegistryIndexError(
            f"the registry index {self._db_path} is not the one this registry's files belong to (emptied or replaced?): "
            f"it lists {listed} expert version(s), {len(self._on_disk())} are on disk under {self.root / 'experts'}; "
            f"{self._rebuild_hint()}"
        )

    def _holder(self) -> str:
        """Who holds the write lock, as its holder recorded it."""
        try:
            info = json.loads((self.root / WRITER_FILE).read_text())
        except (OSError, ValueError):
            return "another process (it left no note)"
        since = time.time() - float(info.get("since", time.time()))
        alive = ""
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                alive = ", which no longer runs"
            except (PermissionError, ValueError, KeyError):
                pass
        return f"pid {info.get('pid')} on {info.get('host')} ({info.get('op', 'writing')}, for {since:.0f} s{alive})"

    @contextmanager
    def _write(self, op: str = "writing") -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (BEGIN IMMEDIATE).
        Waits up to ``lock_timeout`` for another writer, warning after 2 s and then giving up
        with :class:`RegistryLockedError`, both naming the holder."""
        con = self._connect()
        start, warned = time.monotonic(), False
        try:
            while True:
                try:
                    con.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    waited = time.monotonic() - start
                    if waited >= self.lock_timeout:
                        raise RegistryLockedError(
                            f"the registry at {self.root} is locked by {self._holder()}; gave up after {waited:.0f} s "
                            "(lock_timeout=, or MOERGE_REGISTRY_LOCK_TIMEOUT)"
                        ) from None
                    if not warned and waited >= 2.0:
                        warned = True
                        warnings.warn(
                            f"waiting for the registry lock at {self.root}, held by {self._holder()} "
                            f"(giving up after {self.lock_timeout:g} s)",
                            MoergeWarning,
                            stacklevel=3,
                        )
                    time.sleep(0.05)
            note = self.root / WRITER_FILE
            mine = {"pid": os.getpid(), "host": socket.gethostname(), "op": op, "since": time.time()}
            try:
                note.write_text(json.dumps(mine))
            except OSError:
                pass
            try:
                yield con
                note.unlink(missing_ok=True)  # before the lock is released: the next writer's note is its own
                con.execute("COMMIT")
            except BaseException:
                note.unlink(missing_ok=True)
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    @contextmanager
    def _stage(self) -> Iterator[Path]:
        """A staging folder under ``.staging`` owned by this process (its ``.lock`` file is
        flocked first), removed when done; a dead process's are removed at the next open."""
        root = self.root / ".staging"
        root.mkdir(parents=True, exist_ok=True)
        fd, lock_name = tempfile.mkstemp(dir=root, prefix="stage-", suffix=".lock")
        os.close(fd)
        lock = _lock(Path(lock_name))
        path = Path(lock_name[: -len(".lock")])
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            Path(lock_name).unlink(missing_ok=True)
            lock.close()

    def _clean_staging(self) -> None:
        """Remove what dead processes left in ``.staging``; undo a removal that crashed before
        its commit (its folders go back where they were)."""
        root = self.root / ".staging"
        if not root.is_dir():
            return
        for lock_path in sorted(root.glob("stage-*.lock")):
            lock = _lock(lock_path, blocking=False)
            if lock is None:  # a live process's
                continue
            try:
                folder = lock_path.with_suffix("")
                if folder.is_dir():
                    self._restore_removal(folder)
                    shutil.rmtree(folder, ignore_errors=True)
                    log.info("removed stale staging folder %s", folder)
                lock_path.unlink(missing_ok=True)
            finally:
                lock.close()
        for entry in root.iterdir():  # folders of older versions (no lock file): dead by definition
            if entry.is_dir() and not entry.with_suffix(".lock").exists() and entry.name.startswith(("stage-", "trash-")):
                self._restore_removal(entry)
                shutil.rmtree(entry, ignore_errors=True)

    def _restore_removal(self, trash: Path) -> None:
        manifest = trash / "removal.json"
        if not manifest.exists():
            return
        moved = json.loads(manifest.read_text())
        with self._read() as con:
            for item in moved:
                src, dst = trash / item["trash"], self.root / item["path"]
                if item.get("group"):
                    listed = con.execute(
                        "SELECT 1 FROM group_artifacts WHERE producer=? AND config_hash=?", (item["producer"], item["hash"])
                    ).fetchone()
                else:
                    listed = con.execute(
                        "SELECT 1 FROM experts WHERE name=? AND version=?", (item["name"], item["version"])
                    ).fetchone()
                if listed and src.exists() and not dst.exists():  # the removal never committed
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    src.rename(dst)
                    log.warning("restored %s: its removal did not commit", dst)

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
        with self._read() as con:
            return con.execute("SELECT COUNT(DISTINCT name) FROM experts").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._read() as con:
            return con.execute("SELECT 1 FROM experts WHERE name=? LIMIT 1", (name,)).fetchone() is not None

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.list())

    def names(self) -> builtins.list[str]:
        return [r.name for r in self.list()]

    def path(self, expert: Any, version: int | None = None) -> Path:
        """The folder holding one expert version's files."""
        rec = self._resolve(expert, version)
        return self.root / "experts" / rec.name / str(rec.version)

    def model_folder(self, expert: Any, version: int | None = None) -> Path:
        """Where a whole-model expert loads from (``from_pretrained``): its stored copy, or — kept
        by reference — the folder it was registered from or its hub snapshot (``hf://org/name@commit``,
        that exact commit, from the Hugging Face cache)."""
        rec = self._resolve(expert, version)
        if rec.kind != "model":
            raise ValueError(f"{rec.ref} is a {rec.kind!r} expert, not a whole model")
        if rec.storage != "reference":
            return self.path(rec)
        src = str(rec.source)
        folder, _ = importers.resolve_source(
            src.removeprefix("hf://") if src.startswith("hf://") else src, f"model expert {rec.ref}"
        )
        importers.check_model_folder(folder)  # a reference can go stale: say what is missing now
        return folder

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
        tasks: Iterable[str] = (),
        metrics: dict[str, float] | None = None,
        base: Any = None,
        kind: str | None = None,
        adapter_name: str | None = None,
        allow_pickle: bool = False,
        extra: dict[str, Any] | None = None,
        reference: bool = False,
    ) -> ExpertRecord:
        """Register ``source`` under ``name`` (a new version if the name exists) and return its record.

        ``source`` is a PEFT adapter folder (or the hub id of one, ``org/name[@revision]``,
        fetched through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses the cache alone), a live ``PeftModel`` (``adapter_name`` picks one
        adapter), a dense fine-tuned Hugging Face model folder (stored as a task vector against
        ``base`` when given, whole otherwise) or a sentence-transformers folder (kind
        ``embedding``). ``base`` is a local folder, a hub id in the local cache, or a live model;
        for a LoRA it defaults to the adapter's ``base_model_name_or_path`` and is used to check
        every module's shape. Pickle weights are refused unless ``allow_pickle=True``, and so is
        a symlink that leads outside the source folder (its target would be copied in).

        ``kind="model"``: a whole causal LM with its tokenizer (Symbolic-MoE's experts; the record
        notes its architecture and whether it has a chat template). ``reference=True`` keeps such a
        model where it is — a local folder or a hub id — instead of copying gigabytes.

        ``tasks``: the task-set tasks the expert was trained on (``moerge eval``'s oracle and
        normalisation); :meth:`tag` sets them later without a new version.
        """
        validate_name(name)
        tasks = validate_task_names(builtins.list(tasks) if not isinstance(tasks, str) else tasks)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown expert kind {kind!r}; expected one of {KINDS}")
        metrics = {str(k): importers.finite(v, f"metric {k!r}") for k, v in (metrics or {}).items()}
        with self._stage() as stage, self._stage() as scratch:
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
                # a hub snapshot's files link to the repo's blobs: that repo folder is the boundary
                importers.check_symlinks(folder, folder.parent.parent if source_desc.startswith("hf://") else folder)
            detected = importers.detect_kind(folder)
            kind = kind or detected
            if kind == "lora":
                if detected != "lora":
                    raise ValueError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
                declared = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if declared is not None and not isinstance(declared, str):
                    raise ValueError(f"{folder}/adapter_config.json: base_model_name_or_path must be a string, got {declared!r}")
                base_info = importers.resolve_base(base if base is not None else declared, allow_pickle=allow_pickle)
                lora_spec, _ = importers.stage_lora(folder, files_dir, base_info, allow_pickle)
                storage = "peft"
            elif kind == "dense":
                base_info = importers.resolve_base(base, allow_pickle=allow_pickle, required=base is not None)
                storage = importers.stage_dense(folder, files_dir, base_info, allow_pickle)
            elif kind == "model":
                extra = {**(extra or {}), "model": importers.check_model_folder(folder)}
                base_info = None
                if reference:
                    storage = "reference"  # nothing copied: ``source`` says where it lives
                else:
                    importers.stage_folder(folder, files_dir, allow_pickle)
                    storage = "folder"
            else:  # embedding: stored whole, as a folder
                base_info = importers.resolve_base(base, allow_pickle=allow_pickle) if base is not None else None
                importers.stage_folder(folder, files_dir, allow_pickle)
                storage = "folder"
            if reference and kind != "model":
                raise ValueError(f"reference=True keeps whole models where they are; a {kind!r} expert is always copied in")
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
                tasks=tasks,
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

    def _next_version(self, con: sqlite3.Connection, name: str) -> int:
        """One more than any version this name ever had: in the index, in the ``names`` table
        (which survives removals), in the on-disk tombstone (which survives a lost index) or as a
        folder (a crashed registration's)."""
        folder = self.root / "experts" / name
        seen = [
            con.execute("SELECT MAX(version) FROM experts WHERE name=?", (name,)).fetchone()[0] or 0,
            (con.execute("SELECT last_version FROM names WHERE name=?", (name,)).fetchone() or (0,))[0],
        ]
        try:
            seen.append(int((folder / LAST_VERSION_FILE).read_text()))
        except (OSError, ValueError):
            pass
        if folder.is_dir():
            seen += [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
        return max(seen) + 1

    def _commit(self, stage: Path, files_dir: Path, draft: dict[str, Any]) -> ExpertRecord:
        name = draft["name"]
        with self._write(f"registering {name!r}") as con:
            version = self._next_version(con, name)
            record = ExpertRecord(version=version, **draft)
            atomic_write_json(files_dir / "record.json", record.model_dump(mode="json"))
            final = self.root / "experts" / name / str(version)
            final.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(final.parent / LAST_VERSION_FILE, str(version).encode())
            con.execute(
                "INSERT INTO names VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET last_version=excluded.last_version",
                (name, version),
            )
            files_dir.rename(final)
            _failpoint("register:before-commit")
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

    def tag(self, name: str, tasks: Iterable[str], version: int | None = None, *, mode: str = "set") -> ExpertRecord:
        """Say which tasks an expert version (its latest unless ``version``) was trained on:
        ``mode="set"`` replaces its task list, ``"add"`` appends, ``"remove"`` drops. Metadata
        only: the version, its weights and its artifacts stay as they are. The index row and
        ``record.json`` change in one transaction (the file is put back if the commit fails)."""
        if mode not in ("set", "add", "remove"):
            raise ValueError(f"tag mode must be 'set', 'add' or 'remove', got {mode!r}")
        given = validate_task_names(builtins.list(tasks) if not isinstance(tasks, str) else tasks)
        with self._write(f"tagging {name!r}") as con:
            rec = self._resolve(name, version)
            now = {"set": given, "add": [*rec.tasks, *given], "remove": [t for t in rec.tasks if t not in given]}[mode]
            if mode == "remove":
                missing = [t for t in given if t not in rec.tasks]
                if missing:
                    raise ValueError(f"expert {rec.ref} is not tagged with {missing} (its tasks: {rec.tasks or 'none'})")
            new = rec.model_copy(update={"tasks": validate_task_names(now)})
            path = self.path(rec) / "record.json"
            old = path.read_bytes()
            atomic_write_json(path, new.model_dump(mode="json"))
            try:
                con.execute(
                    "UPDATE experts SET record=? WHERE name=? AND version=?", (new.model_dump_json(), rec.name, rec.version)
                )
            except BaseException:
                atomic_write_bytes(path, old)
                raise
        log.info("tagged %s with tasks %s", new.ref, new.tasks)
        return new

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
        with self._read() as con:
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
        with self._read() as con:
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
        with self._read() as con:
            rows = con.execute(query + " ORDER BY name, version").fetchall()
        out = []
        for (raw,) in rows:
            try:
                out.append(ExpertRecord.model_validate_json(raw))
            except ValueError as exc:  # one unreadable record must not hide the others
                ref = "{name}@{version}".format(**{"name": "?", "version": "?", **_loose(raw)})
                warnings.warn(
                    f"registry record {ref} in {self.root} is unreadable and was skipped ({str(exc).splitlines()[0]}); "
                    f"`moerge registry verify` lists it, `moerge registry rm` removes it",
                    MoergeWarning,
                    stacklevel=2,
                )
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
        """Remove one version (or every version) of ``name`` with its artifacts; returns what was
        removed (records that no longer validate are removed too). Files are deleted only after
        the index no longer lists them; the version numbers are never given again."""
        with self._read() as con:
            if version is None:
                rows = con.execute("SELECT version, record FROM experts WHERE name=? ORDER BY version", (name,)).fetchall()
            else:
                rows = con.execute(
                    "SELECT version, record FROM experts WHERE name=? AND version=?", (name, int(version))
                ).fetchall()
        if not rows:
            self.get(name, version)  # raises, naming what is there
        targets = []
        for v, raw in rows:
            try:
                targets.append(ExpertRecord.model_validate_json(raw))
            except ValueError:  # an unreadable record can still be removed
                targets.append(ExpertRecord.model_construct(name=name, version=int(v), kind="lora", files={}, created=""))
        with self._stage() as trash:
            moved: builtins.list[tuple[Path, Path]] = []
            manifest: builtins.list[dict[str, Any]] = []

            def move_aside(path: Path, **item: Any) -> None:
                dst = trash / str(len(manifest))
                manifest.append({"trash": dst.name, "path": str(path.relative_to(self.root)), **item})
                atomic_write_json(trash / "removal.json", manifest)  # written before the move: a crash can undo it
                path.rename(dst)
                moved.append((dst, path))

            try:
                with self._write(f"removing {name!r}") as con:
                    for rec in targets:
                        con.execute("DELETE FROM experts WHERE name=? AND version=?", (rec.name, rec.version))
                        con.execute("DELETE FROM artifacts WHERE name=? AND version=?", (rec.name, rec.version))
                        for producer, chash, refs, file in con.execute(
                            "SELECT producer, config_hash, experts, file FROM group_artifacts"
                        ).fetchall():
                            if rec.ref in json.loads(refs):
                                con.execute("DELETE FROM group_artifacts WHERE producer=? AND config_hash=?", (producer, chash))
                                gpath = self.root / file
                                for extra in (gpath, _meta_path(gpath)):
                                    if extra.exists():
                                        move_aside(extra, group=True, producer=producer, hash=chash)
                        folder = self.root / "experts" / rec.name / str(rec.version)
                        if folder.exists():
                            move_aside(folder, name=rec.name, version=rec.version)
                    _failpoint("remove:before-commit")
            except BaseException:
                for src, dst in reversed(moved):  # the index still lists them: put the files back
                    if src.exists() and not dst.exists():
                        src.rename(dst)
                raise
            _failpoint("remove:after-commit")
        return targets

    def snapshot(self, dest: str | Path) -> Registry:
        """A consistent copy of the whole registry at ``dest`` (which must not exist): every expert,
        version and artifact as of one moment. Other writers wait meanwhile (the copy holds the
        write lock); readers do not. The index is copied with SQLite's online backup, never as
        files — a plain copy of a live index can catch its write-ahead log half-written or gone."""
        dest = Path(dest).expanduser()
        if dest.exists():
            raise FileExistsError(f"snapshot destination {dest} exists")
        skip = {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", WRITER_FILE, ".staging"}
        with staging_dir(dest.parent) as stage, self._write("taking a snapshot"):
            for item in self.root.iterdir():
                if item.name in skip:
                    continue
                if item.is_dir():
                    shutil.copytree(item, stage / item.name, symlinks=True)
                else:
                    shutil.copy2(item, stage / item.name)
            # from a reading connection: the writing one, in its transaction, would wait on itself
            src, out = sqlite3.connect(self._db_path), sqlite3.connect(stage / "index.sqlite")
            try:
                src.backup(out)
            finally:
                src.close()
                out.close()
            stage.rename(dest)
        return Registry(dest)

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
                import torch

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
            elif rec.storage == "reference":  # the model where it lives, copied out whole
                shutil.copytree(self.model_folder(rec), stage, dirs_exist_ok=True)
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

    # ------------------------------------------------------------------ verify / rebuild

    def verify(self, repair: bool = False) -> dict[str, Any]:
        """Check what the index promises against the disk: every record readable, its folder
        present, every file's sha256, every artifact's file; version folders the index does not
        list (orphans: a registration that crashed before its commit); leftovers of dead
        processes in ``.staging``. ``repair`` removes orphans and those leftovers — never a
        listed version's files (a damaged listed version is reported; ``remove`` it).
        Returns ``{"ok", "checked", "problems": [{kind, ref, detail}], "repaired": [...]}``."""
        problems: builtins.list[dict[str, str]] = []
        repaired: builtins.list[str] = []
        with self._read() as con:
            rows = con.execute("SELECT name, version, record FROM experts ORDER BY name, version").fetchall()
            arts = con.execute("SELECT name, version, producer, file, sha256 FROM artifacts").fetchall()
            groups = con.execute("SELECT producer, config_hash, file, sha256 FROM group_artifacts").fetchall()
        listed = set()
        for name, version, raw in rows:
            ref = f"{name}@{version}"
            listed.add((name, int(version)))
            try:
                rec = ExpertRecord.model_validate_json(raw)
            except ValueError as exc:
                problems.append({"kind": "unreadable record", "ref": ref, "detail": str(exc).splitlines()[0]})
                continue
            folder = self.root / "experts" / name / str(version)
            if not folder.is_dir():
                problems.append({"kind": "missing folder", "ref": ref, "detail": str(folder)})
                continue
            for rel, sha in rec.files.items():
                try:
                    verify_file(folder / rel, sha)
                except IntegrityError as exc:
                    problems.append({"kind": "bad file", "ref": ref, "detail": str(exc)})
        for name, version, producer, rel, sha in arts:
            try:
                verify_file(self.root / "experts" / name / str(version) / rel, sha)
            except IntegrityError as exc:
                problems.append({"kind": "bad artifact", "ref": f"{name}@{version}", "detail": f"{producer}: {exc}"})
        for producer, chash, rel, sha in groups:
            try:
                verify_file(self.root / rel, sha)
            except IntegrityError as exc:
                problems.append({"kind": "bad group artifact", "ref": f"{producer}/{chash}", "detail": str(exc)})
        for folder in sorted((self.root / "experts").glob("*/*")):
            if folder.is_dir() and folder.name.isdigit() and (folder.parent.name, int(folder.name)) not in listed:
                ref = f"{folder.parent.name}@{folder.name}"
                if repair:
                    shutil.rmtree(folder)
                    repaired.append(f"removed unlisted version folder {folder}")
                else:
                    problems.append({"kind": "orphan", "ref": ref, "detail": f"{folder} is not in the index"})
        staging = self.root / ".staging"
        stale = []
        if staging.is_dir():
            for entry in staging.iterdir():
                if entry.is_dir():
                    lock = _lock(entry.with_suffix(".lock"), blocking=False) if entry.with_suffix(".lock").exists() else True
                    if lock is not None:
                        stale.append(entry)
                        if lock is not True:
                            lock.close()
        if stale and repair:
            self._clean_staging()
            repaired.append(f"removed {len(stale)} stale staging folder(s)")
        elif stale:
            problems += [{"kind": "stale staging", "ref": "", "detail": str(e)} for e in stale]
        return {"ok": not problems, "checked": len(rows), "problems": problems, "repaired": repaired}

    @classmethod
    def rebuild_index(cls, path: str | Path) -> dict[str, Any]:
        """Recreate the index of the registry at ``path`` from what is on disk: every version
        folder's ``record.json``, artifacts' ``.meta.json`` sidecars and the names' version
        tombstones. The old index (and its WAL) is kept beside as ``index.sqlite.damaged-<time>``.
        Run it with no other process writing to the registry."""
        root = Path(path).expanduser().resolve()
        experts = root / "experts"
        if not experts.is_dir():
            raise FileNotFoundError(f"no registry at {root} (no experts/ folder)")
        fresh = root / f"index.sqlite.rebuild-{os.getpid()}"
        fresh.unlink(missing_ok=True)
        report: dict[str, Any] = {"experts": 0, "artifacts": 0, "group_artifacts": 0, "skipped": [], "old_index": None}
        con = sqlite3.connect(fresh, isolation_level=None)
        try:
            con.executescript(_SCHEMA)
            con.execute("BEGIN")
            last: dict[str, int] = {}
            for record_file in sorted(experts.glob("*/*/record.json")):
                folder = record_file.parent
                try:
                    rec = ExpertRecord.model_validate_json(record_file.read_text())
                    if (rec.name, str(rec.version)) != (folder.parent.name, folder.name):
                        raise ValueError(f"it says {rec.ref}")
                except (OSError, ValueError) as exc:
                    report["skipped"].append(f"{record_file}: {str(exc).splitlines()[0]}")
                    continue
                con.execute(
                    "INSERT INTO experts VALUES (?,?,?,?,?,?,?)",
                    (rec.name, rec.version, rec.kind, rec.base_model, rec.base_fingerprint, rec.created, rec.model_dump_json()),
                )
                report["experts"] += 1
                last[rec.name] = max(last.get(rec.name, 0), rec.version)
                for meta in sorted((folder / "artifacts").glob("*/*.meta.json")):
                    row = json.loads(meta.read_text())
                    con.execute("INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?)", [row[c] for c in ARTIFACT_COLUMNS])
                    report["artifacts"] += 1
            for name_dir in experts.iterdir():
                try:
                    last[name_dir.name] = max(last.get(name_dir.name, 0), int((name_dir / LAST_VERSION_FILE).read_text()))
                except (OSError, ValueError):
                    pass
            con.executemany("INSERT INTO names VALUES (?, ?)", sorted(last.items()))
            index_id = uuid.uuid4().hex
            con.execute("INSERT INTO meta VALUES ('index_id', ?)", (index_id,))
            for meta in sorted((root / "group-artifacts").glob("*/*.meta.json")):
                row = json.loads(meta.read_text())
                con.execute("INSERT OR REPLACE INTO group_artifacts VALUES (?,?,?,?,?,?,?)", [row[c] for c in GROUP_COLUMNS])
                report["group_artifacts"] += 1
            con.execute("COMMIT")
        finally:
            con.close()
        db = root / "index.sqlite"
        if db.exists():
            keep = root / f"index.sqlite.damaged-{int(time.time())}"
            for suffix in ("", "-wal", "-shm"):  # a stale WAL must not be replayed into the new index
                old = Path(str(db) + suffix)
                if old.exists():
                    old.rename(Path(str(keep) + suffix))
            report["old_index"] = str(keep)
        os.replace(fresh, db)
        atomic_write_bytes(root / INDEX_ID_FILE, index_id.encode())
        return report

    # ------------------------------------------------------------------ artifacts

    def put_artifact(self, expert: Any, producer: str, config: Any, data: Any) -> Path:
        """Store something derived from one expert (tensors → safetensors, else JSON), keyed by
        ``producer`` and a hash of ``config``; replaces an artifact with the same key."""
        rec = self._resolve(expert)
        validate_name(producer)
        chash = config_hash(config)
        path = _write_artifact(self.path(rec) / "artifacts" / producer / chash, producer, data)
        row = (
            rec.name,
            rec.version,
            producer,
            chash,
            json.dumps(config, sort_keys=True, default=str),
            str(path.relative_to(self.path(rec))),
            sha256_file(path),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        _write_meta(path, dict(zip(ARTIFACT_COLUMNS, row, strict=True)))  # what rebuild_index reads back
        with self._write(f"storing a {producer} artifact") as con:
            con.execute("INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?)", row)
        return path

    def get_artifact(self, expert: Any, producer: str, config: Any) -> Any:
        """The artifact stored for (expert, producer, config), or ``None`` if there is none."""
        rec = self._resolve(expert)
        with self._read() as con:
            row = con.execute(
                "SELECT file, sha256 FROM artifacts WHERE name=? AND version=? AND producer=? AND config_hash=?",
                (rec.name, rec.version, producer, config_hash(config)),
            ).fetchone()
        if row is None:
            return None
        return _read_artifact(self.path(rec) / row[0], row[1])

    def list_artifacts(self, expert: Any) -> builtins.list[dict[str, Any]]:
        rec = self._resolve(expert)
        with self._read() as con:
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
        row = (
            producer,
            chash,
            json.dumps(refs),
            json.dumps(config, sort_keys=True, default=str),
            str(path.relative_to(self.root)),
            sha256_file(path),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        _write_meta(path, dict(zip(GROUP_COLUMNS, row, strict=True)))
        with self._write(f"storing a {producer} group artifact") as con:
            con.execute("INSERT OR REPLACE INTO group_artifacts VALUES (?,?,?,?,?,?,?)", row)
        return path

    def get_group_artifact(self, experts: Iterable[Any], producer: str, config: Any) -> Any:
        """The group artifact for (these experts, producer, config), or ``None``."""
        _, chash = self._group_key(experts, config)
        with self._read() as con:
            row = con.execute(
                "SELECT file, sha256 FROM group_artifacts WHERE producer=? AND config_hash=?", (producer, chash)
            ).fetchone()
        return None if row is None else _read_artifact(self.root / row[0], row[1])

    def list_group_artifacts(self) -> builtins.list[dict[str, Any]]:
        with self._read() as con:
            rows = con.execute("SELECT producer, config_hash, experts, config, file, created FROM group_artifacts").fetchall()
        return [
            dict(producer=p, config_hash=h, experts=json.loads(e), config=json.loads(c), file=f, created=t)
            for p, h, e, c, f, t in rows
        ]


ARTIFACT_COLUMNS = ("name", "version", "producer", "config_hash", "config", "file", "sha256", "created")
GROUP_COLUMNS = ("producer", "config_hash", "experts", "config", "file", "sha256", "created")


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + ".meta.json")


def _write_meta(path: Path, row: dict[str, Any]) -> None:
    atomic_write_json(_meta_path(path), row)


def _loose(raw: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _write_artifact(stem: Path, producer: str, data: Any) -> Path:
    """Tensors → ``stem.safetensors``, anything else JSON-serialisable → ``stem.json`` (atomic)."""
    import torch

    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        path = stem.with_suffix(".safetensors")
        atomic_save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in data.items()})
        return path
    try:
        payload = json.dumps(data)
    except TypeError as exc:
        raise TypeError(f"artifact data for {producer!r} must be a dict of tensors or JSON-serialisable: {exc}") from None
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
