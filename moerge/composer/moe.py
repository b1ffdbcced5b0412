"""``moerge moe build CONFIG --out DIR`` / :func:`build_moe`: a sparse Mixtral (or Qwen2-MoE) model built from dense
experts, reading mergekit-moe's config (mergekit 0.1.5, ``mergekit/moe``), with its meaning:

* every non-MLP weight (embeddings, attention, norms, head) comes from ``base_model``; layer l's
  expert e is ``experts[e].source_model``'s MLP at layer l (``noise_scale`` adds Gaussian noise,
  ``residual_scale`` scales ``down_proj``), written in transformers' fused Mixtral layout;
* the router of layer l is one row per expert (``gate_mode``): ``hidden`` / ``hidden_last`` — the
  base model's hidden state entering layer l at the last token of each of the expert's
  ``positive_prompts`` (BOS prepended, left-padded), averaged over the prompts, minus the same for
  its ``negative_prompts``, L2-normalised; ``hidden_avg`` — the same averaged over the (padded)
  sequence; ``cheap_embed`` — the normalised sum of the prompts' token embeddings, one row for
  every layer; ``random`` / ``uniform_random`` — N(0, 1) or U(±1/√d) (seeded here; mergekit draws
  them unseeded). mergekit computes hidden states in bfloat16; so does moerge by default
  (``hidden_dtype``), which makes the router tensors equal to mergekit-moe's;
* ``experts_per_token`` (2) is the Mixtral top-k; ``dtype`` the output's (default the base's).

Past mergekit-moe: a source may be a registry expert (``registry=``): a LoRA is folded into the
base's MLP weights (θ₀ + ΔW), a dense task vector added to them, a whole model read as it is; and
an expert without prompts takes its registered examples (``positive_prompts`` from the registry's
``examples``) — ``hidden`` routing with no hand-written prompt.

Refused by name before any tensor is read: fewer experts than ``experts_per_token``, an expert
without prompts in a prompt-based mode, prompts identical across experts (mergekit: "will not
produce a functioning MoE"), shared experts for a Mixtral or more than one for a Qwen2-MoE,
models of different architectures or shapes, an unknown key.

With one ``shared_experts`` entry (or ``architecture: qwen``) the output is mergekit-moe's
Qwen2-MoE instead: the experts under ``mlp.experts.i``, the shared expert's MLP under
``mlp.shared_expert`` with ``shared_expert_gate`` its router row, zero attention biases where the
base has none (tensor for tensor equal to mergekit-moe's, checked). From Qwen3 models it is
mergekit-moe's Qwen3-MoE: the Mixtral layout under Qwen3's attention (q/k norms), no shared expert
(checked too). mergekit-moe's DeepSeek output is not built: its config points at remote code on
the Hub (``auto_map``), which transformers does not load offline, so a config that only DeepSeek
fits (a shared expert without prompts) is refused by name."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moerge.composer.merge import _atomic_folder, _dense_source, empty_output
from moerge.device import resolve_dtype
from moerge.progress import hf_bars, progress_bar
from moerge.registry import Registry
from moerge.registry.files import TensorFolder, atomic_write_json
from moerge.registry.importers import MoergeWarning, resolve_source

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
REPORT_FILE = "moerge_moe.json"
MLP = ("gate_proj", "up_proj", "down_proj")


class MoEExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """mergekit-moe's config (``MoEMergeConfig``)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[MoEExpert] | None = None
    architecture: str | None = None


class MoEConfigError(ValueError):
    """A mergekit-moe config moerge cannot build, with the field that is wrong."""


def load_moe_config(source: str | Path | dict[str, Any]) -> MoEConfig:
    """Parse a mergekit-moe YAML file (or its mapping); every error names the field."""
    if isinstance(source, dict):
        raw = source
    else:
        import yaml

        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MoE config {path} does not exist")
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise MoEConfigError(f"{path}: a mergekit-moe config is a mapping (base_model, experts, gate_mode …)")
    try:
        return MoEConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise MoEConfigError(f"MoE config field {where}: {first['msg']}") from None


