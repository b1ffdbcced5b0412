"""``compose(base, experts, router=...)``: a base model, LoRA experts from the registry and a
router, ready to ``generate``, ``forward`` and ``explain``; its spec saves to JSON and loads back."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from moerge.adapters import attach, detach, load_lora, use_weights
from moerge.composer.explain import Explanation, dense_from_calls, token_kinds
from moerge.device import DeviceLike, DTypeLike, module_device, module_dtype, place, resolve_device, resolve_dtype
from moerge.progress import hf_bars
from moerge.registry import ExpertRecord, Registry, Selection
from moerge.registry.files import atomic_write_json
from moerge.registry.gguf import local_base
from moerge.registry.importers import absolute_path
from moerge.routers import PrepareContext, PrepareReport, Recorder, Router, Routing, get_router, make_router
from moerge.routers.base import ExpertData

SPEC_FORMAT = 1


class CompositionSpec(BaseModel):
    """Everything needed to rebuild a composition (callables such as a describer are not saved;
    pass them again to :meth:`ComposedModel.load`)."""

    model_config = ConfigDict(extra="forbid")

    format: int = SPEC_FORMAT
    base: str
    registry: str
    experts: list[str]
    router: str
    config: dict[str, Any]


def resolve_experts(experts: Any, registry: Registry | None) -> tuple[Registry, list[ExpertRecord]]:
    """``experts`` as a Registry (its LoRA experts), a Selection, or names/records with ``registry``."""
    if isinstance(experts, Registry):
        return experts, experts.select(kind="lora").records
    if isinstance(experts, Selection):
        return experts.registry, list(experts.records)
    if experts is None:
        if registry is None:
            raise ValueError("compose needs experts: a Registry, registry.select(...), or names with registry=")
        return registry, registry.select(kind="lora").records
    if isinstance(experts, str):
        experts = [experts]
    if registry is None:
        raise ValueError("experts given by name need registry= (or pass registry.select(names=[...]))")
    records = [registry._resolve(e) for e in experts]
    if not records:
        raise ValueError("compose needs at least one expert")
    return registry, records


def load_base(
    base: str, tokenizer: Any = None, device: DeviceLike = "auto", dtype: DTypeLike = "auto"
) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a folder, a ``.gguf`` file or a hub id (left padding, pad = EOS if unset),
    loaded in ``dtype`` onto ``device`` (``"auto"``: CUDA, else MPS, else CPU; bfloat16 on CUDA
    where supported, else float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    base = local_base(base)  # a .gguf file: its converted folder
    path = Path(base).expanduser()
    hint = "pass base= (Python) or --base (CLI) to load another"
    if not path.is_dir() and (path.is_absolute() or base.startswith((".", "~")) or path.exists()):
        raise FileNotFoundError(f"base model folder {absolute_path(path)} does not exist; {hint}")
    try:
        with hf_bars():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dt)
    except OSError as exc:
        raise OSError(
            f"cannot load base model {base!r}: no folder {absolute_path(path)}, and as a hub id: {exc}; {hint}"
        ) from None
    tok = tokenizer or AutoTokenizer.from_pretrained(base)
    # .to() casts too: transformers before 4.56 names the keyword torch_dtype and ignores dtype=
    return model.to(device=dev, dtype=dt).eval(), tok


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], device: torch.device | str = "cpu", **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Left-padded token ids and attention mask (pad = EOS if the tokenizer has no pad token)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {k: v.to(device) for k, v in tokenizer(list(prompts), return_tensors="pt", padding=True, **kwargs).items()}


def decode_text(tokenizer: Any, ids: Any, collapse_whitespace: bool = True) -> str:
    """Generated ids as text with whitespace normalised (the zoo's word-level tokenizer spaces
    words); ``collapse_whitespace=False``: as decoded (newlines kept, e.g. for stop strings)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return " ".join(text.split()) if collapse_whitespace else text


