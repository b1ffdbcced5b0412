"""Build (or load from cache) the embedded default: tokenizer, a tiny Llama base pre-trained on
generic tasks, one PEFT LoRA expert and one dense fine-tune per held-in task, all registered in
a registry with descriptions, skills and example prompts. Seeded and cached on disk."""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load in the functions that use them: `moerge zoo build --path` on a
    # built zoo (the docs' "$(moerge zoo build --path)") needs neither (measured: 2.5 -> 0.3 CPU-s per call)
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from moerge.device import DeviceLike, DTypeLike

from moerge.progress import hf_bars, progress_bar
from moerge.registry import Registry, config_fingerprint
from moerge.registry.files import atomic_write_json
from moerge.registry.importers import absolute_path
from moerge.runtime import default_cache_dir, locked, seeded
from moerge.zoo import tasks as T

log = logging.getLogger(__name__)

#: bump when the zoo's data or training changes, so old caches are not reused
ZOO_FORMAT = 1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


#: the routers whose per-expert artifacts a zoo build can prepare (each with its default settings):
#: PHATGOOSE's gates (GLIDER's too, with the same training settings), Arrow's prototypes,
#: retrieval's example bank
PREPARED_ROUTERS = ("phatgoose", "arrow", "retrieval")


@dataclass(frozen=True)
class Preset:
    """Everything that determines a zoo build (its hash names the cache folder)."""

    name: str
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seed: int = 0
    base_steps: int = 700
    base_batch: int = 128
    base_lr: float = 3e-3
    n_train: int = 2000
    n_val: int = 64
    n_test: int = 100
    lora_r: int = 16
    lora_alpha: int = 32
    lora_lr: float = 6e-3
    lora_max_steps: int = 500
    dense_lr: float = 1e-3
    dense_max_steps: int = 300
    batch: int = 64
    eval_every: int = 50
    min_steps: int = 100
    #: stop training an expert once its validation exact match reaches this
    target_val: float = 0.98
    #: two-segment prompts (the task's segment beside a generic one the base does,
    #: ``tasks.with_foreign``) added to each expert's training set, as a share of its examples;
    #: the base pre-trains on that share of two-segment generic prompts too, and the tokenizer
    #: gets ``|``. What the segment compositions (``tasks.COMPOSED``) need; 0 in the presets
    #: (measured: README, "Compositions across segments in the main zoo")
    segment_share: float = 0.0
    #: the routers whose per-expert artifacts the build prepares and stores (:func:`prepare_routers`),
    #: so that composing them later computes nothing; () prepares none
    prepared: tuple[str, ...] = PREPARED_ROUTERS

    def __post_init__(self) -> None:
        if not 0.0 <= self.segment_share <= 1.0:
            raise ValueError(
                f"Preset.segment_share must be in [0, 1] (a share of each expert's examples), got {self.segment_share}"
            )
        unknown = sorted(set(self.prepared) - set(PREPARED_ROUTERS))
        if unknown:
            raise ValueError(
                f"Preset.prepared: {unknown} cannot be prepared by a zoo build; choose from {list(PREPARED_ROUTERS)}"
            )

    def key(self) -> str:
        fields = asdict(self)
        if not fields["segment_share"]:  # zoos built before the option keep their key
            del fields["segment_share"]
        if tuple(fields["prepared"]) == PREPARED_ROUTERS:  # likewise: the default set keeps the key
            del fields["prepared"]
        else:
            fields["prepared"] = list(fields["prepared"])
        return config_fingerprint({**fields, "format": ZOO_FORMAT})


PRESETS: dict[str, Preset] = {
    "small": Preset("small"),
    # same architecture (a wider model trained no better per CPU-second here), more data, a
    # stricter stopping target and a larger test split for the demo's figures
    "default": Preset(
        "default",
        base_steps=1000,
        n_train=4000,
        n_val=100,
        n_test=300,
        lora_max_steps=600,
        dense_max_steps=400,
        target_val=0.99,
    ),
}


