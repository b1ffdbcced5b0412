"""Layer stacking: mergekit's ``passthrough`` over ``slices`` (the "frankenmerge"): a new model
whose decoder layers are ranges of layers taken from other models, in order.

::

    slices:
      - sources: [{model: ./a, layer_range: [0, 24]}]
      - sources: [{model: ./b, layer_range: [8, 32]}]
    merge_method: passthrough

gives a 48-layer model: layers 0–23 of ``a``, then layers 8–31 of ``b`` as layers 24–47. As in
mergekit, the tensors before the layers (the embeddings) come from the first slice's model and
those after them (the final norm, the head) from the last slice's; the config (with the new
layer count) and the tokenizer from the first slice's model. A per-model ``scale`` multiplies
that model's tensors (a number, a gradient over the slice's layers, or filters — mergekit's
way to zero a block's ``o_proj`` and ``down_proj``, for one). Streamed tensor by tensor and
written atomically, like :func:`moerge.merge`'s dense merges. Checked against mergekit on the
same files.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.adapters.merge import LAYER_KEY, Setting
from moerge.composer.merge import REPORT_FILE, MergeReport, ShardWriter, _atomic_folder, _num_layers
from moerge.progress import progress_bar
from moerge.registry.files import TensorFolder, atomic_write_json

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Slice:
    """Layers ``[start, stop)`` of the model folder ``model``, each tensor times ``scale``."""

    model: str
    start: int
    stop: int
    scale: Any = None  # None, a number or a Setting (resolved per tensor over the slice's layers)


def _folder(ref: str) -> Path:
    from moerge.registry.importers import resolve_base

    info = resolve_base(ref, required=True)
    if info is None or info.folder is None:
        raise FileNotFoundError(f"passthrough: {ref!r} is not a model folder or a hub id in the local cache")
    return Path(info.folder)


def stack_layers(
    slices: Sequence[Slice], out: str | Path, *, dtype: torch.dtype | None = None, progress: bool | None = None
) -> Path:
    """Write the model the ``slices`` stack (see the module) to ``out`` (a new or empty folder);
    its path. ``dtype``: the written weights' (default: each source tensor's)."""
    t0 = time.perf_counter()
    if not slices:
        raise ValueError("passthrough needs at least one slice")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"merge output {out} exists and is not an empty folder")
    folders = {s.model: _folder(s.model) for s in slices}
    views = {m: TensorFolder(f) for m, f in folders.items()}
    for i, s in enumerate(slices):
        n = _num_layers(folders[s.model])
        if not (0 <= s.start < s.stop) or (n is not None and s.stop > n):
            raise ValueError(f"slices[{i}].layer_range: [{s.start}, {s.stop}] is not a range of {s.model}'s {n} layers")
    first, last = views[slices[0].model], views[slices[-1].model]
    split = [LAYER_KEY.match(k) for k in first.keys()]
    template = sorted({m["rest"] for m in split if m and int(m["index"]) == slices[0].start})
    prefix = next((m["prefix"] for m in split if m), None)
    if prefix is None:
        raise ValueError(f"passthrough: no decoder layers found in {slices[0].model}")
    before = [k for k, m in zip(first.keys(), split, strict=True) if m is None and _is_embedding(k)]
    after = [k for k in last.keys() if not LAYER_KEY.match(k) and not _is_embedding(k)]
    plan: list[tuple[str, str, str, Slice, int, int]] = [(k, slices[0].model, k, slices[0], 0, 1) for k in before]
    index = 0
    for s in slices:
        length = s.stop - s.start
        for offset in range(length):
            for rest in template:
                plan.append((f"{prefix}{index}{rest}", s.model, f"{prefix}{s.start + offset}{rest}", s, offset, length))
            index += 1
    plan += [(k, slices[-1].model, k, slices[-1], 0, 1) for k in after]
    for _, model, in_key, *_ in plan:
        if in_key not in views[model]:
            raise ValueError(f"passthrough: {model} has no tensor {in_key} (the slices' models must share an architecture)")

    def write(stage: Path) -> None:
        writer = ShardWriter(stage, 2 * 1024**3)
        for out_key, model, in_key, s, offset, length in progress_bar(plan, desc="passthrough", progress=progress):
            x = views[model].get(in_key)
            scale = s.scale
            if isinstance(scale, Setting):  # mergekit: t over the slice's own layers; 0 outside them
                t = (offset / (length - 1) if length > 1 else 1.0) if LAYER_KEY.match(in_key) else 0.0
                scale = scale.at_t(in_key, t)
            if scale is not None:
                x = (x.float() * float(scale)).to(x.dtype)
            writer.add(out_key, x.to(dtype) if dtype is not None and x.is_floating_point() else x)
        writer.close()
        src = folders[slices[0].model]
        copy_model_files(src, stage, index, dtype)
        report = MergeReport("passthrough", {"slices": [[s.model, s.start, s.stop] for s in slices]}, list(folders),
                             str(folders[slices[0].model]), "model")  # fmt: skip
        report.tensors, report.seconds = len(plan), time.perf_counter() - t0
        atomic_write_json(stage / REPORT_FILE, report.to_json())

    return _atomic_folder(out, write)


def copy_model_files(src: Path, stage: Path, layers: int, dtype: torch.dtype | None) -> None:
    """Everything of the model folder ``src`` but its weights (config, tokenizer, generation
    config) into ``stage``, the config saying ``layers`` decoder layers (and ``dtype``)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, stage / f.name)
    cfg_path = stage / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        inner = cfg.get("text_config", cfg)
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(inner.get(name), int):
                inner[name] = layers
        if isinstance(inner.get("layer_types"), list) and inner["layer_types"]:
            inner["layer_types"] = [inner["layer_types"][0]] * layers
        if dtype is not None:
            cfg["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_json(cfg_path, cfg)


def _is_embedding(key: str) -> bool:
    """A tensor outside the layers that comes before them (the embeddings; mergekit's "pre
    weights"), as opposed to the final norm and the head after them."""
    return "embed" in key or key.startswith(("wte", "wpe", "transformer.wte", "transformer.wpe"))
