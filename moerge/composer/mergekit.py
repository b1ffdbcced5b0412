"""mergekit's YAML merge configs, run by moerge's kernels: ``moerge.merge_from_config`` and
``moerge merge --config merge.yml``.

The subset we share with mergekit is accepted with mergekit's meaning, so a file written for
``mergekit-yaml`` gives the same tensors here (tested against mergekit on the same file)::

    merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
                                  # breadcrumbs_ties, della, della_linear, sce, slerp, nearswap,
                                  # model_stock, karcher, arcee_fusion, ram, ramplus_tl, nuslerp,
                                  # multislerp (the last two with base_model), passthrough over slices
    base_model: ./base            # a folder, a hub id in the local cache, or a registry name
    models:
      - model: ./ft-a
        parameters: {weight: 0.7, density: 0.5}
      - model: ./ft-b
        parameters: {weight: 0.3, density: 0.3}
    parameters: {normalize: true, lambda: 1.0}   # global; per-model values override them
    dtype: float32                # the written weights' dtype (out_dtype wins)

moerge additions: ``seed`` (DARE's and DELLA's masks are seeded here; mergekit draws them unseeded), and
models may be experts of a moerge registry (LoRA experts then merge in ΔW space into a LoRA).
Any parameter may vary over the tensors as mergekit writes it (dense experts): a gradient (a list
of numbers spread over the layers) or filters (``[{filter: self_attn, value: [0, 0.5, 1]},
{value: 0.5}]``: the first condition whose filter is in the tensor's name; one without a filter
matches every tensor), except the ones read once for the whole merge (``normalize``,
``rescale``, ``seed``). ``passthrough`` over ``slices`` stacks layer ranges of models
(:mod:`moerge.composer.passthrough`); ``slices`` with another method merge layer by layer
(:mod:`moerge.composer.slices`). ``modules`` of one module (mergekit's ``default``) is
the same config with the module's parameters in between. What mergekit has and moerge does not —
several modules, a token's embedding chosen by hand, other methods — is refused by name. ``model: MODEL+LORA`` folds
the PEFT LoRA into the model first, as mergekit does, and ``tokenizer_source`` (``base``,
``union`` or a model) merges models of different vocabularies as mergekit does
(:mod:`moerge.composer.vocab`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moerge.hints import did_you_mean

#: mergekit method → (moerge kernel, mergekit's defaults for normalize and rescale)
METHODS: dict[str, tuple[str, bool, bool]] = {
    "linear": ("average", True, False),
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_ties": ("dare_ties", False, True),
    "dare_linear": ("dare_linear", False, True),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
    "della": ("della", True, True),
    "della_linear": ("della_linear", False, True),
}
#: mergekit methods with parameters of their own → (moerge kernel, their global parameters, whether
#: each model takes a ``weight``, the fewest and most models besides base_model)
OWN_METHODS: dict[str, tuple[str, frozenset[str], bool, int, int | None]] = {
    "sce": ("sce", frozenset({"select_topk", "int8_mask"}), False, 1, None),
    "slerp": ("slerp", frozenset({"t"}), False, 1, 1),
    "nearswap": ("nearswap", frozenset({"t"}), False, 1, 1),
    "model_stock": ("model_stock", frozenset({"filter_wise"}), False, 2, None),
    "nuslerp": ("nuslerp", frozenset({"nuslerp_flatten", "nuslerp_row_wise"}), True, 2, 2),
    "multislerp": ("multislerp", frozenset({"normalize_weights", "eps"}), True, 1, None),
    "karcher": ("karcher", frozenset({"max_iter", "tol"}), False, 1, None),
    "arcee_fusion": ("arcee_fusion", frozenset(), False, 1, 1),
    "ram": ("ram", frozenset({"epsilon"}), False, 1, None),
    "ramplus_tl": ("ramplus_tl", frozenset({"r", "alpha", "epsilon"}), False, 1, None),
}
#: mergekit's parameter names that moerge's kernels spell otherwise
RENAMED = {"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
#: the sparsifiers' own per-model parameters, by method
SPARSIFIER_PARAMS = {"breadcrumbs": "gamma", "breadcrumbs_ties": "gamma", "della": "epsilon", "della_linear": "epsilon"}
TOP_KEYS = {
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
    "seed",
}  # fmt: skip
UNSUPPORTED_TOP = {"chat_template"}
GLOBAL_PARAMS = {"normalize", "lambda", "rescale", "int8_mask", "weight", "density", "seed", "gamma", "epsilon"}
MODEL_PARAMS = {"weight", "density", "gamma", "epsilon"}
DTYPES = {"float32", "float16", "bfloat16", "fp32", "fp16", "bf16"}


class MergeConfigError(ValueError):
    """A merge config that moerge cannot run as written; the message names the key."""


def load_merge_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A mergekit-style config from a YAML file, a YAML string or a mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    import yaml

    text = str(config)
    path = Path(text).expanduser()
    if isinstance(config, Path) or ("\n" not in text and (path.is_file() or path.suffix in (".yml", ".yaml", ".json"))):
        if not path.is_file():
            raise FileNotFoundError(f"merge config {path} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"merge config is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise MergeConfigError(f"merge config must be a mapping of keys, got {type(data).__name__}")
    return dict(data)


#: parameters read once for the whole merge (how weights are normalised, the seed): one value each
PLAN_TIME = {"normalize", "rescale", "int8_mask", "seed"}


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    raise MergeConfigError(
        f"{where}: {value!r} is a per-layer gradient or filter; this parameter takes one value (give a number)"
    )


def _setting(value: Any, where: str) -> Any:
    """A parameter as mergekit writes it: a number, a gradient (a list of numbers spread over the
    layers), or filters (``{filter: self_attn, value: ...}`` conditions, in order; one without a
    filter matches every tensor) — a :class:`~moerge.adapters.merge.Setting` for the last two."""
    from moerge.adapters.merge import Setting

    if isinstance(value, bool | int | float | str):
        return value

    def gradient_or_number(v: Any, at: str) -> Any:
        if isinstance(v, bool | int | float):
            return v
        if isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            return tuple(v)
        raise MergeConfigError(f"{at}: {v!r} is neither a number nor a gradient (a list of numbers)")

    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise MergeConfigError(f"{where}: {value!r} is neither a number, a gradient nor a list of filters")
    if all(not isinstance(v, Mapping) for v in value):
        return Setting(((None, gradient_or_number(value, where)),))
    conditions = []
    for j, cond in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise MergeConfigError(f"{at}: a condition is {{filter: NAME, value: V}} (filter optional), got {cond!r}")
        filt = cond.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise MergeConfigError(f"{at}.filter: a part of a tensor name, got {filt!r}")
        conditions.append((filt, gradient_or_number(cond["value"], f"{at}.value")))
    return Setting(tuple(conditions))


def _per_model(own: Any, glob: Any, default: float, where: str) -> Any:
    """A model's value of a per-model parameter: its own (where its filters match), else the
    global one, else mergekit's ``default`` — a number, or a Setting that tries them in order."""
    from moerge.adapters.merge import Setting

    mine = _setting(own, where) if own is not None else None
    if mine is not None and not isinstance(mine, Setting):
        return float(mine)
    fallback = glob if glob is not None else default
    if mine is None:
        return fallback if isinstance(fallback, Setting) else float(fallback)
    rest = fallback.conditions if isinstance(fallback, Setting) else ((None, float(fallback)),)
    last = fallback.default if isinstance(fallback, Setting) else None
    return Setting(mine.conditions + rest, default if last is None else last)