def check_moe_config(cfg: MoEConfig, model_type: str | None = None) -> None:
    """mergekit-moe's refusals (``is_bad_config``) and moerge's own, each naming its field
    (``model_type``: the base's, where it is known; it decides Qwen3-MoE)."""
    if cfg.experts_per_token < 1:
        raise MoEConfigError(f"experts_per_token must be ≥ 1, got {cfg.experts_per_token}")
    if len(cfg.experts) < cfg.experts_per_token:
        raise MoEConfigError(
            f"experts: {len(cfg.experts)} expert(s) for experts_per_token {cfg.experts_per_token}; give at least as many"
        )
    arch = output_architecture(cfg, model_type)
    if arch == "qwen2_moe":
        if len(cfg.shared_experts or []) != 1:
            raise MoEConfigError(
                f"shared_experts: a Qwen2-MoE output takes exactly one shared expert, got {len(cfg.shared_experts or [])}"
            )
        if cfg.gate_mode not in ("random", "uniform_random") and not cfg.shared_experts[0].positive_prompts:
            raise MoEConfigError(
                "shared_experts[0].positive_prompts: its gate (shared_expert_gate) is set from prompts like the experts' "
                "(mergekit-moe makes a DeepSeek MoE of an ungated shared expert; moerge does not: that output needs the "
                "Hub's remote code to load)"
            )
    for name in ("noise_scale", "residual_scale"):
        bad = [i for i, e in enumerate(cfg.experts) if getattr(e, name) is not None and not math.isfinite(getattr(e, name))]
        if bad:
            raise MoEConfigError(f"experts[{bad[0]}].{name} must be a finite number")


def output_architecture(cfg: MoEConfig, model_type: str | None = None) -> str:
    """``mixtral``, ``qwen2_moe`` or ``qwen3_moe``, as mergekit-moe picks it: ``architecture`` by
    name prefix, else Qwen3-MoE for Qwen3 models (no shared expert), Mixtral without shared
    experts and Qwen2-MoE with one. ``model_type``: the base's, once read (None: not yet)."""
    qwen3 = model_type == "qwen3"
    if cfg.architecture is not None:
        name = cfg.architecture.lower()
        known = [("mixtral", "mixtral"), ("qwen2_moe", "qwen moe"), ("qwen3_moe", "qwen3 moe")]
        if qwen3:  # "qwen" names both; mergekit-moe's Qwen2-MoE takes no Qwen3 model
            known = [known[2], known[0], known[1]]
        for arch, full in known:
            if full.startswith(name):
                if arch in ("mixtral", "qwen3_moe") and cfg.shared_experts:
                    raise MoEConfigError(
                        f"shared_experts: the {arch} output has no shared expert (architecture: qwen, Qwen2-MoE, has one)"
                    )
                return arch
        raise MoEConfigError(
            f"architecture {cfg.architecture!r}: moerge builds mixtral, qwen (Qwen2-MoE) or, from Qwen3 models, qwen3 (Qwen3-MoE)"
        )
    if qwen3:
        if cfg.shared_experts:
            raise MoEConfigError(
                "shared_experts: Qwen3 models make a Qwen3-MoE, which has no shared expert (mergekit-moe's Qwen2-MoE, "
                "which has one, takes Qwen2, Llama or Mistral models)"
            )
        return "qwen3_moe"
    return "qwen2_moe" if cfg.shared_experts else "mixtral"


def _prompts(cfg: MoEConfig, registry: Registry | None) -> list[tuple[list[str], list[str]]]:
    out = []
    for i, e in enumerate(cfg.experts):
        pos = list(e.positive_prompts or [])
        if not pos and (rec := _record(e.source_model, registry)) is not None:
            pos = list(rec.examples)  # the registered examples as its prompts
        if cfg.gate_mode not in ("random", "uniform_random") and not pos:
            raise MoEConfigError(
                f"experts[{i}].positive_prompts: gate_mode {cfg.gate_mode!r} routes by prompts and expert "
                f"{e.source_model!r} has none (give some, or register it with examples)"
            )
        out.append((pos, list(e.negative_prompts or [])))
    for e in cfg.shared_experts or []:
        out.append((list(e.positive_prompts or []), list(e.negative_prompts or [])))
    experts_only = out[: len(cfg.experts)]
    if (
        cfg.gate_mode not in ("random", "uniform_random")
        and len(experts_only) > 1
        and all(p == experts_only[0] for p in experts_only[1:])
    ):
        raise MoEConfigError(
            "experts[*].positive_prompts: the prompts are identical for every expert, so every router row is the same and "
            "the MoE cannot route (mergekit refuses this too): give each expert prompts of its own"
        )
    return out