class ComposedModel:
    """A base model with experts attached and a router deciding their weights."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        router: Router,
        records: Sequence[ExpertRecord],
        registry: Registry,
        spec: CompositionSpec,
        prepared: Sequence[PrepareReport] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.router = router
        self.records = list(records)
        self.registry = registry
        self.spec = spec
        self.prepared = list(prepared)

    def __repr__(self) -> str:
        return f"ComposedModel(base={self.spec.base!r}, router={self.spec.router!r}, experts={self.experts})"

    @property
    def experts(self) -> list[str]:
        return [r.name for r in self.records]

    # ------------------------------------------------------------------------- routing

    def route(self, texts: str | Sequence[str], task: str | Sequence[str] | None = None) -> Routing:
        """The router's decision for these inputs (token routers: a hook plus any per-example bias)."""
        return self.router.route([texts] if isinstance(texts, str) else list(texts), task)

    @contextmanager
    def routed(self, routing: Routing) -> Iterator[None]:
        with use_weights(self.model, routing.layer_weights()):
            yield

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.tokenizer, prompts, next(self.model.parameters()).device)

    @torch.inference_mode()
    def forward(self, prompts: str | Sequence[str], task: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward on these texts (left-padded), routed."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.routed(self.route(prompts, task)):
            return self.model(**self._encode(prompts), **kwargs)

    __call__ = forward

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | Sequence[str],
        task: str | Sequence[str] | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 64,
        collapse_whitespace: bool = True,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Generated continuations (greedy unless ``generation_kwargs`` say otherwise), routed per
        the router: token routers decide at every prefill and decode step. Whitespace runs in
        the answers are collapsed to one space unless ``collapse_whitespace=False``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tasks = None if task is None or isinstance(task, str) else list(task)
        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            routing = self.route(chunk, task if tasks is None else tasks[i : i + batch_size])
            out += self._generate(chunk, routing, max_new_tokens, collapse_whitespace, **generation_kwargs)[0]
        return out

    #: decode with a static KV cache and torch.compile (see moerge.decoding)
    compile: bool = False

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.model)

    def _generate(
        self, prompts: Sequence[str], routing: Routing, max_new_tokens: int, collapse_whitespace: bool = True, **kw: Any
    ) -> tuple[list[str], Any]:
        from moerge import decoding

        tok = self.tokenizer
        kw.setdefault("do_sample", False)
        compiled = self.compile
        n = len(prompts)
        rows = decoding.pad_rows(prompts, compiled)
        enc = encode_prompts(tok, rows, self.device, **decoding.tokenizer_kwargs(compiled))
        weights = decoding.padded_weights(routing, len(rows))
        if compiled:
            kw.update(decoding.compile_kwargs(self.device))
        with use_weights(self.model, weights):
            gen = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw
            )
        enc = {k: v[:n] for k, v in enc.items()}
        new = gen[:n, enc["input_ids"].shape[1] :]
        texts = [decode_text(tok, row, collapse_whitespace) for row in new]
        return texts, (enc, new)

    @torch.inference_mode()
    def explain(self, prompt: str, task: str | None = None, max_new_tokens: int = 16, **generation_kwargs: Any) -> Explanation:
        """Generate for one prompt while recording, per module and token, which experts were
        chosen and with what weight."""
        routing = self.route([prompt], task)
        recorder = Recorder()
        if routing.granularity == "token":
            routing.hook.recorder = recorder  # type: ignore[union-attr]
        texts, (enc, new) = self._generate([prompt], routing, max_new_tokens, **generation_kwargs)
        # routed positions: the prompt (prefill), then each generated token fed back (all but the last)
        ids = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist() + new[0].tolist()[:-1]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        E = len(self.experts)
        if routing.granularity == "token":
            weights = dense_from_calls(recorder.calls, E)
            n = min(len(tokens), *(w.shape[0] for w in weights.values()))
            weights = {m: w[:n] for m, w in weights.items()}
            tokens = tokens[:n]
        else:
            row = routing.weights[0].float()
            weights = {m: row.expand(len(tokens), E).clone() for m in self._module_names()}
        info = {k: (v[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in routing.info.items()}
        n_prompt = int(enc["attention_mask"][0].sum())
        bos_id = self.tokenizer.bos_token_id
        bos = bos_id is not None and int(enc["input_ids"][0][-n_prompt]) == bos_id
        kinds = token_kinds(prompt, n_prompt, len(tokens), bos)
        return Explanation(prompt, texts[0], tokens, self.experts, routing.granularity, weights, info, kinds)

    def _module_names(self) -> list[str]:
        from moerge.adapters import layers

        return list(layers(self.model))

    @torch.inference_mode()
    def token_routing(self, prompts: Sequence[str], task: str | Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 expert per module and prompt token in one prefill → (top1 [modules, B, T], mask [B, T]).
        Sequence routers give their choice at every position."""
        routing = self.route(list(prompts), task)
        enc = self._encode(prompts)
        mask = enc["attention_mask"].bool().cpu()
        if routing.granularity != "token":
            top = routing.weights.argmax(1).cpu()
            return top[None, :, None].expand(1, *mask.shape), mask
        recorder = Recorder()
        routing.hook.recorder = recorder  # type: ignore[union-attr]
        with self.routed(routing):
            self.model(**enc)
        return torch.stack([idx[..., 0] for _, idx, _ in recorder.calls]).cpu(), mask

    # ---------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write the composition's spec (base, registry, expert versions, router, config) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.spec.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, path: str | Path | dict[str, Any] | CompositionSpec, **kwargs: Any) -> ComposedModel:
        """Rebuild a saved composition (a spec file, or the spec itself) (artifacts come from the registry, nothing is retrained
        unless missing; pass ``data=``/``describer=`` again if preparation may need them)."""
        try:
            if isinstance(path, CompositionSpec):
                spec = path
            elif isinstance(path, dict):
                spec = CompositionSpec.model_validate(path)
            else:
                spec = CompositionSpec.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read composition spec {path}: {exc}") from None
        reg = Registry(spec.registry)
        base = kwargs.pop("base", None) or spec.base  # base= overrides the saved one (a moved model)
        return compose(base, reg.select(names=spec.experts), spec.router, config=spec.config, **kwargs)


def compose(
    base: str | torch.nn.Module | None = None,
    experts: Any = None,
    router: str = "phatgoose",
    *,
    registry: Registry | None = None,
    tokenizer: Any = None,
    data: ExpertData | None = None,
    describer: Callable[[Any], str] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool | None = None,
    device: DeviceLike = "auto",
    dtype: DTypeLike = "auto",
    compile: bool = False,
    **router_config: Any,
) -> ComposedModel:
    """Compose ``base`` with LoRA ``experts`` under ``router`` (``"phatgoose"``, ``"glider"``,
    ``"arrow"``, ``"retrieval"``, ``"twin"``; router settings as keywords or ``config=``).
    ``"twin"`` folds its shared merge into the base weights: a model passed in is modified.

    ``experts``: a Registry (all its LoRA experts), ``registry.select(...)``, or names with
    ``registry=``. ``base``: a folder/hub id, a loaded model (then pass ``tokenizer=``), or None
    for the experts' registered base. Missing per-expert artifacts are computed and stored in the
    registry first (PHATGOOSE/GLIDER gate training needs ``data``: expert name → examples).

    ``device``/``dtype``: where the composition runs (``"auto"``: CUDA, else MPS, else CPU;
    bfloat16 on CUDA, float32 on CPU). A loaded ``base`` stays where it is unless they are given
    explicitly. Preparation (gate training, SVDs, router training) runs there too. ``compile``:
    decode with a static KV cache and ``torch.compile`` (CUDA graphs on a GPU; see
    :meth:`ComposedModel.generate`) — for long runs on a GPU; on a CPU it rarely pays back its compile time.

    ``progress``: ``None`` (default) draws bars for preparation on a terminal and writes a plain
    line every few seconds elsewhere (:mod:`moerge.progress`); ``True`` always bars, ``False`` never."""
    # the router is resolved once, here: its class, then its validated, typed config; everything
    # below takes the instance (a bad name or setting fails before any model loads)
    router_cls = get_router(router)
    _check_own_options(router_cls, router_config)
    rtr = make_router(router_cls, config, **router_config)
    if getattr(router_cls, "modality", "generation") == "embedding":  # router_retriever: an encoder
        from moerge.composer.encoder import compose_encoder

        reg, records = resolve_experts(experts, registry)
        dev = str(resolve_device(device))  # "auto": CUDA, else MPS, else CPU (the encoder runs in float32)
        if not isinstance(base, (str, type(None))):
            raise TypeError("router_retriever's base is a sentence-transformers folder or hub id (None: the bundled MiniLM)")
        return compose_encoder(base, records, reg, rtr.config, data=data, progress=progress, device=dev)
    reg, records = resolve_experts(experts, registry)
    not_lora = [f"{r.ref} ({r.kind})" for r in records if r.kind != "lora"]
    if not_lora:
        raise ValueError(f"compose routes among LoRA experts; these are not: {', '.join(not_lora)}")
    bases = {r.base_model for r in records}
    if base is None:
        if len(bases) != 1 or None in bases:
            raise ValueError(f"the experts do not name one common base ({sorted(map(str, bases))}); pass base=")
        base = next(iter(bases))
    prints = {r.base_fingerprint for r in records if r.base_fingerprint}
    if len(prints) > 1:
        raise ValueError(f"the experts were trained on different base models (fingerprints {sorted(prints)})")
    if isinstance(base, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a loaded base model needs tokenizer=")
        model, base_id = base, getattr(getattr(base, "config", None), "name_or_path", "") or "<in-memory model>"
        if device not in (None, "auto") or dtype not in (None, "auto"):
            place(
                model,
                module_device(model) if device in (None, "auto") else device,
                module_dtype(model) if dtype in (None, "auto") else dtype,
            )
    else:
        base = local_base(str(base))  # a .gguf file: its converted folder, which a saved composition names
        model, tokenizer = load_base(base, tokenizer, device=device, dtype=dtype)
        base_id = base
    dev = module_device(model)
    ctx = PrepareContext(registry=reg, model=model, tokenizer=tokenizer, data=data, describer=describer, progress=progress)
    reports = rtr.prepare(ctx, records)
    loras = rtr.install(model, records, [load_lora(r, registry=reg, device=dev) for r in records], ctx)
    attach(model, loras)
    try:
        rtr.load(records, loras, ctx)
    except Exception:
        detach(model)
        raise
    reports = [*reports, *rtr.load_reports]
    spec = CompositionSpec(
        base=base_id, registry=str(reg.root), experts=[r.ref for r in records], router=rtr.name, config=rtr.config.to_json()
    )
    composed = ComposedModel(model, tokenizer, rtr, records, reg, spec, reports)
    composed.compile = compile
    return composed


def _check_own_options(router_cls: type[Router], router_config: dict[str, Any]) -> None:
    """A keyword that is no setting of the router but close to one of compose()'s own options
    (``devices``, ``torch_dtype``…) is a misspelt option, not a router setting: say so."""
    import inspect

    from moerge.routers.base import did_you_mean

    own = [p for p in inspect.signature(compose).parameters if p not in ("router_config", "experts", "base", "router")]
    settings = router_cls.config_cls.model_fields
    for key in router_config:
        hint = "" if key in settings else did_you_mean(key.removeprefix("torch_"), own)
        if hint:
            match = hint.split("'")[1]
            raise TypeError(f"compose() got {key!r}, which is not a setting of router {router_cls.name!r}{hint}; pass {match}=")


def load_composition(path: str | Path, **kwargs: Any) -> ComposedModel:
    return ComposedModel.load(path, **kwargs)