def _out_dtype(cfg: Mapping[str, Any]) -> str | None:
    """The written weights' dtype (``out_dtype`` wins over ``dtype``), checked."""
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise MergeConfigError(f"dtype {dtype!r}: moerge writes one of {sorted(DTYPES)}")
    return dtype


def _check_models(models: Any) -> None:
    if not isinstance(models, list) or not models:
        raise MergeConfigError("merge config needs 'models': a list of {model: ..., parameters: {...}}")


def _model_ref(entry: Any, where: str) -> str:
    ref = entry.get("model") if isinstance(entry, Mapping) else entry
    if not isinstance(ref, str) or not ref:
        raise MergeConfigError(f"{where}: 'model' must be a folder, hub id or registry name, got {ref!r}")
    if "+" in ref and not Path(ref).expanduser().exists():
        return str(fold_lora_ref(ref, where))
    return ref


def fold_lora_ref(ref: str, where: str = "model", cache: Path | None = None) -> Path:
    """mergekit's ``model: MODEL+LORA``: the model with the PEFT LoRA folded into its weights
    (``merge_and_unload``, in the checkpoint's dtype, as mergekit does), written once under
    ``<cache>/lora-folded/`` (``cache``: the moerge cache by default) keyed by the adapter's
    content and the model's files, and reused."""
    from moerge.registry.importers import resolve_source

    model, _, lora = ref.partition("+")

    def local(name: str, what: str) -> Path:
        path = Path(name).expanduser()
        if path.is_dir():
            return path
        try:  # a hub id in the local Hugging Face cache
            return Path(resolve_source(name, what)[0])
        except (FileNotFoundError, OSError, ValueError):
            raise MergeConfigError(
                f"{where}: {name!r} ({'before' if what == 'model' else 'after'} '+') must be a {what} folder or a hub id in "
                "the local cache"
            ) from None

    mpath, lpath = local(model, "model"), local(lora, "PEFT adapter")
    if not (lpath / "adapter_config.json").exists():
        raise MergeConfigError(f"{where}: {lora!r} (after '+') must be a PEFT adapter folder (with adapter_config.json)")
    from moerge.registry.files import config_hash, sha256_file, staging_dir
    from moerge.runtime import default_cache_dir, locked

    weights = sorted(f for f in mpath.iterdir() if f.suffix in (".safetensors", ".bin"))
    key = config_hash({
        "model": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weights],
        "adapter": {f.name: sha256_file(f) for f in sorted(lpath.iterdir()) if f.is_file()},
    })  # fmt: skip
    root = (cache or default_cache_dir()) / "lora-folded"
    out = root / f"{mpath.name}+{lpath.name}-{key[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{out.name}.lock"):
        if (out / "config.json").exists():
            return out
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(mpath, dtype="auto")
        merged = PeftModel.from_pretrained(base, lpath, is_trainable=False).merge_and_unload()
        with staging_dir(root) as stage:
            merged.save_pretrained(stage)
            try:
                AutoTokenizer.from_pretrained(mpath).save_pretrained(stage)
            except (OSError, ValueError, TypeError):
                pass  # a model folder without a tokenizer
            stage.rename(out)
            stage.mkdir()
    return out


