"""``moerge.merge(base, experts, method, out=None, **params)``: a static merge of LoRA or dense
experts with one of the kernels in :mod:`moerge.adapters.merge`.

* LoRA experts merge in ΔW = s·B·A space, module by module. The result is re-factored by
  truncated SVD into one LoRA (``output="lora"``, saved as a PEFT folder that
  ``PeftModel.from_pretrained`` loads) or folded into the base weights (``output="model"``).
  Linear methods (``average``, ``task_arithmetic``, ``svd``) re-factor in factor form (thin QR
  of the stacked factors), never building a d_out×d_in matrix.
* Dense experts merge as task vectors, streamed tensor by tensor from safetensors: peak memory
  is the output being written (flushed in shards) plus one tensor per expert, not N models.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moerge.adapters.lora import LoraExpert, LoraFactors, load_lora, lowrank_from_delta, lowrank_from_factors
from moerge.adapters.merge import (
    get_merge,
    has_settings,
    kernel_kwargs,
    merge_lora_deltas,
    merge_params,
    resolve_settings,
)
from moerge.composer.vocab import TOKENIZER_FILES, build_vocabulary, parse_source, vocabulary_tensors
from moerge.device import DeviceLike, resolve_device, resolve_dtype
from moerge.hints import did_you_mean
from moerge.progress import hf_bars, progress_bar
from moerge.registry import ExpertRecord, Registry, Selection
from moerge.registry.files import TensorFolder, atomic_save_tensors, atomic_write_json, staging_dir
from moerge.registry.gguf import local_base
from moerge.registry.importers import MoergeWarning, absolute_path, detect_kind, resolve_source

log = logging.getLogger(__name__)

Output = Literal["lora", "model"]
REPORT_FILE = "moerge_merge.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class MergeReport:
    """What a merge did: inputs, parameters, timings and, for a LoRA output, the re-factoring
    error per module (relative Frobenius norm of merged ΔW minus its rank-r factors)."""

    method: str
    params: dict[str, Any]
    experts: list[str]
    base: str
    output: str
    rank: int | None = None
    #: rank="auto": the target relative error and each module's chosen rank (the PEFT folder's
    #: r is their maximum; smaller modules are zero-padded)
    rank_tolerance: float | None = None
    module_ranks: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    seconds: float = 0.0
    refactor_error: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_refactor_error(self) -> float:
        return max(self.refactor_error.values(), default=0.0)


# ------------------------------------------------------------------------ expert sources


@dataclass
class DenseSource:
    """One dense expert's task vector, read lazily: a registry task vector, or θ_i − θ_0 for a
    whole model (registry ``whole`` storage or a model folder)."""

    name: str
    weights: TensorFolder
    is_task_vector: bool

    def task_tensor(self, key: str, base: torch.Tensor) -> torch.Tensor:
        if key not in self.weights:
            if self.is_task_vector:  # the registry leaves out tensors equal to the base (non-float)
                return torch.zeros_like(base, dtype=torch.float32)
            raise KeyError(f"expert {self.name!r} has no weight {key!r} that the base model has")
        t = self.weights.get(key).to(base.device)
        if tuple(t.shape) != tuple(base.shape):
            raise ValueError(f"expert {self.name!r}: weight {key!r} has shape {tuple(t.shape)}, base has {tuple(base.shape)}")
        return t.float() if self.is_task_vector else t.float() - base.float()

    def whole_tensor(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """θ_i itself (float32), of the expert's own shape: a vocabulary tensor of a model whose
        vocabulary differs from the base's is laid out anew (:mod:`moerge.composer.vocab`)."""
        if self.is_task_vector:
            return base.float() + self.task_tensor(key, base)
        if key not in self.weights:
            raise KeyError(f"expert {self.name!r} has no weight {key!r} that the base model has")
        return self.weights.get(key).to(base.device).float()

    @property
    def folder(self) -> Path | None:
        """The expert's model folder (its tokenizer's); None for a registry task vector."""
        return None if self.is_task_vector else self.weights.folder


