"""GGUF files as base models: converted once to a Hugging Face folder and cached by content hash.

Many users keep their models as ``.gguf`` (llama.cpp's format, often quantised). moerge routes,
merges and serves LoRA experts on a PyTorch model, so a GGUF base is read once by transformers
(with the ``gguf`` package), de-quantised to float32 and written as a plain safetensors folder
under ``<cache>/gguf/<stem>-<sha256[:16]>/`` with the tokenizer and chat template it carried.
Every later use loads that folder in seconds. The folder's name and its ``gguf.json`` hold the
file's SHA-256, so the registry records a GGUF base by its content: the same file under another
name converts to the same folder, and a changed file to a new one.

Wherever moerge takes a base model (``compose``, ``moerge.evaluate``, merges, ``moerge serve
--base``, registering an expert with ``base=``) a path ending in ``.gguf`` is accepted."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moerge.progress import hf_bars
from moerge.registry.files import atomic_write_json, sha256_file
from moerge.runtime import default_cache_dir, locked

#: the first four bytes of every GGUF file
MAGIC = b"GGUF"
#: the converted folder's layout; a change here converts again
FORMAT = 1


def is_gguf(base: Any) -> bool:
    """True for a path (str or Path) whose name ends in ``.gguf`` (any case)."""
    return isinstance(base, str | Path) and str(base).lower().endswith(".gguf")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF base model {path} does not exist (or is not a file)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != MAGIC:
        raise ValueError(f"{path} does not start with the GGUF magic bytes (found {magic!r}): not a GGUF file")


def _digest(path: Path, cache: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) so a 5 GB file is read once."""
    st = path.stat()
    memo = cache / "gguf" / "hashes.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path, chunk=1 << 22)
    with locked(cache / "gguf" / ".hashes.lock"):
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = digest
        atomic_write_json(memo, known)
    return digest


def converted_folder(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder of the GGUF file at ``path``: converted on first use (float32
    safetensors, config, tokenizer with its chat template, ``gguf.json`` naming the source and
    its SHA-256), then found in the cache. Safe to call from several processes at once; an
    interrupted conversion leaves nothing a later call would take for a finished one."""
    src = Path(path).expanduser().resolve()
    _check_file(src)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    digest = _digest(src, cache)
    if (done := _converted(cache, digest)) is not None:
        return done
    with locked(cache / "gguf" / f".{digest[:16]}.lock"):
        if (done := _converted(cache, digest)) is not None:  # another process converted it while this one waited
            return done
        folder = cache / "gguf" / f"{src.stem}-{digest[:16]}"
        _convert(src, digest, folder)
    return folder


def _converted(cache: Path, digest: str) -> Path | None:
    """A finished conversion of the file with this SHA-256, whatever the file was called then."""
    for folder in sorted((cache / "gguf").glob(f"*-{digest[:16]}")):
        meta = source_of(folder)
        if meta is not None and meta.get("sha256") == digest and meta.get("format") == FORMAT:
            return folder
    return None


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """For one conversion: each GGUF file parsed once, each tensor-name map built once.

    transformers reads the ``gguf`` package's names at call time and, for one file, parses it
    three times (config, tokenizer, weights: 12 of a conversion's 29 s here, measured) and builds
    the same tensor-name map once per tensor (397 times, 5.6 s). The reader is read-only (a
    memory map) and the map a pure function of its arguments, so sharing them changes no byte."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()


def _convert(src: Path, digest: str, folder: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers reads GGUF through it
    except ImportError:
        raise ImportError(
            f"reading {src.name} needs the 'gguf' package (pip install gguf, or pip install 'moerge[gguf]')"
        ) from None
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with hf_bars(None), _gguf_read_once():  # transformers' de-quantising bar only where one can be drawn
            model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; say which file and why
        raise ValueError(f"transformers could not read the GGUF file {src}: {type(exc).__name__}: {exc}") from exc
    # the weights are de-quantised floats now: drop the record of the GGUF quantisation, which
    # save_pretrained refuses to write (and which would make a reload look for the GGUF again)
    model.hf_quantizer = None
    model.is_quantized = False
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    with hf_bars(None):
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(
        tmp / "gguf.json",
        {
            "format": FORMAT,
            "source": str(src),
            "sha256": digest,
            "bytes": src.stat().st_size,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "transformers": transformers.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    if folder.exists():  # a folder without gguf.json: a conversion that died before this point
        shutil.rmtree(folder)
    tmp.rename(folder)


def local_base(base: Any, cache_dir: str | Path | None = None) -> Any:
    """``base`` as moerge loads it: a ``.gguf`` path becomes its converted folder (as a str);
    anything else (a folder, a hub id, a live model) is returned as it is."""
    return str(converted_folder(base, cache_dir)) if is_gguf(base) else base


def source_of(folder: str | Path) -> dict[str, Any] | None:
    """The ``gguf.json`` of a converted folder (source path, SHA-256 …), or None for any other folder."""
    meta = Path(folder) / "gguf.json"
    return json.loads(meta.read_text()) if meta.is_file() else None