def _same(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def plan_merge(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``config`` and translate it into :func:`moerge.merge` arguments (``base``,
    ``experts``, ``method``, ``weights``, ``dtype`` and kernel ``params``)."""
    cfg = dict(config)
    for key in cfg:
        if key in UNSUPPORTED_TOP:
            raise MergeConfigError(f"merge config key {key!r} (mergekit) is not supported by moerge")
        if key not in TOP_KEYS:
            raise MergeConfigError(f"unknown merge config key {key!r}{did_you_mean(key, sorted(TOP_KEYS))}")
    if "modules" in cfg:
        cfg = _unwrap_modules(cfg)
    method = cfg.get("merge_method")
    if method == "passthrough" or "slices" in cfg:
        return _plan_slices(cfg, method)
    known = sorted({*METHODS, *OWN_METHODS, "passthrough"})
    if method not in known:
        hint = did_you_mean(str(method), known) if method else ""
        raise MergeConfigError(f"merge_method {method!r}{hint}: moerge runs mergekit configs for {known}")
    tokenizer = _tokenizer_source(cfg)
    plan = _plan_own(cfg, method) if method in OWN_METHODS else _plan_models(cfg, method)
    if tokenizer is not None:
        plan["tokenizer_source"] = tokenizer
    return plan


def _filters(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, list) and bool(value) and all(isinstance(c, Mapping) for c in value))


def chain_parameters(high: Mapping[str, Any] | None, low: Mapping[str, Any] | None) -> dict[str, Any]:
    """Parameters of two levels as mergekit resolves them (a slice's over the module's over the
    global ones): the higher level's value of a name wins, except that where it is filters and
    none matches a tensor, the lower level's value applies — its conditions follow."""

    def conditions(value: Any) -> list[Any]:
        if isinstance(value, Mapping):
            return [value]
        return list(value) if _filters(value) else [{"value": value}]

    out = dict(low or {})
    for key, value in dict(high or {}).items():
        out[key] = conditions(value) + conditions(out[key]) if key in out and _filters(value) else value
    return out


#: the module a single-module model's weights are in, as mergekit names it
DEFAULT_MODULE = "default"


def _unwrap_modules(cfg: dict[str, Any]) -> dict[str, Any]:
    """mergekit's ``modules: {default: {models | slices, parameters}}`` as the same config written
    without it: moerge merges causal LMs, which have one module (mergekit's ``default``); the
    module's parameters sit between the global ones and a slice's or model's. Several modules (a
    multimodal model's towers) are refused by name."""
    modules = cfg["modules"]
    if not isinstance(modules, Mapping) or not modules:
        raise MergeConfigError(f"modules: a mapping of module name to {{models | slices, parameters}}, got {modules!r}")
    if cfg.get("models") is not None or cfg.get("slices") is not None:
        raise MergeConfigError("give one of models, slices or modules, not several (mergekit takes exactly one)")
    names = sorted(modules)
    if names != [DEFAULT_MODULE]:
        raise MergeConfigError(
            f"modules: {names}: moerge merges models of one module (a causal LM, mergekit's {DEFAULT_MODULE!r}); several "
            "modules (a multimodal model's towers) are not supported"
        )
    module = modules[DEFAULT_MODULE]
    where = f"modules.{DEFAULT_MODULE}"
    if not isinstance(module, Mapping) or set(module) - {"models", "slices", "parameters"}:
        raise MergeConfigError(f"{where}: a module is {{models | slices, parameters}}, got {module!r}")
    if (module.get("models") is None) == (module.get("slices") is None):
        raise MergeConfigError(f"{where}: give either models or slices")
    params = module.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise MergeConfigError(f"{where}.parameters: a mapping of parameter to value, got {params!r}")
    out = {k: v for k, v in cfg.items() if k != "modules"}
    out.update({k: module[k] for k in ("models", "slices") if module.get(k) is not None})
    merged = chain_parameters(params, cfg.get("parameters"))
    if merged:
        out["parameters"] = merged
    return out


def _plan_models(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    """The plan for a method of :data:`METHODS` (linear, task arithmetic, TIES, DARE …)."""
    kernel, normalize_default, rescale_default = METHODS[method]
    own_param = SPARSIFIER_PARAMS.get(method)
    allowed_global = {k for k in GLOBAL_PARAMS if k not in ("gamma", "epsilon") or k == own_param}
    allowed_model = {k for k in MODEL_PARAMS if k not in ("gamma", "epsilon") or k == own_param}
    glob = dict(cfg.get("parameters") or {})
    for key, value in glob.items():
        if key not in allowed_global:
            raise MergeConfigError(
                f"unknown parameter {key!r} in parameters for {method}{did_you_mean(key, sorted(allowed_global))}"
            )
        glob[key] = _scalar(value, f"parameters.{key}") if key in PLAN_TIME else _setting(value, f"parameters.{key}")
    models = cfg.get("models")
    _check_models(models)
    base = cfg.get("base_model")
    if base is not None:
        base = _model_ref(base, "base_model")
    elif method != "linear":
        raise MergeConfigError(f"merge_method {method!r} needs base_model (the task vectors are taken against it)")
    experts: list[str] = []
    weights: list[float] = []
    densities: list[float] = []
    owns: list[float] = []  # gamma or epsilon, per model
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        ref = _model_ref(entry, where)
        own = dict(entry.get("parameters") or {}) if isinstance(entry, Mapping) else {}
        extra = set(entry) - {"model", "parameters"} if isinstance(entry, Mapping) else set()
        if extra:
            raise MergeConfigError(f"{where}: unknown keys {sorted(extra)} (a model entry has 'model' and 'parameters')")
        for key in own:
            if key not in allowed_model:
                raise MergeConfigError(
                    f"{where}.parameters: unknown parameter {key!r} for {method}{did_you_mean(key, sorted(allowed_model))}"
                )
        if base is not None and _same(ref, base) and method != "linear":
            continue  # mergekit lists the base among the models; its task vector is zero
        experts.append(ref)
        weights.append(_per_model(own.get("weight"), glob.get("weight"), 1.0, f"{where}.parameters.weight"))
        densities.append(_per_model(own.get("density"), glob.get("density"), 1.0, f"{where}.parameters.density"))
        if own_param:
            default = 0.01 if own_param == "gamma" else 0.15  # mergekit's
            owns.append(_per_model(own.get(own_param), glob.get(own_param), default, f"{where}.parameters.{own_param}"))
    if not experts:
        raise MergeConfigError("merge config lists no model besides base_model")
    normalize = bool(glob.get("normalize", normalize_default))
    rescale = bool(glob.get("rescale", rescale_default))
    lam = glob.get("lambda", 1.0)
    lam = lam if not isinstance(lam, int | float) else float(lam)
    varying_weights = any(not isinstance(w, float) for w in weights)
    params: dict[str, Any] = {}
    if method == "linear":
        if not normalize and (varying_weights or abs(sum(weights) - 1.0) > 1e-6):
            raise MergeConfigError(
                "linear with normalize: false and weights that do not sum to 1 scales the whole model; moerge merges task "
                "vectors, so give weights summing to 1 or normalize: true"
            )
        if base is None:  # Σ w_i θ_i / Σ w_i is the first model plus the weighted mean of the others' differences
            base = experts[0]
        if lam != 1.0:
            raise MergeConfigError("linear takes no lambda in mergekit")
    else:
        if method in ("task_arithmetic", "dare_linear") and normalize:
            if varying_weights:
                raise MergeConfigError(f"{method} with normalize: true takes one weight per model, not a gradient or filters")
            total = sum(weights)
            weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
        if method in ("ties", "dare_ties", "dare_linear"):
            params["density"] = densities if len(set(densities)) > 1 else densities[0]
            params["flavor"] = "mergekit"
        elif own_param:
            params["density"] = densities if len(set(densities)) > 1 else densities[0]
            params[own_param] = owns if len(set(owns)) > 1 else owns[0]
            params["normalize"], params["rescale"] = normalize, rescale
        elif any(d != 1.0 for d in densities):
            raise MergeConfigError(f"{method} takes no density (mergekit ignores it; remove it or use ties/dare_*)")
        if method in ("ties", "dare_ties"):
            params["normalize"] = normalize
        if method.startswith("dare") and not rescale:
            raise MergeConfigError("rescale: false (DARE without rescaling) is not supported; moerge rescales to the L1 norm")
        if lam != 1.0:
            params["lambda"] = lam
        if method.startswith(("dare", "della")):
            params["seed"] = int(cfg.get("seed", glob.get("seed", 0)))
    dtype = _out_dtype(cfg)
    return {"base": base, "experts": experts, "method": kernel, "weights": weights, "dtype": dtype, "params": params}


def _vocab(ref: str) -> dict[str, int] | None:
    """The vocabulary of a model folder's tokenizer; None where there is no folder or no tokenizer
    (a registry expert, or a hub id: they are checked against the base when merged)."""
    from moerge.composer.vocab import has_tokenizer

    path = Path(ref).expanduser()
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError) as exc:
        raise MergeConfigError(f"tokenizer_source: cannot read the tokenizer of {ref}: {exc}") from None


def _tokenizer_source(cfg: Mapping[str, Any], sliced: bool = False) -> str | None:
    """The config's ``tokenizer_source`` (or ``tokenizer: {source}``): ``base``, ``union`` or a
    model (``PATH`` or ``model:PATH``), merged as mergekit does (:mod:`moerge.composer.vocab`).
    Over ``slices`` only models of one vocabulary are taken (checked here, by name)."""
    source = cfg.get("tokenizer_source")
    block = cfg.get("tokenizer")
    where = "tokenizer_source"
    if block is not None:  # mergekit's newer form: tokenizer: {source, tokens, pad_to_multiple_of}
        if source is not None:
            raise MergeConfigError("give tokenizer_source or a tokenizer block, not both")
        if not isinstance(block, Mapping):
            raise MergeConfigError(f"tokenizer: a mapping {{source: base | union | MODEL}}, got {block!r}")
        for key in block:
            if key != "source":
                raise MergeConfigError(
                    f"tokenizer.{key}: moerge takes tokenizer.source only (choosing token embeddings and padding the "
                    "vocabulary are not supported)"
                )
        source, where = block.get("source", "union"), "tokenizer.source"  # mergekit's default in the block
    if source is None:
        return None
    if not isinstance(source, str) or not source.strip():
        raise MergeConfigError(f"{where}: 'base', 'union' or a model (a folder, or model:PATH), got {source!r}")
    if source not in ("base", "union"):
        from moerge.composer.vocab import parse_source, source_folder

        try:
            source = str(source_folder(parse_source(source)))
        except ValueError as exc:
            raise MergeConfigError(str(exc).replace("tokenizer_source", where, 1)) from None
    if sliced and source != "base":
        refs = [cfg.get("base_model")]
        refs += [src.get("model") for sl in cfg.get("slices") or [] if isinstance(sl, Mapping)
                 for src in sl.get("sources") or [] if isinstance(src, Mapping)]  # fmt: skip
        if source != "union":
            refs.append(source)
        vocabs = {r: v for r in refs if isinstance(r, str) and (v := _vocab(r)) is not None}
        if len(vocabs) >= 2:
            first, want = next(iter(vocabs.items()))
            for ref, vocab in vocabs.items():
                if vocab != want:
                    extra = sorted(set(vocab) ^ set(want))[:3]
                    raise MergeConfigError(
                        f"{where}: slices over different vocabularies ({ref}: {len(vocab)} tokens, {first}: {len(want)}"
                        + (f"; e.g. {extra}" if extra else "; the same tokens under other ids")
                        + "): moerge merges vocabularies for a models list, not over slices"
                    )
    return source


def _plan_slices(cfg: dict[str, Any], method: Any) -> dict[str, Any]:
    """The plan for ``passthrough`` over ``slices`` (layer stacking; :mod:`moerge.composer.passthrough`)."""
    from moerge.composer.passthrough import Slice

    if method != "passthrough":
        return _plan_sliced_merge(cfg, method)
    if cfg.get("models") is not None or cfg.get("base_model") is not None:
        raise MergeConfigError("passthrough stacks 'slices' (each {sources: [{model, layer_range}]}); drop models/base_model")
    for key in ("parameters", "seed", "tokenizer_source"):
        if cfg.get(key) not in (None, {}, "base"):
            raise MergeConfigError(f"{key}: passthrough takes its parameters (scale) per slice source")
    slices = cfg.get("slices")
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError("passthrough needs 'slices': a list of {sources: [{model: ..., layer_range: [start, stop]}]}")
    out = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, Mapping) or set(sl) - {"sources", "parameters"}:
            raise MergeConfigError(f"{where}: a slice is {{sources: [{{model, layer_range}}]}}, got {sl!r}")
        sources = sl.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise MergeConfigError(f"{where}.sources: passthrough takes exactly one source per slice")
        src, at = sources[0], f"{where}.sources[0]"
        if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"}:
            raise MergeConfigError(f"{at}: a source is {{model, layer_range, parameters}}, got {src!r}")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
            raise MergeConfigError(f"{at}.layer_range: [start, stop] (whole numbers), got {lr!r}")
        params = chain_parameters(src.get("parameters"), sl.get("parameters"))
        bad = sorted(set(params) - {"scale"})
        if bad:
            raise MergeConfigError(f"{at}.parameters: passthrough takes only 'scale', got {bad}")
        scale = _setting(params["scale"], f"{at}.parameters.scale") if "scale" in params else None
        out.append(Slice(_model_ref(src, at), lr[0], lr[1], scale))
    dtype = _out_dtype(cfg)
    return {"base": None, "experts": [s.model for s in out], "method": "passthrough", "weights": None, "dtype": dtype,
            "params": {}, "slices": out}  # fmt: skip


def _plan_sliced_merge(cfg: dict[str, Any], method: Any) -> dict[str, Any]:
    """``slices`` with a merge method: slice s merges its sources' layer ranges (all of one
    length) layer by layer into the output's next layers, as mergekit does. Each slice is planned
    as a ``models`` config of its own (global ``parameters`` under the slice's, per-source
    ``parameters`` per model), so every method and parameter means what it means there; a
    gradient spreads over the slice's own layers; the embeddings are merged from the first slice's
    sources and the final norm and head from the last one's, at the gradient's first value
    (checked against mergekit). Executed by :func:`moerge.composer.slices.merge_slices`."""
    if cfg.get("models") is not None:
        raise MergeConfigError("slices: give the models as each slice's sources, not also as 'models'")
    slices = cfg.get("slices")
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError(f"{method} over slices needs a list of {{sources: [{{model, layer_range}}, ...]}}")
    _tokenizer_source(cfg, sliced=True)  # once, over every slice's sources
    glob = dict(cfg.get("parameters") or {})
    base = cfg.get("base_model")
    planned = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, Mapping) or set(sl) - {"sources", "parameters"}:
            raise MergeConfigError(
                f"{where}: a slice is {{sources: [{{model, layer_range, parameters}}], parameters}}, got {sl!r}"
            )
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise MergeConfigError(f"{where}.sources: a list of {{model, layer_range}}")
        ranges: dict[str, tuple[int, int]] = {}
        models = []
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"}:
                raise MergeConfigError(f"{at}: a source is {{model, layer_range, parameters}}, got {src!r}")
            ref = _model_ref(src, at)
            lr = src.get("layer_range")
            if not (isinstance(lr, list | tuple) and len(lr) == 2 and all(isinstance(x, int) for x in lr) and 0 <= lr[0] < lr[1]):
                raise MergeConfigError(f"{at}.layer_range: [start, stop] with 0 ≤ start < stop, got {lr!r}")
            if ref in ranges:
                raise MergeConfigError(f"{at}: {ref} is a source of this slice twice")
            ranges[ref] = (int(lr[0]), int(lr[1]))
            models.append({"model": ref, **({"parameters": dict(src["parameters"])} if src.get("parameters") else {})})
        lengths = {b - a for a, b in ranges.values()}
        if len(lengths) > 1:
            raise MergeConfigError(
                f"{where}.sources: layer ranges of different lengths {sorted(ranges.values())}; a slice merges layer by layer"
            )
        sub = {"merge_method": method, "models": models, "parameters": chain_parameters(sl.get("parameters"), glob)}
        for key in ("base_model", "dtype", "out_dtype", "seed"):  # (the tokenizer: checked once above)
            if cfg.get(key) is not None:
                sub[key] = cfg[key]
        try:
            plan = plan_merge(sub)
        except MergeConfigError as exc:
            raise MergeConfigError(f"{where}: {exc}") from None
        if plan["base"] not in ranges:
            raise MergeConfigError(f"{where}: base_model {base!r} is not among this slice's sources (its layers are the base)")
        planned.append({**plan, "ranges": ranges, "length": lengths.pop()})
    return {"method": "sliced", "base": planned[0]["base"], "kernel": planned[0]["method"], "slices": planned,
            "dtype": _out_dtype(cfg), "params": {}, "experts": sorted({r for p in planned for r in p["ranges"]})}  # fmt: skip


