"""Turning a source (PEFT folder, live PeftModel, dense HF folder, sentence-transformers folder)
into staged registry files plus the facts a record needs. Everything here validates before the
registry commits anything; errors name the offending file, module or shape."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads where weights are read
    import torch

from moerge.registry import gguf
from moerge.registry.files import PICKLE_SUFFIXES, TensorFolder, atomic_save_tensors, canonical_json, load_pickle_weights
from moerge.registry.schema import LoraSpec

log = logging.getLogger(__name__)


class MoergeWarning(UserWarning):
    """Something the user should act on (shown once per place by Python's warnings filter)."""


class UnsafeSourceError(ValueError):
    """A source folder that would bring files from outside it into the registry."""


def finite(value: Any, what: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``what`` (NaN and ±inf are refused:
    JSON has no way to write them, and one would make the record unreadable)."""
    import math

    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return out


def whole(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` — a float only if it is whole (4.0, not 4.9)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value!r}")
    return int(value)


def check_symlinks(folder: Path, boundary: Path | None = None) -> None:
    """Refuse ``folder`` if a symlink in it (file or folder) leads outside ``boundary``
    (default the folder itself): importing would copy that outside file into the registry."""
    limit = (boundary or folder).resolve()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in [*dirnames, *filenames]:
            path = Path(dirpath) / entry
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not target.is_relative_to(limit):
                raise UnsafeSourceError(
                    f"{path} is a symlink to {target}, outside {limit}; moerge does not import files from outside the "
                    "source folder (copy what you mean into it)"
                )


def absolute_path(path: str | Path) -> str:
    """An absolute path without resolving symlinks (a registry moved with its symlinked cache
    keeps the path the user gave)."""
    return os.path.abspath(os.path.expanduser(str(path)))


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache"}
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class ShapeMismatchError(ValueError):
    """A LoRA's factors do not fit the base model it declares."""


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of a model config, ignoring fields that do not change the architecture or weights' meaning."""
    import hashlib

    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_attn_implementation")}
    return hashlib.sha256(canonical_json(clean).encode()).hexdigest()[:16]


@dataclass
class BaseInfo:
    """What the registry knows of a base model: its id, config fingerprint and weight shapes."""

    id: str
    fingerprint: str | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    folder: Path | None = None
    state: dict[str, torch.Tensor] | None = None  # for a live model given as base

    def tensor(self, key: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[key]
        if self.folder is None:
            raise FileNotFoundError(f"base model {self.id!r} has no local weights")
        return TensorFolder(self.folder).get(key)

    def tensors(self, allow_pickle: bool = False) -> TensorFolder | dict[str, torch.Tensor]:
        if self.state is not None:
            return self.state
        if self.folder is None:
            raise FileNotFoundError(f"base model {self.id!r} has no local weights")
        return TensorFolder(self.folder, allow_pickle=allow_pickle)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(source: str | Path, what: str = "expert source") -> tuple[Path, str]:
    """A local folder for ``source``: the folder itself, or the snapshot of a hub id
    (``org/name``, optionally ``org/name@revision``) through ``huggingface_hub``'s cache —
    downloaded if missing, unless ``HF_HUB_OFFLINE=1`` (then the cache alone). Returns the
    folder and a description for the record (the absolute path, or ``hf://org/name@commit``)."""
    text = str(source)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder, str(folder.resolve())
    if not HUB_ID.match(text) or folder.is_absolute() or text.startswith((".", "~")):
        raise FileNotFoundError(f"{what} {text!r} is not a folder (tried {absolute_path(folder)}) nor a hub id (org/name)")
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        snap = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=offline))
    except LocalEntryNotFoundError:
        where = (
            "the local Hugging Face cache (HF_HUB_OFFLINE=1)"
            if offline
            else "the Hugging Face cache, and it could not be downloaded"
        )
        raise FileNotFoundError(
            f"{what} {text!r} is not a folder (tried {absolute_path(folder)}) and not in {where}; "
            f"download it first (huggingface-cli download {repo_id}) or give a local folder"
        ) from None
    except (RepositoryNotFoundError, HfHubHTTPError) as exc:
        raise FileNotFoundError(f"{what} {text!r}: the hub has no such repository or refused it ({exc})") from None
    return snap, f"hf://{repo_id}@{snap.name}"


def _local_hub_snapshot(model_id: str) -> Path | None:
    """The local snapshot folder of a hub id, if it is in the HF cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, offline, or not a valid id: all mean "not available"
        return None


def resolve_base(base: Any, *, allow_pickle: bool = False, required: bool = False) -> BaseInfo | None:
    """Resolve ``base`` (a local folder, a ``.gguf`` file — see :mod:`moerge.registry.gguf` —, a
    hub id in the local HF cache, or a live ``PreTrainedModel``)."""
    if base is None:
        return None
    if hasattr(base, "config") and hasattr(base, "state_dict"):
        cfg = base.config.to_dict()
        # a PEFT-injected model keeps base weights under ".base_layer": read them as the plain model's
        state = {
            k.replace(".base_layer.", "."): v.detach()
            for k, v in base.state_dict().items()
            if ".lora_" not in k and "modules_to_save" not in k
        }
        return BaseInfo(
            id=str(getattr(base.config, "_name_or_path", "") or type(base).__name__),
            fingerprint=config_fingerprint(cfg),
            shapes={k: tuple(v.shape) for k, v in state.items()},
            state=state,
        )
    base_id = str(base)
    if gguf.is_gguf(base_id):  # a GGUF file: its converted folder (converted once, cached by content hash)
        base_id = str(gguf.converted_folder(base_id))
    folder = Path(base_id).expanduser()
    if folder.is_dir():
        # stored absolute: a relative path means the folder as seen from here, and nowhere else
        base_id = absolute_path(folder)
    else:
        folder = _local_hub_snapshot(base_id)
    if folder is None or not (folder / "config.json").exists():
        if required:
            raise FileNotFoundError(
                f"base model {base_id!r} is neither a local model folder (tried {absolute_path(Path(base_id).expanduser())}) "
                "nor in the local Hugging Face cache"
            )
        warnings.warn(
            f"base model {base_id!r} is not available locally (no folder {absolute_path(Path(base_id).expanduser())}, "
            "not in the Hugging Face cache): its shapes are not checked against the expert; pass base= a local "
            "folder or a cached hub id to check them",
            MoergeWarning,
            stacklevel=3,
        )
        return BaseInfo(id=base_id, fingerprint=None)
    cfg = json.loads((folder / "config.json").read_text())
    weights = TensorFolder(folder, allow_pickle=allow_pickle)
    return BaseInfo(id=base_id, fingerprint=config_fingerprint(cfg), shapes=weights.shapes(), folder=folder)


def detect_kind(folder: Path) -> str:
    """``lora`` for a PEFT folder, ``embedding`` for sentence-transformers, ``dense`` for an HF model."""
    if (folder / "adapter_config.json").exists():
        return "lora"
    if (folder / "modules.json").exists() or (folder / "config_sentence_transformers.json").exists():
        return "embedding"
    if (folder / "config.json").exists():
        return "dense"
    raise ValueError(
        f"{folder} is not a PEFT adapter folder (adapter_config.json), a sentence-transformers folder "
        "(modules.json) or a Hugging Face model folder (config.json)"
    )


# --------------------------------------------------------------------------- LoRA


def _lora_state(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(st)
    for suffix in PICKLE_SUFFIXES:
        p = folder / f"adapter_model{suffix}"
        if p.exists():
            return load_pickle_weights(p, allow_pickle)
    raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module whose name ends with it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def stage_lora(folder: Path, stage: Path, base: BaseInfo | None, allow_pickle: bool) -> tuple[LoraSpec, str | None]:
    """Validate a PEFT LoRA folder and copy it (as safetensors) into ``stage``."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{folder}/adapter_config.json has peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("use_dora"):
        raise ValueError(f"{folder} is a DoRA adapter (use_dora=true), which moerge does not support yet")
    where = f"{folder}/adapter_config.json"
    r = whole(cfg.get("r", 8), f"{where}: r")
    alpha = finite(cfg.get("lora_alpha", 8), f"{where}: lora_alpha")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{where}: target_modules must be a module name or a list of them, got {targets!r}")
    declared = cfg.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        raise ValueError(f"{where}: base_model_name_or_path must be a string, got {declared!r}")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise ValueError(f"{where}: rank_pattern and alpha_pattern must be mappings")
    rank_pattern = {str(k): whole(v, f"{where}: rank_pattern[{k!r}]") for k, v in rank_pattern.items()}
    alpha_pattern = {str(k): finite(v, f"{where}: alpha_pattern[{k!r}]") for k, v in alpha_pattern.items()}
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(flag, False), bool):
            raise ValueError(f"{where}: {flag} must be true or false, got {cfg.get(flag)!r}")
    state = _lora_state(folder, allow_pickle)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = LORA_KEY.match(key)
        if not m:
            raise ValueError(
                f"{folder}: weight {key!r} is not a LoRA factor of a linear layer (lora_A/lora_B); "
                "embedding LoRA, biases and modules_to_save are not supported"
            )
        module = m["module"].removeprefix(PEFT_PREFIX)
        modules.setdefault(module, {})[m["which"]] = tensor
    if not modules:
        raise ValueError(f"{folder}: the adapter has no LoRA weights")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"{folder}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "which do not compose (expected A [r, d_in], B [d_out, r])"
            )
        rank = int(pattern_value(rank_pattern, module, r))
        if a.shape[0] != rank:
            raise ShapeMismatchError(
                f"{folder}: module {module!r} has rank {a.shape[0]} but the config says {rank} (r / rank_pattern)"
            )
        if base is not None and base.shapes:
            wkey = f"{module}.weight"
            if wkey not in base.shapes:
                raise ShapeMismatchError(f"{folder}: LoRA module {module!r} has no weight {wkey!r} in base model {base.id!r}")
            expected = (b.shape[0], a.shape[1])
            got = base.shapes[wkey]
            if fan_in_fan_out:
                got = got[::-1]
            if tuple(got) != expected:
                raise ShapeMismatchError(
                    f"{folder}: LoRA module {module!r} does not fit base model {base.id!r}: lora_B {tuple(b.shape)} × "
                    f"lora_A {tuple(a.shape)} gives ΔW {expected}, but the base weight {wkey!r} has shape {tuple(base.shapes[wkey])}"
                )
    spec = LoraSpec(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(targets) if isinstance(targets, list) else [targets],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=fan_in_fan_out,
        modules=sorted(modules),
    )
    atomic_save_tensors(stage / "adapter_model.safetensors", {k: v.contiguous() for k, v in state.items()}, {"format": "pt"})
    (stage / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return spec, declared


def save_live_peft(model: Any, adapter_name: str | None, dest: Path) -> Path:
    """Save one named adapter of a live ``PeftModel`` as an ordinary PEFT folder."""
    names = list(getattr(model, "peft_config", {}))
    if not names:
        raise TypeError(f"{type(model).__name__} is not a PeftModel (no peft_config)")
    name = adapter_name or (names[0] if len(names) == 1 else None)
    if name is None:
        raise ValueError(f"the PeftModel holds adapters {names}; pass adapter_name= to pick one")
    if name not in names:
        raise ValueError(f"adapter {name!r} is not in the PeftModel (it has {names})")
    model.save_pretrained(str(dest), selected_adapters=[name], safe_serialization=True)
    return dest if name == "default" else dest / name


# --------------------------------------------------------------------------- dense / embedding


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir() or p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)