@dataclass
class Zoo:
    """A built zoo on disk: paths, the tokenizer, the base model and the registry of its experts."""

    root: Path
    preset: Preset
    meta: dict[str, Any]

    @property
    def base_path(self) -> Path:
        return self.root / "base"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry"

    @property
    def registry(self) -> Registry:
        return Registry(self.registry_path)

    def lora_path(self, task: str) -> Path:
        return self.root / "lora" / task

    def dense_path(self, task: str) -> Path:
        return self.root / "dense" / task

    @property
    def held_in(self) -> list[str]:
        return [t.name for t in T.HELD_IN]

    @property
    def held_out(self) -> list[str]:
        return [t.name for t in T.HELD_OUT]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base_path)
        tok.padding_side = "left"
        return tok

    def load_base(self, device: DeviceLike = "cpu", dtype: DTypeLike = "float32") -> LlamaForCausalLM:
        from moerge.device import resolve_device, resolve_dtype

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        with hf_bars():
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(self.base_path, dtype=dt).to(device=dev, dtype=dt)
        model.eval()
        return model

    def test_split(self, task: str) -> list[T.Example]:
        return T.split(task, 0, self.preset.n_test, seed=self.preset.seed)[1]

    def val_split(self, task: str) -> list[T.Example]:
        """The validation split (expert early stopping; hyper-parameter choice in the demo)."""
        return _validation(task, self.preset)

    def train_split(self, task: str) -> list[T.Example | T.Segmented]:
        """What the task's experts were trained on: its single-segment training split, then the
        two-segment prompts built from it (:func:`training_examples`)."""
        return training_examples(task, self.preset)

    def expert_data(self, expert: str) -> list[tuple[str, str]]:
        """(prompt, target) pairs an expert was trained on (``sort`` and ``sort-dense`` share them),
        two-segment ones included: what post-hoc routers such as PHATGOOSE train on."""
        return [(e.prompt, e.target) for e in self.train_split(expert.removesuffix("-dense"))]


def _resolve(preset: str | Preset, cache_dir: str | Path | None, device: DeviceLike) -> tuple[Preset, Path, Path]:
    """The preset, the zoo's folder and its lock file."""
    if isinstance(device, str) and device == "cpu":  # the default: finding a built zoo needs no torch
        dev_type = "cpu"
    else:
        from moerge.device import resolve_device

        dev_type = resolve_device(device).type
    if isinstance(preset, str) and preset not in PRESETS:
        raise KeyError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = seeded(PRESETS[preset]) if isinstance(preset, str) else preset  # $MOERGE_ZOO_SEED: another build
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    suffix = "" if dev_type == "cpu" else f"-{dev_type}"
    return p, cache / "zoo" / f"{p.name}-{p.key()}{suffix}", cache / "zoo" / f".{p.name}-{p.key()}{suffix}.lock"


def is_built(preset: str | Preset = "small", cache_dir: str | Path | None = None, device: DeviceLike = "cpu") -> bool:
    """Whether :func:`load` would find this zoo complete in the cache (no build, no torch import)."""
    return (_resolve(preset, cache_dir, device)[1] / "meta.json").exists()


def load(
    preset: str | Preset = "small",
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    rebuild: bool = False,
    device: DeviceLike = "cpu",
) -> Zoo:
    """The zoo for ``preset``, built on first use and cached under ``cache_dir`` (see
    :func:`default_cache_dir`). Safe to call from several processes at once.

    ``device``: where it is trained when built. The CPU (the default) gives the reference zoo
    every figure in the README comes from; a zoo built elsewhere is cached apart (its weights
    differ in the last bits, so its tables may differ slightly)."""
    p, root, lock = _resolve(preset, cache_dir, device)
    with locked(lock):
        if rebuild and root.exists():
            shutil.rmtree(root)
        if not (root / "meta.json").exists():
            from moerge.device import resolve_device

            _build(p, root, progress, resolve_device(device))
    return Zoo(root=root, preset=p, meta=json.loads((root / "meta.json").read_text()))


def _validation(task: str, p: Preset) -> list[T.Example]:
    return T.sample(task, p.n_val, seed=10_000 + p.seed)


def _segmented(task: str, singles: list[T.Example], share: float, seed: str) -> list[T.Segmented]:
    rng = random.Random(f"{task}:segments:{seed}")
    return [T.with_foreign(rng, own) for own in singles[: round(share * len(singles))]]


def training_examples(task: str, p: Preset) -> list[T.Example | T.Segmented]:
    """A held-in task's training set: the single-segment split (no test prompt in it) and, for a
    ``segment_share`` of its examples, the same example beside a generic segment."""
    singles = T.split(task, p.n_train, p.n_test, seed=p.seed)[0]
    return [*singles, *_segmented(task, singles, p.segment_share, f"train:{p.seed}")]