def _records(experts: Any, registry: Registry | None) -> tuple[Registry | None, list[Any]]:
    if isinstance(experts, Registry):
        return experts, list(experts.list())
    if isinstance(experts, Selection):
        return experts.registry, list(experts.records)
    if isinstance(experts, str | Path | ExpertRecord):
        experts = [experts]
    items = list(experts or [])
    if not items:
        raise ValueError("merge needs at least one expert")
    return registry, items


def _kind_of(item: Any, registry: Registry | None) -> tuple[str, Any, str]:
    """(kind, resolved item, display name) for a registry name/record or a folder."""
    if isinstance(item, ExpertRecord):
        return item.kind, item, item.ref
    path = Path(str(item)).expanduser()
    if path.is_dir():
        kind = detect_kind(path)
        return ("lora" if kind == "lora" else "dense"), path, path.name
    if registry is not None and str(item).partition("@")[0] in registry:
        rec = registry._resolve(item)
        return rec.kind, rec, rec.ref
    try:  # a hub id through the HF cache
        path, _ = resolve_source(str(item), "expert")
    except FileNotFoundError as exc:
        if registry is None:
            raise FileNotFoundError(f"{exc}; to name registry experts pass registry= (or a Selection)") from None
        registry._resolve(item)  # not in the registry either: its error names the closest expert
        raise
    kind = detect_kind(path)
    return ("lora" if kind == "lora" else "dense"), path, str(item)


def _dense_source(item: Any, registry: Registry | None, name: str) -> DenseSource:
    if isinstance(item, ExpertRecord):
        folder = registry.path(item)  # type: ignore[union-attr]
        for rel in item.files:  # verify before reading lazily
            if rel.endswith(".safetensors"):
                registry.file(item, rel)  # type: ignore[union-attr]
        if item.storage == "task_vector":
            return DenseSource(name, TensorFolder(folder, stem="task_vector"), True)
        return DenseSource(name, TensorFolder(folder), False)
    return DenseSource(name, TensorFolder(item), False)


def _base_of(items: Sequence[tuple[str, Any, str]], base: Any) -> str:
    if base is not None:  # a folder is written absolute into the merged adapter_config.json
        return absolute_path(base) if Path(str(base)).expanduser().is_dir() else str(base)
    found = set()
    for _, it, _ in items:
        if isinstance(it, ExpertRecord):
            found.add(it.base_model)
        elif (Path(it) / "adapter_config.json").exists():
            found.add(json.loads((Path(it) / "adapter_config.json").read_text()).get("base_model_name_or_path"))
        else:
            found.add(None)
    if len(found) != 1 or None in found:
        raise ValueError(f"the experts do not name one common base model ({sorted(map(str, found))}); pass base=")
    chosen = str(next(iter(found)))
    return absolute_path(chosen) if Path(chosen).expanduser().is_dir() else chosen


# ------------------------------------------------------------------------------ merge


#: a LoRA output whose re-factoring loses more than this (relative error) warns
REFACTOR_WARN = 0.1