def stage_dense(folder: Path, stage: Path, base: BaseInfo | None, allow_pickle: bool) -> str:
    """Stage a dense fine-tune: the task vector τ = θ_ft − θ_base when a base is known, else whole."""
    ft = TensorFolder(folder, allow_pickle=allow_pickle)
    _copy_non_weight_files(folder, stage)
    if base is None:
        atomic_save_tensors(stage / "model.safetensors", dict(ft.items()), {"format": "pt"})
        return "whole"
    if not base.shapes:
        raise FileNotFoundError(f"base model {base.id!r} has no local weights; a task vector needs them")
    base_keys = set(base.shapes)
    ft_keys = set(ft.keys())
    missing = sorted(ft_keys - base_keys)
    if missing:
        raise ShapeMismatchError(f"{folder}: weights {missing[:5]} are not in base model {base.id!r}")
    import torch

    tau: dict[str, torch.Tensor] = {}
    base_weights = base.tensors(allow_pickle)
    for key in sorted(ft_keys):
        t = ft.get(key)
        if tuple(t.shape) != tuple(base.shapes[key]):
            raise ShapeMismatchError(
                f"{folder}: weight {key!r} has shape {tuple(t.shape)} but base model {base.id!r} has {tuple(base.shapes[key])}"
            )
        b = base_weights.get(key) if isinstance(base_weights, TensorFolder) else base_weights[key]
        if not t.is_floating_point():
            if not torch.equal(t, b):
                raise ValueError(f"{folder}: non-float tensor {key!r} differs from the base; cannot store as a task vector")
            continue
        tau[key] = (t.to(torch.float32) - b.to(torch.float32)).to(t.dtype)
    atomic_save_tensors(stage / "task_vector.safetensors", tau, {"format": "pt"})
    return "task_vector"