def _stopping_set(task: str, p: Preset) -> list[T.Example | T.Segmented]:
    """Early stopping's validation set: the validation split, and two-segment prompts built from it."""
    val = _validation(task, p)
    return [*val, *_segmented(task, val, p.segment_share, f"val:{p.seed}")]


def _train_until(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    task: str,
    p: Preset,
    *,
    lr: float,
    max_steps: int,
    seed: int,
    progress: bool,
) -> dict[str, float]:
    """Train in rounds of ``eval_every`` steps until validation exact match reaches the target."""
    from moerge.zoo.train import generate_answers

    train = training_examples(task, p)
    val = _stopping_set(task, p)
    steps, acc = 0, 0.0
    # one optimizer/schedule over max_steps, driven round by round
    rounds = max_steps // p.eval_every
    state: dict[str, Any] = {}
    for rnd in range(rounds):
        _train_round(
            model,
            tok,
            train,
            p,
            lr=lr,
            max_steps=max_steps,
            seed=seed,
            state=state,
            steps=p.eval_every,
            progress=progress,
            desc=task,
        )
        steps += p.eval_every
        if steps < p.min_steps and rnd < rounds - 1:
            continue
        acc = T.exact_match(generate_answers(model, tok, [e.prompt for e in val]), val)
        if acc >= p.target_val:
            break
    return {"steps": steps, "val_accuracy": acc}


def _train_round(model, tok, train, p: Preset, *, lr, max_steps, seed, state, steps, progress, desc) -> None:  # noqa: ANN001
    import torch

    from moerge.device import module_device
    from moerge.training import PairEncoder, warmup_cosine
    from moerge.zoo.train import encode_for_training

    if not state:
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10, max_steps))
        state.update(opt=opt, sched=sched, params=params, rng=random.Random(seed), encoder=PairEncoder(tok, prompt_loss=False))
        torch.manual_seed(seed)
    model.train()
    for _ in progress_bar(range(steps), desc=desc, leave=False, progress=progress):
        batch = encode_for_training(tok, state["rng"].sample(train, p.batch), prompt_loss=False, encoder=state["encoder"])
        loss = model(**{k: v.to(module_device(model)) for k, v in batch.items()}).loss
        state["opt"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state["params"], 1.0)
        state["opt"].step()
        state["sched"].step()
    model.eval()


