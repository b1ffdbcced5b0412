"""mergekit's ``slices`` with a merge method (not passthrough): each slice merges its sources'
layer ranges layer by layer, and the slices stack into the output model::

    merge_method: slerp
    base_model: ./a
    slices:
      - sources: [{model: ./a, layer_range: [0, 16]}, {model: ./b, layer_range: [0, 16]}]
      - sources: [{model: ./a, layer_range: [16, 32]}, {model: ./b, layer_range: [16, 32]}]
    parameters: {t: [0, 0.5, 1]}      # a gradient spreads over each slice's own layers

Output layer o_s + j of slice s is the merge of every source's layer start + j, with the slice's
plan (:func:`moerge.composer.mergekit.plan_merge` of the slice as a ``models`` config: the same
kernels and parameters as a whole-model merge); a gradient's position is j over the slice's
length. The embeddings come from the first slice's sources and the final norm and head from the
last slice's, merged at the gradient's first value — mergekit's rules, checked tensor for tensor
against it (``tests/test_merge.py``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moerge.adapters.merge import LAYER_KEY, get_merge, kernel_kwargs, merge_params, resolve_settings
from moerge.composer.merge import REPORT_FILE, MergeReport, ShardWriter, _atomic_folder, _load_model, _tmp_root
from moerge.composer.passthrough import _folder, _is_embedding, copy_model_files
from moerge.device import resolve_dtype
from moerge.progress import progress_bar
from moerge.registry.files import TensorFolder, atomic_write_json, staging_dir


def merge_slices(plan: Mapping[str, Any], out: str | Path | None = None, progress: bool | None = None) -> Any:
    """Write the model of a sliced merge plan (``plan_merge`` of a config with ``slices`` and a
    merge method) to ``out`` and return its path; without ``out``, load and return it."""
    t0 = time.perf_counter()
    slices = plan["slices"]
    refs = sorted({r for sl in slices for r in sl["ranges"]})
    views = {r: TensorFolder(_folder(r)) for r in refs}
    dtype = resolve_dtype(plan["dtype"], torch.device("cpu")) if plan.get("dtype") else None
    first, last = slices[0], slices[-1]
    base_keys = views[first["base"]].keys()
    split = [LAYER_KEY.match(k) for k in base_keys]
    prefix = next((m["prefix"] for m in split if m), None)
    if prefix is None:
        raise ValueError(f"sliced merge: no decoder layers found in {first['base']}")
    start0 = first["ranges"][first["base"]][0]
    template = sorted({m["rest"] for m in split if m and int(m["index"]) == start0})
    # (output key, the slice's index, the key each source reads, the key a setting is resolved at)
    entries: list[tuple[str, int, dict[str, str], str]] = []
    for k in base_keys:
        if not LAYER_KEY.match(k) and _is_embedding(k):
            entries.append((k, 0, dict.fromkeys(first["ranges"], k), k))
    index = 0
    for n, sl in enumerate(slices):
        for j in range(sl["length"]):
            for rest in template:
                reads = {r: f"{prefix}{a + j}{rest}" for r, (a, _) in sl["ranges"].items()}
                entries.append((f"{prefix}{index}{rest}", n, reads, f"{prefix}{j}{rest}"))
            index += 1
    for k in views[last["base"]].keys():
        if not LAYER_KEY.match(k) and not _is_embedding(k):
            entries.append((k, len(slices) - 1, dict.fromkeys(last["ranges"], k), k))
    for _, _, reads, _ in entries:
        for r, key in reads.items():
            if key not in views[r]:
                raise ValueError(f"sliced merge: {r} has no tensor {key} (the slices' models must share an architecture)")
    kernels = [get_merge(sl["method"]) for sl in slices]
    params = [merge_params(sl["method"], dict(sl["params"])) for sl in slices]

    def merged(i: int, reads: dict[str, str], at: str) -> torch.Tensor:
        sl, kernel, layers = slices[i], kernels[i], slices[i]["length"]
        base = views[sl["base"]].get(reads[sl["base"]])
        if not base.is_floating_point():
            return base
        taus = [views[r].get(reads[r]).float() - base.float() for r in sl["experts"]]
        w = sl["weights"]
        w = None if w is None else torch.tensor([float(x) for x in resolve_settings(list(w), at, layers)])
        own = {"base": base.float()} if kernel.needs_base else {}
        m = kernel(taus, w, **kernel_kwargs(kernel.name, params[i], at, layers), **own)
        return (base.float() + m).to(dtype or base.dtype)

    def write(stage: Path) -> None:
        writer = ShardWriter(stage, 2 * 1024**3)
        for out_key, i, reads, at in progress_bar(entries, desc=f"merge {plan['kernel']} over slices", progress=progress):
            writer.add(out_key, merged(i, reads, at))
        writer.close()
        src = _folder(first["base"])
        copy_model_files(src, stage, index, dtype)
        report = MergeReport(plan["kernel"], {"slices": [[[r, *rg] for r, rg in sl["ranges"].items()] for sl in slices]},
                             refs, str(src), "model")  # fmt: skip
        report.tensors, report.seconds = len(entries), time.perf_counter() - t0
        atomic_write_json(stage / REPORT_FILE, report.to_json())

    if out is not None:
        out = Path(out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"merge output {out} exists and is not an empty folder")
        return _atomic_folder(out, write)
    with staging_dir(_tmp_root()) as stage:
        write(stage / "model")
        model, tok = _load_model(str(stage / "model"))
    model.tokenizer = tok
    return model