#: files any one of which makes a folder's tokenizer loadable by ``AutoTokenizer``
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def check_model_folder(folder: Path) -> dict[str, Any]:
    """A whole-model expert (kind ``model``): a Hugging Face causal-LM folder with its tokenizer.
    Returns what the record keeps of it (architectures, model type, whether it has a chat template);
    refuses, naming what is missing, a folder without ``config.json``, a model that is not a
    causal LM, or one without a tokenizer."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json); a 'model' expert is a whole causal LM")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ValueError(
            f"{folder}: architectures {archs} are not a causal language model (…ForCausalLM); a 'model' expert generates text"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): a 'model' expert answers in its own "
            "vocabulary — save it beside the weights with tokenizer.save_pretrained(folder)"
        )
    tok_cfg = folder / "tokenizer_config.json"
    chat = any((folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json")) or (
        tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    )
    return {"architectures": list(archs), "model_type": cfg.get("model_type"), "chat_template": chat}


def stage_folder(folder: Path, stage: Path, allow_pickle: bool) -> None:
    """Copy a whole model folder (e.g. sentence-transformers), converting any pickle weights."""
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix in PICKLE_SUFFIXES:
            state = load_pickle_weights(p, allow_pickle)
            atomic_save_tensors(
                dst.with_suffix(".safetensors").with_name(p.stem.replace("pytorch_model", "model") + ".safetensors"),
                state,
                {"format": "pt"},
            )
        else:
            shutil.copy2(p, dst)