def _record(source: str, registry: Registry | None) -> Any:
    """The registry expert ``source`` names (a folder of that name wins), or None."""
    if registry is None or Path(source).expanduser().is_dir() or source.partition("@")[0] not in registry:
        return None
    return registry._resolve(source)


def _folder(source: str, registry: Registry | None, what: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    rec = _record(source, registry)
    if rec is not None:
        return registry.path(rec)  # type: ignore[union-attr]
    resolved, _ = resolve_source(source, what)
    return Path(resolved)


def _check_configs(base_cfg: Any, configs: dict[str, Any], arch: str = "mixtral") -> None:
    allowed = {"mixtral": ("llama", "mistral"), "qwen3_moe": ("qwen3",)}.get(arch, ("llama", "mistral", "qwen2"))
    if base_cfg.model_type not in allowed:
        raise MoEConfigError(f"base_model: a {arch} MoE is built from {' or '.join(allowed)} models, not {base_cfg.model_type!r}")
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    for name, c in configs.items():
        diff = [k for k in keys if getattr(c, k, None) != getattr(base_cfg, k, None)]
        if diff:
            raise MoEConfigError(
                f"expert {name!r}: its {diff[0]} is {getattr(c, diff[0], None)!r}, the base's {getattr(base_cfg, diff[0], None)!r}"
                " (every expert must have the base's architecture and shapes)"
            )


class _Expert:
    """One expert's MLP weights: a model folder, or (registry) the base plus a LoRA's ΔW or a task vector."""

    def __init__(self, source: str, base: TensorFolder, registry: Registry | None, device: torch.device) -> None:
        self.name, self.base = source, base
        self.folder: TensorFolder | None = None
        self.delta: dict[str, torch.Tensor] | None = None
        self.source: Any = None
        rec = _record(source, registry)
        if rec is None:
            self.folder = TensorFolder(_folder(source, registry, "expert"))
        elif rec.kind == "lora":
            from moerge.adapters import load_lora

            lora = load_lora(rec, registry=registry, device=device)
            self.delta = {f"{m}.weight": f.delta().T if lora.fan_in_fan_out else f.delta() for m, f in lora.modules.items()}
            dropped = sorted(m for m in lora.modules if ".mlp." not in m)
            if dropped:
                warnings.warn(
                    f"expert {source!r}: its LoRA also adapts {len(dropped)} non-MLP module(s) (e.g. {dropped[0]}); a Mixtral "
                    "expert is an MLP, and attention comes from the base (as in mergekit-moe), so those are left out",
                    MoergeWarning,
                    stacklevel=3,
                )
        else:
            self.source = _dense_source(rec, registry, rec.ref)

    def get(self, key: str) -> torch.Tensor:
        if self.folder is not None:
            if key not in self.folder:
                raise MoEConfigError(f"expert {self.name!r} has no weight {key!r}")
            return self.folder.get(key)
        base = self.base.get(key)
        if self.delta is not None:
            d = self.delta.get(key)
            return base if d is None else (base.float() + d.float().cpu()).to(base.dtype)
        return (base.float() + self.source.task_tensor(key, base).cpu()).to(base.dtype)


def _tokenize(tok: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """mergekit-moe's tokenisation: BOS text prepended, no special tokens, left padding with pad = BOS."""
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def gate_vectors(
    base_folder: str | Path,
    prompts: list[tuple[list[str], list[str]]],
    mode: GateMode = "hidden",
    hidden_dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """The routers' rows, [layers, experts, hidden], as mergekit-moe's ``get_gate_params``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(base_folder)
    n, d, E = cfg.num_hidden_layers, cfg.hidden_size, len(prompts)
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((n, E, d), generator=g)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / d)
        return torch.rand((n, E, d), generator=g) * 2 * scale - scale
    tok = AutoTokenizer.from_pretrained(base_folder)
    if mode == "cheap_embed":
        embed = TensorFolder(base_folder).get("model.embed_tokens.weight").float()

        def rows(enc: dict[str, torch.Tensor]) -> torch.Tensor:
            h = torch.nn.functional.one_hot(enc["input_ids"], num_classes=cfg.vocab_size).float() @ embed
            s = (h * enc["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (s / s.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(n, 1)

    else:
        with hf_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=resolve_dtype(hidden_dtype, torch.device("cpu")))
        model.eval()

        def rows(enc: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                hs = torch.stack(model(**enc, output_hidden_states=True, return_dict=True).hidden_states[:-1])
            hs = hs.sum(dim=2) / hs.shape[2] if mode == "hidden_avg" else hs[:, :, -1, :]
            return hs.sum(dim=1) / hs.shape[1]

    out = []
    for pos, neg in progress_bar(prompts, desc="expert prompts", progress=progress):
        h = rows(_tokenize(tok, pos))
        if neg:
            h -= rows(_tokenize(tok, neg))
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        out.append(h)
    return torch.stack(out, dim=0).permute(1, 0, 2)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``: mergekit's warning)."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


def build_moe(
    config: str | Path | dict[str, Any] | MoEConfig,
    out: str | Path,
    *,
    registry: Registry | None = None,
    hidden_dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    progress: bool | None = None,
) -> Path:
    """Build the Mixtral model of a mergekit-moe ``config`` (a YAML path, its mapping or a
    :class:`MoEConfig`) into ``out`` (written atomically, with the base's tokenizer) and return the
    path; ``out/moerge_moe.json`` records the experts, the gate mode and the layers whose routers
    are degenerate. ``registry``: experts (and the base) may be registry names."""
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config)
    base_folder = _folder(cfg.base_model, registry, "base model")
    base_cfg = AutoConfig.from_pretrained(base_folder)  # its architecture decides the output's
    check_moe_config(cfg, base_cfg.model_type)
    out = empty_output(out, "MoE")
    prompts = _prompts(cfg, registry)
    arch = output_architecture(cfg, base_cfg.model_type)
    expert_cfgs = {}
    for e in [*cfg.experts, *(cfg.shared_experts or [])]:
        src = e.source_model
        rec = _record(src, registry)
        if rec is not None and rec.kind == "lora":
            continue  # a LoRA on the base: the base's shapes
        folder = _folder(src, registry, "expert")
        if (folder / "config.json").exists():
            expert_cfgs[src] = AutoConfig.from_pretrained(folder)
    _check_configs(base_cfg, expert_cfgs, arch)
    base = TensorFolder(base_folder)
    experts = [_Expert(e.source_model, base, registry, torch.device("cpu")) for e in cfg.experts]
    shared = [_Expert(e.source_model, base, registry, torch.device("cpu")) for e in cfg.shared_experts or []]
    out_dtype = resolve_dtype(cfg.dtype, torch.device("cpu")) if cfg.dtype else _config_dtype(base_cfg)
    gates = gate_vectors(base_folder, prompts, cfg.gate_mode, hidden_dtype, seed, progress)

    g = torch.Generator().manual_seed(seed)

    def mlp(ex: _Expert, spec: MoEExpert, layer: int, proj: str) -> torch.Tensor:
        t = ex.get(f"model.layers.{layer}.mlp.{proj}.weight")
        if spec.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * spec.noise_scale
        if proj == "down_proj" and spec.residual_scale is not None:
            t = t * spec.residual_scale
        return t.to(out_dtype)

    if arch == "mixtral":
        moe_cfg, state = _mixtral(base_cfg, base, cfg, experts, mlp, gates, out_dtype, progress)
    elif arch == "qwen3_moe":
        moe_cfg, state = _qwen3_moe(base_cfg, base, cfg, experts, mlp, gates, out_dtype, progress)
    else:
        moe_cfg, state = _qwen2_moe(base_cfg, base, cfg, experts, shared, mlp, gates, out_dtype, progress)
    degenerate = degenerate_layers(gates)

    def write(stage: Path) -> None:
        from safetensors.torch import save_file

        moe_cfg.save_pretrained(stage)
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(base_folder).save_pretrained(stage)
        atomic_write_json(
            stage / REPORT_FILE,
            {
                "base_model": cfg.base_model,
                "experts": [e.source_model for e in cfg.experts],
                "shared_experts": [e.source_model for e in cfg.shared_experts or []],
                "architecture": arch,
                "gate_mode": cfg.gate_mode,
                "experts_per_token": cfg.experts_per_token,
                "dtype": str(out_dtype).removeprefix("torch."),
                "hidden_dtype": str(hidden_dtype).removeprefix("torch."),
                "degenerate_layers": degenerate,
                "prompts": [{"positive": len(p), "negative": len(n)} for p, n in prompts],
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )

    return _atomic_folder(out, write)


def _mixtral(base_cfg: Any, base: TensorFolder, cfg: MoEConfig, experts: list, mlp: Any, gates: torch.Tensor, out_dtype: torch.dtype,
             progress: bool | None) -> tuple[Any, dict[str, torch.Tensor]]:  # fmt: skip
    """mergekit-moe's Mixtral (``mergekit/moe/mixtral.py``), in transformers' fused expert layout."""
    from transformers import MixtralConfig

    moe_cfg = MixtralConfig(**{k: v for k, v in base_cfg.to_dict().items() if k not in ("architectures", "model_type")})
    moe_cfg.architectures = ["MixtralForCausalLM"]
    moe_cfg.num_local_experts = len(cfg.experts)
    moe_cfg.num_experts_per_tok = cfg.experts_per_token
    moe_cfg.sliding_window = None
    moe_cfg.dtype = out_dtype
    state = {k: base.get(k).to(out_dtype) for k in base.keys() if ".mlp." not in k}
    _fused_experts(state, base_cfg, cfg, experts, mlp, gates, out_dtype, progress)
    return moe_cfg, state


def _fused_experts(state: dict[str, torch.Tensor], base_cfg: Any, cfg: MoEConfig, experts: list, mlp: Any, gates: torch.Tensor,
                   out_dtype: torch.dtype, progress: bool | None) -> None:  # fmt: skip
    """Each layer's experts in transformers' fused layout (``experts.gate_up_proj`` [E, 2·I, H]:
    gate then up; ``experts.down_proj`` [E, H, I]) and its router (``gate.weight``)."""
    for layer in progress_bar(range(base_cfg.num_hidden_layers), desc="expert weights", progress=progress):
        prefix = f"model.layers.{layer}.mlp"
        gate_up = [torch.cat([mlp(ex, spec, layer, "gate_proj"), mlp(ex, spec, layer, "up_proj")]) for ex, spec in
                   zip(experts, cfg.experts, strict=True)]  # fmt: skip
        down = [mlp(ex, spec, layer, "down_proj") for ex, spec in zip(experts, cfg.experts, strict=True)]
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(gate_up).contiguous()
        state[f"{prefix}.experts.down_proj"] = torch.stack(down).contiguous()
        state[f"{prefix}.gate.weight"] = gates[layer].to(out_dtype).contiguous()


def _qwen_config(config_cls: Any, architecture: str, base_cfg: Any, cfg: MoEConfig, out_dtype: torch.dtype) -> Any:
    """A Qwen MoE config as mergekit-moe writes it: the base's, every layer sparse with
    ``experts_per_token`` of the experts, top-k probabilities renormalised, the experts'
    intermediate size the base's."""
    moe_cfg = config_cls(**base_cfg.to_dict())
    moe_cfg.architectures = [architecture]
    moe_cfg.num_experts = len(cfg.experts)
    moe_cfg.num_experts_per_tok = cfg.experts_per_token
    moe_cfg.decoder_sparse_step = 1
    moe_cfg.norm_topk_prob = True
    moe_cfg.moe_intermediate_size = moe_cfg.intermediate_size
    moe_cfg.dtype = out_dtype
    return moe_cfg


def _qwen3_moe(base_cfg: Any, base: TensorFolder, cfg: MoEConfig, experts: list, mlp: Any, gates: torch.Tensor,
               out_dtype: torch.dtype, progress: bool | None) -> tuple[Any, dict[str, torch.Tensor]]:  # fmt: skip
    """mergekit-moe's Qwen3-MoE (``mergekit/moe/qwen3.py``), from Qwen3 models: the base's
    attention (its q/k norms too), embeddings and norms; every layer sparse, the experts' MLPs
    fused as in Mixtral, the top-k probabilities renormalised; no shared expert."""
    from transformers import Qwen3MoeConfig

    moe_cfg = _qwen_config(Qwen3MoeConfig, "Qwen3MoeForCausalLM", base_cfg, cfg, out_dtype)
    state = {k: base.get(k).to(out_dtype) for k in base.keys() if ".mlp." not in k}
    _fused_experts(state, base_cfg, cfg, experts, mlp, gates, out_dtype, progress)
    return moe_cfg, state


def _qwen2_moe(base_cfg: Any, base: TensorFolder, cfg: MoEConfig, experts: list, shared: list, mlp: Any, gates: torch.Tensor,
               out_dtype: torch.dtype, progress: bool | None) -> tuple[Any, dict[str, torch.Tensor]]:  # fmt: skip
    """mergekit-moe's Qwen2-MoE (``mergekit/moe/qwen.py``): every expert's MLP under
    ``mlp.experts.i``, the shared expert's under ``mlp.shared_expert`` with its gate
    (``shared_expert_gate``, the shared expert's router row), attention biases zero where the base
    has none; both intermediate sizes the base's."""
    from transformers import Qwen2MoeConfig

    moe_cfg = _qwen_config(Qwen2MoeConfig, "Qwen2MoeForCausalLM", base_cfg, cfg, out_dtype)
    moe_cfg.sliding_window = None
    moe_cfg.use_sliding_window = False
    moe_cfg.shared_expert_intermediate_size = moe_cfg.intermediate_size
    state = {k: base.get(k).to(out_dtype) for k in base.keys() if ".mlp." not in k}
    head_dim = moe_cfg.hidden_size // moe_cfg.num_attention_heads
    E = len(cfg.experts)
    for layer in progress_bar(range(base_cfg.num_hidden_layers), desc="expert weights", progress=progress):
        prefix = f"model.layers.{layer}"
        for proj, heads in (("q_proj", moe_cfg.num_attention_heads), ("k_proj", moe_cfg.num_key_value_heads),
                            ("v_proj", moe_cfg.num_key_value_heads)):  # fmt: skip
            state.setdefault(f"{prefix}.self_attn.{proj}.bias", torch.zeros(heads * head_dim, dtype=out_dtype))
        for proj in MLP:
            for i, (ex, spec) in enumerate(zip(experts, cfg.experts, strict=True)):
                state[f"{prefix}.mlp.experts.{i}.{proj}.weight"] = mlp(ex, spec, layer, proj)
            state[f"{prefix}.mlp.shared_expert.{proj}.weight"] = mlp(shared[0], cfg.shared_experts[0], layer, proj)
        state[f"{prefix}.mlp.gate.weight"] = gates[layer, :E].to(out_dtype).contiguous()
        state[f"{prefix}.mlp.shared_expert_gate.weight"] = gates[layer, E:].to(out_dtype).contiguous()
    return moe_cfg, state


def _config_dtype(cfg: Any) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return getattr(torch, str(d)) if d else torch.float32


def describe(path: str | Path) -> dict[str, Any]:
    """The build record a folder carries (``moerge_moe.json``)."""
    return json.loads((Path(path) / REPORT_FILE).read_text())
