"""Serving without a shared disk: the registry (and a base model folder) reach workers on other
nodes through Ray, fetched once per node and verified by sha256.

:class:`RegistryService` is a Ray actor on the node that holds the registry (``deploy`` starts
it on the driver's node). A worker whose registry path is missing on its node — or holds a
different registry (index id) — calls :func:`local_registry`: under an ``flock`` per node it
mirrors the records and their files into the node's cache (``$MOERGE_CACHE/mirrors/<index id>``),
checks every file against the sha256 in its record, builds the mirror's index from those records
(:meth:`Registry.rebuild_index`), and does the same for a base model that is a local folder
there. Experts registered later are fetched when a request first names them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moerge.registry import Registry
from moerge.registry.files import atomic_write_bytes, sha256_file

#: bytes per call when a file is fetched from the service (an object-store round trip each)
CHUNK = 64 * 1024 * 1024


class RegistryService:
    """Read-only access to one registry's records and files, and to one base model folder, for
    workers that cannot see them. Only files a record lists (or the base folder's) are served."""

    def __init__(self, registry: str, base: str | None = None) -> None:
        self.registry = Registry(registry)
        self.base = Path(base).expanduser() if base and Path(base).expanduser().is_dir() else None

    def index_id(self) -> str:
        return (self.registry.root / ".index-id").read_text().strip()

    def records(self) -> list[str]:
        return [r.model_dump_json() for r in self.registry.list(all_versions=True)]

    def base_listing(self) -> dict[str, str] | None:
        """The base folder's files (relative path → sha256), or None if the base is not a folder here."""
        if self.base is None:
            return None
        return {str(p.relative_to(self.base)): sha256_file(p) for p in sorted(self.base.rglob("*")) if p.is_file()}

    def read(self, ref: str, rel: str, offset: int = 0) -> bytes:
        """Up to CHUNK bytes of file ``rel`` of expert ``ref`` (``name@version``), or of the base
        folder when ``ref`` is ``"__base__"``."""
        if ref == "__base__":
            if self.base is None:
                raise FileNotFoundError("this registry service has no base folder")
            path = (self.base / rel).resolve()
            if not path.is_relative_to(self.base.resolve()):
                raise PermissionError(f"{rel!r} is outside the base folder")
        else:
            rec = self.registry.get(ref)
            if rel not in rec.files:
                raise FileNotFoundError(f"expert {ref} has no file {rel!r}")
            path = self.registry.path(rec) / rel
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(CHUNK)


def _cache_root() -> Path:
    from moerge.runtime import default_cache_dir

    return default_cache_dir() / "mirrors"


def _fetch(service: Any, ref: str, rel: str, dest: Path, sha: str) -> None:
    """Copy one file from the service into ``dest`` (atomic), verified by ``sha``."""
    import ray

    if dest.exists() and sha256_file(dest) == sha:
        return
    data = bytearray()
    while True:
        chunk = ray.get(service.read.remote(ref, rel, len(data)))
        data += chunk
        if len(chunk) < CHUNK:
            break
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise OSError(f"{ref}/{rel} arrived with sha256 {got[:16]}…, not the recorded {sha[:16]}…")
    atomic_write_bytes(dest, bytes(data))


def _locked(path: Path) -> Any:
    """An exclusive flock on ``path`` (the registry's own, :func:`moerge.registry.store._lock`)."""
    from moerge.registry.store import _lock

    path.parent.mkdir(parents=True, exist_ok=True)
    return _lock(path)


def mirror(service: Any, cache: Path | None = None) -> Path:
    """Mirror the service's registry on this node (new or changed records only); returns the
    mirror's folder, a registry with its own index."""
    import ray

    from moerge.registry.schema import ExpertRecord

    index_id = ray.get(service.index_id.remote())
    root = (cache or _cache_root()) / index_id
    lock = _locked(root.parent / f".{index_id}.lock")
    try:
        changed = not (root / "index.sqlite").exists()
        for raw in ray.get(service.records.remote()):
            rec = ExpertRecord.model_validate_json(raw)
            folder = root / "experts" / rec.name / str(rec.version)
            record_file = folder / "record.json"
            if record_file.exists() and json.loads(record_file.read_text()) == json.loads(raw):
                continue
            for rel, sha in rec.files.items():
                _fetch(service, rec.ref, rel, folder / rel, sha)
            atomic_write_bytes(record_file, raw.encode())
            changed = True
        if changed:
            Registry.rebuild_index(root)
            for old in root.glob("index.sqlite.damaged-*"):
                old.unlink()
        return root
    finally:
        lock.close()


def mirror_base(service: Any, cache: Path | None = None) -> Path | None:
    """Mirror the service's base folder on this node (verified), or None if it has none."""
    import ray

    listing = ray.get(service.base_listing.remote())
    if listing is None:
        return None
    key = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    root = (cache or _cache_root()) / "bases" / key
    lock = _locked(root.parent / f".{key}.lock")
    try:
        for rel, sha in listing.items():
            _fetch(service, "__base__", rel, root / rel, sha)
        return root
    finally:
        lock.close()


def sees_registry(path: str, service: Any) -> bool:
    """Whether ``path`` on this node is the service's registry (same index id)."""
    import ray

    id_file = Path(path).expanduser() / ".index-id"
    try:
        return id_file.read_text().strip() == ray.get(service.index_id.remote())
    except OSError:
        return False


def start_service(registry: str, base: str | None = None) -> Any:
    """A :class:`RegistryService` actor pinned to this node (the one that holds the registry)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(RegistryService).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False), max_restarts=-1
    )
    return actor.remote(registry, base)


def local_paths(registry: str, base: str | None, service: Any) -> tuple[str, str | None, str | None]:
    """(registry folder, base, the base the records name) usable on this node: the given ones
    when this node sees them, else mirrors fetched through ``service``."""
    if service is None or sees_registry(registry, service):
        return registry, base, None
    root = mirror(service)
    names = {r.base_model for r in Registry(root).list(kind="lora") if r.base_model}
    original = base or (next(iter(names)) if len(names) == 1 else None)
    if original is not None and not Path(original).expanduser().is_dir():
        local_base = mirror_base(service)
        return str(root), str(local_base) if local_base is not None else original, original
    return str(root), base, None


def refresh(service: Any) -> None:
    """Fetch records registered since the mirror was made (a request named an unknown expert)."""
    if service is not None:
        mirror(service)