def _plan_own(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    """The plan for a method of :data:`OWN_METHODS` (SCE, SLERP, NearSwap, Model Stock …)."""
    kernel, allowed, weighted, fewest, most = OWN_METHODS[method]
    base = cfg.get("base_model")
    models = cfg.get("models")
    if base is None and method == "karcher" and isinstance(models, list) and models:
        base = models[0].get("model") if isinstance(models[0], Mapping) else models[0]  # every model is averaged alike
    if base is None:
        without = " (mergekit can run it on the whole weights without one; moerge merges task vectors)"
        raise MergeConfigError(f"merge_method {method!r} needs base_model" + (without if weighted else ""))
    base = _model_ref(base, "base_model")
    params: dict[str, Any] = {}
    for key, value in dict(cfg.get("parameters") or {}).items():
        if key not in allowed:
            raise MergeConfigError(f"unknown parameter {key!r} in parameters for {method}{did_you_mean(key, sorted(allowed))}")
        if key != "int8_mask":  # the mask's storage type only: no effect on the result
            params[RENAMED.get(key, key)] = _setting(value, f"parameters.{key}")
    if method in ("slerp", "nearswap") and "t" not in params:
        raise MergeConfigError(f"merge_method {method!r} needs parameters.t")
    models = cfg.get("models")
    _check_models(models)
    experts, weights = [], []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        ref = _model_ref(entry, where)
        own = {}
        if isinstance(entry, Mapping):
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise MergeConfigError(f"{where}: unknown keys {sorted(extra)} (a model entry has 'model' and 'parameters')")
            own = dict(entry.get("parameters") or {})
            bad = sorted(set(own) - ({"weight"} if weighted else set()))
            if bad:
                takes = "only 'weight' per model" if weighted else "no per-model parameters"
                raise MergeConfigError(
                    f"{where}.parameters: {method} takes {takes} (got {bad}); it takes {sorted(allowed)} under the top-level parameters"
                )
        if not _same(ref, base):
            experts.append(ref)
            if weighted:
                if "weight" not in own:
                    raise MergeConfigError(f"{where}.parameters.weight: {method} needs a weight per model")
                w = _setting(own["weight"], f"{where}.parameters.weight")
                weights.append(w if not isinstance(w, int | float) else float(w))
    if len(experts) < fewest or (most is not None and len(experts) > most):
        want = f"exactly {fewest}" if most == fewest else f"at least {fewest}"
        raise MergeConfigError(f"merge_method {method!r} needs {want} model(s) besides base_model, got {len(experts)}")
    dtype = _out_dtype(cfg)
    return {"base": base, "experts": experts, "method": kernel, "weights": weights or None, "dtype": dtype, "params": params}


def merge_from_config(
    config: str | Path | Mapping[str, Any], out: str | Path | None = None, *, registry: Any = None, **options: Any
) -> Any:
    """Run a mergekit-style merge config (a YAML file, YAML text or a mapping; see the module)
    with :func:`moerge.merge`. ``registry``: resolves model names that are not folders.
    ``options``: :func:`moerge.merge`'s own (``device``, ``progress``, ``rank`` …)."""
    from moerge.composer.merge import merge

    plan = plan_merge(load_merge_config(config))
    if plan["method"] == "passthrough":
        return run_passthrough(plan, out, progress=options.get("progress"))
    if plan["method"] == "sliced":
        from moerge.composer.slices import merge_slices

        return merge_slices(plan, out, progress=options.get("progress"))
    if plan.get("tokenizer_source") is not None:
        options = {**options, "tokenizer_source": plan["tokenizer_source"]}
    return merge(
        plan["base"],
        plan["experts"],
        plan["method"],
        out,
        registry=registry,
        weights=plan["weights"],
        dtype=plan["dtype"],
        **options,
        **plan["params"],
    )


def run_passthrough(plan: Mapping[str, Any], out: str | Path | None, progress: bool | None = None) -> Any:
    """Write a passthrough plan's stacked model to ``out`` (its path), or load it (without ``out``)."""
    from moerge.composer.merge import _load_model, _tmp_root
    from moerge.composer.passthrough import stack_layers
    from moerge.device import resolve_dtype
    from moerge.registry.files import staging_dir

    dtype = None if plan["dtype"] is None else resolve_dtype(plan["dtype"], "cpu")
    if out is not None:
        return stack_layers(plan["slices"], out, dtype=dtype, progress=progress)
    with staging_dir(_tmp_root()) as stage:
        stack_layers(plan["slices"], stage / "model", dtype=dtype, progress=progress)
        model, tok = _load_model(str(stage / "model"))
    model.tokenizer = tok
    return model
