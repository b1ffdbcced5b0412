"""File helpers for the registry: hashing, atomic writes, lazy safetensors reading, and the
pickle policy (safetensors always; ``.bin`` only on explicit opt-in, read ``weights_only``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

if TYPE_CHECKING:  # torch loads where tensors are written or read: opening a registry needs none
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class IntegrityError(RuntimeError):
    """A stored file's content no longer matches the sha256 recorded at registration."""


class UnsafeWeightsError(ValueError):
    """Weights stored as pickle were offered without the caller opting in."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, expected: str) -> None:
    """Raise :class:`IntegrityError` naming ``path`` if its sha256 is not ``expected``."""
    if not path.exists():
        raise IntegrityError(f"stored file {path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(
            f"sha256 mismatch for {path}: recorded {expected[:16]}…, found {actual[:16]}…; "
            "the file was changed or corrupted after registration"
        )


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config (used to key artifacts)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pickle_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Read a pickle checkpoint only when the caller opted in, and then with ``weights_only=True``."""
    if not allow_pickle:
        raise UnsafeWeightsError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors, or pass allow_pickle=True to read it with torch.load(weights_only=True)"
        )
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    return state


class TensorFolder:
    """Lazy, key-addressed view over the weights of a model folder (one or many safetensors
    shards). Tensors are read one at a time, so a caller can stream a whole model."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, stem: str | None = None) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob(f"{stem}*.safetensors" if stem else "*.safetensors"))
        self._key_to_file: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        if files:
            for f in files:
                with safe_open(f, "pt") as h:
                    for k in h.keys():
                        self._key_to_file[k] = f
        else:
            pickles = [p for p in sorted(self.folder.iterdir()) if p.suffix in PICKLE_SUFFIXES and p.is_file()]
            if not pickles:
                raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {self.folder}")
            for p in pickles:
                self._pickled.update(load_pickle_weights(p, allow_pickle))

    def keys(self) -> list[str]:
        return list(self._key_to_file) or list(self._pickled)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file or key in self._pickled

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._pickled:
            return tuple(self._pickled[key].shape)
        with safe_open(self._key_to_file[key], "pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._pickled:
            return {k: tuple(v.shape) for k, v in self._pickled.items()}
        out: dict[str, tuple[int, ...]] = {}
        by_file: dict[Path, list[str]] = {}
        for k, f in self._key_to_file.items():
            by_file.setdefault(f, []).append(k)
        for f, ks in by_file.items():
            with safe_open(f, "pt") as h:
                for k in ks:
                    out[k] = tuple(h.get_slice(k).get_shape())
        return out

    def get(self, key: str) -> torch.Tensor:
        if key in self._pickled:
            return self._pickled[key]
        with safe_open(self._key_to_file[key], "pt") as h:
            return h.get_tensor(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


@contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A scratch folder on the registry's own filesystem (so the final move is a rename)."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=root, prefix="stage-"))
    try:
        yield path
    finally:
        if path.exists():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