def _build(p: Preset, root: Path, progress: bool, device: torch.device | None = None) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    from moerge.zoo.tokenizer import build_tokenizer
    from moerge.zoo.train import make_base_model, train_loop

    device = device if device is not None else torch.device("cpu")
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    tmp = root.with_name(root.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok = build_tokenizer(segments=p.segment_share > 0)
    timings: dict[str, float] = {}

    # 1. base: generic pre-training (copy / first / last; also two per prompt with
    # segment_share) so it knows the prompt format
    base = make_base_model(tok, p.hidden, p.layers, p.heads, seed=p.seed).to(device)
    pretrain = [e for task in T.PRETRAIN for e in T.sample(task, p.n_train, seed=p.seed)]
    if p.segment_share:
        pretrain += T.pretrain_segmented(round(p.segment_share * len(pretrain)), seed=p.seed)
    train_loop(
        base,
        tok,
        pretrain,
        steps=p.base_steps,
        batch_size=p.base_batch,
        lr=p.base_lr,
        seed=p.seed,
        weight_decay=0.01,
        desc="base",
        progress=progress,
    )
    base.eval()
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    timings["base_s"] = time.perf_counter() - t0

    # 2. one PEFT LoRA expert and one dense fine-tune per held-in task
    lora_cfg = LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
    )
    training: dict[str, dict[str, Any]] = {}
    bar = progress_bar(T.HELD_IN, desc="experts", progress=progress)
    for i, task in enumerate(bar):
        bar.set_postfix(task=task.name)
        t1 = time.perf_counter()
        peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(lora_cfg))
        lora_stats = _train_until(
            peft_model, tok, task.name, p, lr=p.lora_lr, max_steps=p.lora_max_steps, seed=p.seed * 1000 + i, progress=progress
        )
        peft_model.save_pretrained(tmp / "lora" / task.name)
        _fix_base_path(tmp / "lora" / task.name, root / "base")
        t2 = time.perf_counter()
        dense = copy.deepcopy(base)
        dense_stats = _train_until(
            dense, tok, task.name, p, lr=p.dense_lr, max_steps=p.dense_max_steps, seed=p.seed * 1000 + 500 + i, progress=progress
        )
        dense.save_pretrained(tmp / "dense" / task.name)
        tok.save_pretrained(tmp / "dense" / task.name)
        training[task.name] = {
            "lora": {**lora_stats, "seconds": t2 - t1},
            "dense": {**dense_stats, "seconds": time.perf_counter() - t2},
        }
    timings["experts_s"] = time.perf_counter() - t0 - timings["base_s"]

    # 3. register everything (the registry records point at the final zoo path)
    reg = Registry(tmp / "registry")
    for task in T.HELD_IN:
        examples = [e.prompt for e in T.split(task, 8, 0, seed=p.seed)[0]]
        common = dict(
            description=task.description, skills=list(task.skills), examples=examples, tags=["zoo", p.name, "held-in", task.name]
        )
        reg.register(
            tmp / "lora" / task.name,
            task.name,
            base=tmp / "base",
            metrics={"val_exact_match": training[task.name]["lora"]["val_accuracy"]},
            **common,
        )
        reg.register(
            tmp / "dense" / task.name,
            f"{task.name}-dense",
            base=tmp / "base",
            kind="dense",
            metrics={"val_exact_match": training[task.name]["dense"]["val_accuracy"]},
            **common,
        )
    _rewrite_base_ids(reg, absolute_path(tmp / "base"), absolute_path(root / "base"))
    meta = {
        "preset": asdict(p),
        "format": ZOO_FORMAT,
        "timings": timings,
        "training": training,
        "held_in": [t.name for t in T.HELD_IN],
        "held_out": [t.name for t in T.HELD_OUT],
        "torch": torch.__version__,
    }
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    # 4. the routers' per-expert artifacts, stored in the registry beside the experts: every
    # composition, server or copy of this registry finds them (meta.json last: a zoo is complete)
    timings["routers"] = prepare_routers(Zoo(root=root, preset=p, meta=meta), p.prepared, progress=progress, device=device)
    timings["total_s"] = time.perf_counter() - t0
    atomic_write_json(root / "meta.json", meta)
    log.info("built zoo %s in %.1fs", root, timings["total_s"])


def prepare_routers(
    zoo: Zoo, routers: tuple[str, ...] = PREPARED_ROUTERS, progress: bool | None = None, device: DeviceLike = "cpu"
) -> dict[str, float]:
    """Compute and store the held-in experts' artifacts of ``routers`` with their default settings
    and the zoo's seed (what the tour, ``bench all``, ``moerge serve --zoo`` and the docs compose),
    as :func:`moerge.compose` would the first time; artifacts already stored are kept. Seconds per router."""
    from moerge.composer import compose

    out = {}
    experts = zoo.registry.select(names=zoo.held_in)
    for name in progress_bar(routers, desc="routers", progress=progress):
        t = time.perf_counter()
        seed = {"seed": zoo.preset.seed} if name == "phatgoose" else {}
        compose(zoo.base_path, experts, name, data=zoo.expert_data, progress=progress, device=device, dtype="float32", **seed)
        out[name] = round(time.perf_counter() - t, 1)
    return out


def _fix_base_path(folder: Path, base: Path) -> None:
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = absolute_path(base)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _rewrite_base_ids(reg: Registry, old: str, new: str) -> None:
    """Point records at the zoo's final base folder (they were registered while it was being built)."""
    with reg._write() as con:
        rows = con.execute("SELECT name, version, record FROM experts").fetchall()
        for name, version, record in rows:
            data = json.loads(record)
            if data.get("base_model") == old:
                data["base_model"] = new
                con.execute(
                    "UPDATE experts SET base_model=?, record=? WHERE name=? AND version=?", (new, json.dumps(data), name, version)
                )
                atomic_write_json(reg.root / "experts" / name / str(version) / "record.json", data)


def with_overrides(preset: str, **overrides: Any) -> Preset:
    """A preset with some fields changed (its cache key changes with them)."""
    return replace(PRESETS[preset], **overrides)