def merge(
    base: Any = None,
    experts: Any = None,
    method: str = "ties",
    out: str | Path | None = None,
    *,
    registry: Registry | None = None,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    output: Output | None = None,
    rank: int | Literal["auto"] | None = None,
    rank_tolerance: float = 1e-2,
    dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: DeviceLike = "auto",
    tokenizer_source: str | None = None,
    **params: Any,
) -> Any:
    """Merge ``experts`` onto ``base`` with ``method`` (``average``, ``task_arithmetic``,
    ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``svd``, ``cat``; mergekit's
    ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, ``sce``, ``slerp``,
    ``nearswap``, ``model_stock``, ``nuslerp``, ``multislerp``, ``karcher``, ``arcee_fusion``, ``ram``,
    ``ramplus_tl``) and its ``params`` (``density``, ``majority_sign_method``,
    ``lambda``, ``seed``, ``flavor``, ``rank``, ``gamma``, ``epsilon``, ``select_topk``, ``t`` …).

    ``experts``: a Registry, ``registry.select(...)``, or a list of registry names (with
    ``registry=``) or PEFT-adapter / model folders — all LoRA or all dense. ``weights``: one per
    expert (a list in order, or name → weight). ``base``: a folder or hub id in the local cache;
    default the experts' registered base. LoRA experts give ``output="lora"`` by default (one
    LoRA of rank ``rank``, default the largest input rank as PEFT does) or ``"model"`` (folded
    into the base); dense experts give a model. ``rank="auto"``: per module, the smallest rank
    whose re-factoring error ‖ΔW − B·A‖_F/‖ΔW‖_F is at most ``rank_tolerance`` (default 1e-2);
    the chosen ranks are in the report (``module_ranks``, ``rank`` their maximum).

    With ``out`` the result is written there (a PEFT folder or a model folder with config and
    tokenizer; the folder must not exist or be empty; written atomically) and its path is
    returned; without, the merged model is returned (a ``PeftModel`` for a LoRA output). Either
    way the :class:`MergeReport` is at ``result.merge_report`` / ``out/moerge_merge.json``.

    ``device``: where the kernels run (``"auto"``: a GPU when there is one). Dense merges still
    stream tensor by tensor: one tensor per expert is on the device at a time; the output is
    written from the CPU in the base's dtype, or ``dtype`` (a model output's weights).
    ``progress``: as in :func:`moerge.compose`.

    ``tokenizer_source`` (dense experts): ``"base"``, ``"union"`` or a model folder
    (``"model:PATH"``) — the output's tokenizer, with every model's embeddings and output head laid
    out in its token order before merging, as mergekit does, so models of different vocabularies
    merge (:mod:`moerge.composer.vocab`). Without it every expert must have the base's shapes."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    out_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    m = get_merge(method)
    if rank == "auto":
        if "rank" in m.params:
            raise ValueError("rank='auto' chooses a LoRA output's rank; the svd method needs a fixed rank (use task_arithmetic)")
        if not 0 <= float(rank_tolerance) < 1:
            raise ValueError(f"rank_tolerance must be in [0, 1), got {rank_tolerance}")
    elif rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}")
    if "rank" in m.params and rank is not None:  # svd: merge()'s rank is the kernel's rank
        params.setdefault("rank", rank)
    params = merge_params(method, params, also=_OWN_OPTIONS)
    tokenizer_source = parse_source(tokenizer_source)
    reg, items = _records(experts, registry)
    resolved = [_kind_of(it, reg) for it in items]
    kinds = {k for k, _, _ in resolved}
    if not kinds <= {"lora", "dense"}:
        bad = [n for k, _, n in resolved if k not in ("lora", "dense")]
        raise ValueError(f"only LoRA and dense experts can be merged; these are not: {bad}")
    if len(kinds) > 1:
        raise ValueError(
            "cannot merge LoRA and dense experts together: "
            f"LoRA {[n for k, _, n in resolved if k == 'lora']}, dense {[n for k, _, n in resolved if k == 'dense']}"
        )
    names = [n for _, _, n in resolved]
    varying = has_settings(params, weights)  # gradients or filters (a mergekit config's): resolved per tensor
    w = list(weights) if varying and weights is not None and not isinstance(weights, Mapping) else _expert_weights(weights, names)
    if varying and w is not None and len(w) != len(names):
        raise ValueError(f"{len(w)} weights for {len(names)} experts ({names})")
    base_id = local_base(_base_of(resolved, base))  # a .gguf file: its converted folder
    kind = kinds.pop()
    if output is None:
        output = "lora" if kind == "lora" else "model"
    if output not in ("lora", "model"):
        raise ValueError(f"output must be 'lora' or 'model', got {output!r}")
    if kind == "dense" and output == "lora":
        raise ValueError("dense experts merge into a model (output='model'); a LoRA output needs LoRA experts")
    if out is not None:
        out = Path(out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"merge output {out} exists and is not an empty folder")
    report = MergeReport(method, {**params}, names, base_id, output)
    if kind == "lora" and tokenizer_source not in (None, "base"):
        raise ValueError(
            f"tokenizer_source {tokenizer_source!r} lays out embeddings of models with their own vocabularies; LoRA experts "
            "share the base's (merge them without it, or fold each into the base and merge the models)"
        )
    if kind == "lora":  # refused before any tensor is read
        if varying:
            raise ValueError(
                "per-layer gradients and filters (a parameter that varies over the tensors) apply to dense experts; "
                "give LoRA experts one value per parameter"
            )
        if m.needs_base:
            raise ValueError(
                f"{m.name} reads whole weights (slerp interpolates them) and a LoRA's ΔW has no base: merge dense "
                "experts with it (fold each LoRA into the base first), or use a method defined on task vectors "
                "(nearswap, model_stock, task_arithmetic, ties …)"
            )
        loras = [
            load_lora(it, name=n, registry=reg, device=dev) if isinstance(it, ExpertRecord) else load_lora(it, name=n, device=dev)
            for _, it, n in resolved
        ]
        if rank == "auto" and output != "lora":
            raise ValueError("rank='auto' applies to a LoRA output; output='model' keeps the exact merge")
        result = _merge_lora(
            base_id, loras, m.name, params, w, output, rank, out, report, progress, float(rank_tolerance), out_dtype
        )
    else:
        sources = [_dense_source(it, reg, n) for _, it, n in resolved]
        result = _merge_dense(
            base_id, sources, m.name, params, w, out, report, progress, shard_bytes, dev, out_dtype, tokenizer_source
        )
    report.seconds = time.perf_counter() - t0
    if report.max_refactor_error > REFACTOR_WARN and report.rank_tolerance is None:  # rank="auto": the user's bound
        worst = max(report.refactor_error, key=report.refactor_error.get)
        warnings.warn(
            f"the merged LoRA was cut back to rank {report.rank}: its ΔW differs from the exact merge by up to "
            f"{report.max_refactor_error:.0%} (relative Frobenius norm, at {worst}); pass rank='auto' (each module's "
            "smallest rank within rank_tolerance, default 1%), a larger rank= or output='model' to keep the exact merge "
            "(every module's error: merge_report.refactor_error)",
            MoergeWarning,
            stacklevel=2,
        )
    if out is not None:
        atomic_write_json(Path(result) / REPORT_FILE, report.to_json())
    else:
        result.merge_report = report
    return result


#: merge()'s own keywords, suggested when a misspelt one lands among the kernel's parameters
_OWN_OPTIONS = (
    "registry", "weights", "output", "rank", "rank_tolerance", "dtype", "progress", "shard_bytes", "device", "tokenizer_source",
)  # fmt: skip


def _expert_weights(weights: Any, names: list[str]) -> torch.Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, Mapping):  # keyed by name@version or by the bare name
        bare = {n: n.rsplit("@", 1)[0] for n in names}
        known = set(names) | set(bare.values())
        unknown = sorted(set(map(str, weights)) - known)
        if unknown:
            hints = "".join(did_you_mean(u, sorted(known)) for u in unknown)
            raise ValueError(f"weights name experts that are not merged: {unknown}{hints} (merging {names})")
        return torch.tensor([float(weights.get(n, weights.get(bare[n], 1.0))) for n in names])
    w = [float(x) for x in weights]
    if len(w) != len(names):
        raise ValueError(f"{len(w)} weights for {len(names)} experts ({names})")
    return torch.tensor(w)


# ------------------------------------------------------------------------------- LoRA


def _merge_lora(
    base_id: str,
    loras: list[LoraExpert],
    method: str,
    params: dict[str, Any],
    weights: torch.Tensor | None,
    output: Output,
    rank: int | None,
    out: Path | None,
    report: MergeReport,
    progress: bool | None,
    tolerance: float = 1e-2,
    out_dtype: torch.dtype | None = None,
) -> Any:
    fifo = {e.fan_in_fan_out for e in loras}
    if len(fifo) > 1:
        raise ValueError("the LoRA experts disagree on fan_in_fan_out (they adapt different layer types)")
    if method == "svd":  # its rank is the output rank; the factor-form terms are the exact sum
        rank = int(params["rank"])
        params = {k: v for k, v in params.items() if k != "rank"}
    if method == "cat":
        if rank is not None:
            raise ValueError("cat keeps every expert's factors: its rank is the sum of theirs (drop rank=)")
        rank = sum(max(f.rank for f in e.modules.values()) for e in loras)
    auto = rank == "auto"
    target_rank = None if auto else (rank or max(f.rank for e in loras for f in e.modules.values()))
    report.rank = target_rank if output == "lora" else None
    report.rank_tolerance = tolerance if auto else None
    modules = sorted({mod for e in loras for mod in e.modules})
    bar = progress_bar(
        merge_lora_deltas(loras, method, params, weights), total=len(modules), desc=f"merge {method}", progress=progress
    )
    if output == "model":
        model, tok = _load_model(base_id)
        for mod, delta, terms in bar:
            if delta is None:
                delta = (
                    lowrank_from_factors(terms, target_rank).delta() if method == "svd" else sum(c * f.delta() for c, f in terms)
                )
            layer = model.get_submodule(mod)
            d = delta.T if fifo == {True} else delta
            with torch.no_grad():
                layer.weight.add_(d.to(device=layer.weight.device, dtype=layer.weight.dtype))
            report.tensors += 1
        if out_dtype is not None:
            model.to(out_dtype)
        return _finish_model(model, tok, out)
    factors: dict[str, LoraFactors] = {}
    for mod, delta, terms in bar:
        tol = tolerance if auto else None
        if method == "cat":  # side by side, exactly (PEFT's layout: the weight and scaling in A)
            A = torch.cat([(c * t.scaling) * t.A.float() for c, t in terms])
            factors[mod] = LoraFactors(A, torch.cat([t.B.float() for _, t in terms], dim=1), 1.0)
            report.tensors += 1
            continue
        if delta is None:
            f = lowrank_from_factors(terms, target_rank, tolerance=tol)
            full = sum(c * t.delta() for c, t in terms) if _small(terms) else None
        else:
            f = lowrank_from_delta(delta, None if auto else min(target_rank, min(delta.shape)), tolerance=tol)
            full = delta
        if auto:
            report.module_ranks[mod] = f.rank
        if full is not None:
            norm = full.norm()
            report.refactor_error[mod] = float((full - f.delta()).norm() / norm) if norm > 0 else 0.0
        factors[mod] = f
        report.tensors += 1
    if auto:
        target_rank = report.rank = max(report.module_ranks.values(), default=1)
    merged = LoraExpert(f"{method}-merge", factors, fan_in_fan_out=fifo.pop())
    return _finish_lora(merged, base_id, target_rank, out)


def _small(terms: list[tuple[float, LoraFactors]]) -> bool:
    f = terms[0][1]
    return f.B.shape[0] * f.A.shape[1] <= 4096 * 4096


def save_peft_lora(expert: LoraExpert, folder: Path, base_id: str, rank: int) -> Path:
    """Write ``expert`` (scaling folded into B) as a PEFT LoRA folder: r = ``rank``,
    lora_alpha = r (scaling 1), exact module names as targets, ranks below r zero-padded."""
    state: dict[str, torch.Tensor] = {}
    for mod, f in expert.modules.items():
        A = torch.zeros(rank, f.A.shape[1])
        B = torch.zeros(f.B.shape[0], rank)
        A[: f.rank] = f.A.float().cpu()
        B[:, : f.rank] = f.scaling * f.B.float().cpu()
        state[f"base_model.model.{mod}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{mod}.lora_B.weight"] = B.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_id,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(expert.modules),
        "fan_in_fan_out": expert.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / "adapter_model.safetensors", state, {"format": "pt"})
    atomic_write_json(folder / "adapter_config.json", config)
    return folder


def _finish_lora(merged: LoraExpert, base_id: str, rank: int, out: Path | None) -> Any:
    if out is not None:
        return _atomic_folder(out, lambda stage: save_peft_lora(merged, stage, base_id, rank))
    from peft import PeftModel

    model, tok = _load_model(base_id)
    with staging_dir(_tmp_root()) as stage:
        save_peft_lora(merged, stage / "adapter", base_id, rank)
        peft_model = PeftModel.from_pretrained(model, stage / "adapter").eval()
    peft_model.tokenizer = tok
    return peft_model


def _load_model(path: str) -> tuple[torch.nn.Module, Any]:
    """The causal LM at ``path`` (eval mode) and its tokenizer, or None if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with hf_bars():
            model = AutoModelForCausalLM.from_pretrained(path).eval()
    except OSError as exc:
        raise OSError(f"cannot load base model {path!r}: {exc}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok


def _tmp_root() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "moerge-merge"


def _atomic_folder(out: Path, write: Any) -> Path:
    """Write into a staging folder beside ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out.parent) as stage:
        write(stage)
        if out.exists():
            out.rmdir()
        stage.rename(out)
        stage.mkdir()
    return out


def _finish_model(model: torch.nn.Module, tok: Any, out: Path | None) -> Any:
    if out is None:
        model.tokenizer = tok
        return model

    def write(stage: Path) -> None:
        model.save_pretrained(stage)
        if tok is not None:
            tok.save_pretrained(stage)

    return _atomic_folder(out, write)


# ------------------------------------------------------- learned weights (LoRAHub, AdaMerging)


def empty_output(out: str | Path | None, what: str) -> Path | None:
    """``out`` as a path that may be written (missing or an empty folder), or None."""
    if out is None:
        return None
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{what} output {out} exists and is not an empty folder")
    return out


def load_lora_experts(experts: Any, registry: Registry | None, base: Any, device: torch.device, why: str,
                      ) -> tuple[list[str], list[LoraExpert], str]:  # fmt: skip
    """The LoRA experts named by ``experts`` (as :func:`merge` takes them), their names and their
    common base (a ``.gguf`` file: its converted folder); anything not a LoRA refused with ``why``."""
    reg, items = _records(experts, registry)
    resolved = [_kind_of(it, reg) for it in items]
    not_lora = [n for k, _, n in resolved if k != "lora"]
    if not_lora:
        raise ValueError(f"{why}; these are not LoRA experts: {not_lora}")
    names = [n for _, _, n in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"an expert is named twice: {names}")
    loras = [
        load_lora(it, name=n, registry=reg, device=device)
        if isinstance(it, ExpertRecord)
        else load_lora(it, name=n, device=device)
        for _, it, n in resolved
    ]
    return names, loras, local_base(_base_of(resolved, base))


def finish_learned(merged: LoraExpert, model: torch.nn.Module, tok: Any, base_id: str, output: Output, out: Path | None,
                   report: Any, report_file: str, attribute: str) -> Any:  # fmt: skip
    """A learned combination's result: ``merged`` (scaling folded) as a PEFT folder at ``out`` or a
    ``PeftModel`` (``output="lora"``), or folded into ``model`` (the base, loaded in the method's
    dtype) and written or returned (``"model"``). With ``out`` the report (``report.to_json()``)
    goes to ``out/report_file`` and the path is returned; without, it is ``result.<attribute>``."""
    rank = max(f.rank for f in merged.modules.values())
    built = path = None
    if output == "lora":
        if out is not None:
            path = _atomic_folder(out, lambda stage: save_peft_lora(merged, stage, base_id, rank))
        else:
            built = _finish_lora(merged, base_id, rank, None)
    else:
        with torch.no_grad():
            for mod, f in merged.modules.items():
                layer = model.get_submodule(mod)
                d = f.delta()
                d = d.T if merged.fan_in_fan_out else d
                layer.weight.add_(d.to(device=layer.weight.device, dtype=layer.weight.dtype))
        result = _finish_model(model, tok, out)
        path, built = (result, None) if out is not None else (None, result)
    if path is not None:
        atomic_write_json(Path(path) / report_file, report.to_json())
        return path
    setattr(built, attribute, report)
    return built


# ------------------------------------------------------------------------------ dense


class ShardWriter:
    """Collects output tensors and flushes a safetensors shard whenever ``shard_bytes`` is
    reached; ``close()`` names the shards as ``save_pretrained`` does and writes the index."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.size += nbytes
        self.total += nbytes
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        atomic_save_tensors(self.folder / f"shard-{len(self.shards):05d}.safetensors", self.pending, {"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "shard-00000.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.safetensors").rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        atomic_write_json(
            self.folder / "model.safetensors.index.json", {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        )


def _num_layers(folder: Path) -> int | None:
    """The model's layer count from its config (what a gradient is spread over), if it says."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(name), int):
            return cfg[name]
    return None


def _merge_dense(
    base_id: str,
    sources: list[DenseSource],
    method: str,
    params: dict[str, Any],
    weights: torch.Tensor | list[Any] | None,
    out: Path | None,
    report: MergeReport,
    progress: bool,
    shard_bytes: int,
    device: torch.device = torch.device("cpu"),
    out_dtype: torch.dtype | None = None,
    tokenizer_source: str | None = None,
) -> Any:
    from moerge.registry.importers import resolve_base

    info = resolve_base(base_id, required=True)
    assert info is not None and info.folder is not None
    base_w = TensorFolder(info.folder)
    kernel = get_merge(method)
    keys = base_w.keys()
    layers = _num_layers(info.folder)
    vocab = build_vocabulary(tokenizer_source, info.folder, [s.folder for s in sources]) if tokenizer_source else None
    vocab_keys = vocabulary_tensors(info.folder, keys) if vocab is not None else []
    if vocab is not None:
        report.params.update(tokenizer_source=tokenizer_source, vocab_size=vocab.size, vocabulary_tensors=vocab_keys)

    def write(stage: Path) -> None:
        writer = ShardWriter(stage, shard_bytes)
        for key in progress_bar(keys, desc=f"merge {method}", progress=progress):
            b = base_w.get(key)
            if not b.is_floating_point():
                writer.add(key, b)
                continue
            b_dev = b.to(device)
            if key in vocab_keys:  # every model's rows in the output's token order, then merged as any tensor
                laid = vocab.permute([b_dev, *(s.whole_tensor(key, b_dev) for s in sources)])  # type: ignore[union-attr]
                b_dev, taus = laid[0], [t - laid[0] for t in laid[1:]]
            else:
                taus = [s.task_tensor(key, b_dev) for s in sources]
            own = {"base": b_dev.float()} if kernel.needs_base else {}
            w = weights
            if isinstance(weights, list):  # some vary over the tensors
                w = torch.tensor([float(x) for x in resolve_settings(weights, key, layers)])
            merged = kernel(taus, w, **kernel_kwargs(method, params, key, layers), **own)
            writer.add(key, (b_dev.float() + merged).to(out_dtype or b.dtype).cpu())
            report.tensors += 1
            del taus, merged
        writer.close()
        for f in sorted(info.folder.iterdir()):
            if (
                f.is_file()
                and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth"))
                and f.name != "model.safetensors.index.json"
                and not (vocab is not None and f.name in TOKENIZER_FILES)
            ):
                shutil.copy2(f, stage / f.name)
        if vocab is not None:  # the output's tokenizer, and a config of its size
            vocab.tokenizer.save_pretrained(stage)
            cfg = json.loads((stage / "config.json").read_text())
            (cfg["text_config"] if "vocab_size" not in cfg and "text_config" in cfg else cfg)["vocab_size"] = vocab.size
            atomic_write_json(stage / "config.json", cfg)
        if out_dtype is not None and (stage / "config.json").exists():  # the config names the written dtype
            cfg = json.loads((stage / "config.json").read_text())
            name = str(out_dtype).removeprefix("torch.")
            cfg.update({k: name for k in ("dtype", "torch_dtype") if k in cfg} or {"dtype": name})
            atomic_write_json(stage / "config.json", cfg)

    if out is not None:
        return _atomic_folder(out, write)
    with staging_dir(_tmp_root()) as stage:
        write(stage)
        model, tok = _load_model(str(stage))
    model.tokenizer = tok
    return model
