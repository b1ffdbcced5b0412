"""A positive control for token-level routing (issue 16): experts whose skills are visible in
the tokens themselves, so a token router *can* succeed — and a benchmark that shows whether it does.

Four vocabularies, disjoint: ``a``–``j``, digits, ``A``–``J``, ``k``–``t``. Each expert applies
a per-item map to its own vocabulary's items (shift by one; add one; reverse the alphabet;
shift back by one) and copies every foreign item unchanged, so the experts are compatible.
A prompt is segments separated by ``|`` then ``=>``; there is no instruction:

    held-in (expert "digits"):  c a | 3 7 1 =>   →  c a | 4 8 2
    held-out (mixed):           a b c | 3 7 | K L =>   →  b c d | 4 8 | P O

Held-out prompts mix three segments of three vocabularies, scored per segment: one expert gets
its own segment right (a quarter of the segments), a router that picks each token's expert gets
them all. The base (a tiny Llama, deeper and wider than the main zoo's) is pre-trained to copy
segments, so it knows the format. Built once per preset (seeded) and cached; atomic.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moerge.registry import Registry, config_fingerprint

CONTROL_FORMAT = 1
SEGMENT_SEP, ARROW = "|", "=>"
VOCABS: dict[str, list[str]] = {
    "letters": list("abcdefghij"),
    "digits": [str(i) for i in range(10)],
    "capitals": list("ABCDEFGHIJ"),
    "late-letters": list("klmnopqrst"),
}
MAPS: dict[str, Callable[[str], str]] = {
    "letters": lambda c: VOCABS["letters"][(VOCABS["letters"].index(c) + 1) % 10],
    "digits": lambda c: VOCABS["digits"][(VOCABS["digits"].index(c) + 1) % 10],
    "capitals": lambda c: VOCABS["capitals"][9 - VOCABS["capitals"].index(c)],
    "late-letters": lambda c: VOCABS["late-letters"][(VOCABS["late-letters"].index(c) - 1) % 10],
}
DESCRIPTIONS = {
    "letters": "Replace each letter from a to j by the next one (j becomes a); copy anything else.",
    "digits": "Add one to each digit (9 becomes 0); copy anything else.",
    "capitals": "Mirror each capital from A to J in the alphabet (A becomes J); copy anything else.",
    "late-letters": "Replace each letter from k to t by the previous one (k becomes t); copy anything else.",
}
VOCAB_OF = {c: v for v, cs in VOCABS.items() for c in cs}


@dataclass(frozen=True)
class ControlPreset:
    name: str
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    base_steps: int = 600
    expert_steps: int = 300
    lora_r: int = 16
    lr: float = 3e-3
    batch: int = 64
    n_train: int = 3000
    n_test: int = 200
    #: foreign segments (copied unchanged) per training prompt: 0 to this many
    max_foreign: int = 2
    seed: int = 0
    #: examples per expert in the retrieval router's bank when the suite is scored (the paper's
    #: 1,000 unless a preset says less); a setting of the scoring, not of the build: not in the key
    retrieval_examples: int = 1000

    def key(self) -> str:
        fields = asdict(self)
        del fields["retrieval_examples"]
        if fields["max_foreign"] == 2:  # suites built before the option keep their key
            del fields["max_foreign"]
        return config_fingerprint({**fields, "format": CONTROL_FORMAT})


CONTROL_PRESETS = {
    # `moerge demo`'s: a 3-layer, d 96 base. Chosen over d 128 × 4 layers on the suite's
    # validation mixed prompts (scripts/control_sweep.py: routing on items 59.4 vs 50.1 %,
    # segments 95.0 vs 88.3 %), at a third of the build time (43 s vs 137 s)
    "control": ControlPreset("control", hidden=96, layers=3, base_steps=300, expert_steps=150),
    # the suggested size (4 layers, d 128): measured, no better (README)
    "control-d128": ControlPreset("control-d128"),
    # the tests' and `moerge bench all --preset small`'s: the architecture of "control", half the
    # base's steps, 60 per expert (a 32 s build instead of 70 s, one thread) and 80 test prompts.
    # Measured over seeds 0, 1, 2, 5: PHATGOOSE 92.0 ± 3.3 % of segments right against the best
    # single expert's 25.4 ± 0.3 (docs/benchmarks.md). Retrieval's bank holds 250 examples per
    # expert, not 1,000: the bank's MiniLM forwards were 12.5 of the suite's 37 s of scoring
    "control-small": ControlPreset(
        "control-small", hidden=96, layers=3, base_steps=150, expert_steps=60, n_test=80, retrieval_examples=250
    ),
}


class Example(NamedTuple):
    prompt: str
    target: str
    #: (vocabulary, the segment's right answer) per segment
    segments: tuple[tuple[str, str], ...]


def example(rng: random.Random, vocabs: list[str], mapped: set[str]) -> Example:
    """Segments of 2–4 items of ``vocabs``; items of a vocabulary in ``mapped`` are mapped."""
    segs = [(v, [rng.choice(VOCABS[v]) for _ in range(rng.randint(2, 4))]) for v in vocabs]
    outs = [[MAPS[v](c) if v in mapped else c for c in items] for v, items in segs]
    prompt = f" {SEGMENT_SEP} ".join(" ".join(items) for _, items in segs) + f" {ARROW}"
    target = f" {SEGMENT_SEP} ".join(" ".join(o) for o in outs)
    return Example(prompt, target, tuple((v, " ".join(o)) for (v, _), o in zip(segs, outs, strict=True)))


def held_in(rng: random.Random, expert: str, max_foreign: int = 2) -> Example:
    """One segment of the expert's vocabulary (mapped) and 0 to ``max_foreign`` segments of any
    vocabularies (copied), in random order."""
    vocabs = [expert] + [rng.choice(list(VOCABS)) for _ in range(rng.randint(0, max_foreign))]
    rng.shuffle(vocabs)
    return example(rng, vocabs, {expert})


def held_out(rng: random.Random) -> Example:
    """Three segments of three different vocabularies, all mapped."""
    vocabs = rng.sample(list(VOCABS), 3)
    return example(rng, vocabs, set(vocabs))


def segment_accuracy(answers: list[str], examples: list[Example]) -> float:
    """Share of segments answered exactly (an answer is split on ``|``)."""
    hit = total = 0
    for a, e in zip(answers, examples, strict=True):
        got = [" ".join(s.split()) for s in a.split(SEGMENT_SEP)]
        for j, (_, want) in enumerate(e.segments):
            total += 1
            hit += j < len(got) and got[j] == want
    return hit / total if total else 0.0


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [SEGMENT_SEP, ARROW, *(c for cs in VOCABS.values() for c in cs)]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    tok.padding_side = "left"
    return tok


@dataclass
class ControlSuite:
    root: Path
    preset: ControlPreset
    meta: dict[str, Any]
    #: each expert's training split, drawn once (gate training, retrieval's bank and the build all ask for
    #: it: drawn anew each time, 28 draws of 88,000 examples cost ~5 s of `bench all`, profiled)
    _train: dict[str, list[Example]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def base_path(self) -> Path:
        return self.root / "base"

    @property
    def registry(self) -> Registry:
        return Registry(self.root / "registry")

    @property
    def experts(self) -> list[str]:
        return list(VOCABS)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base_path)
        tok.padding_side = "left"
        return tok

    def train_split(self, expert: str) -> list[Example]:
        if expert not in self._train:
            rng = random.Random(f"control:{expert}:train:{self.preset.seed}")
            self._train[expert] = [held_in(rng, expert, self.preset.max_foreign) for _ in range(self.preset.n_train)]
        return list(self._train[expert])

    def expert_data(self, expert: str) -> list[tuple[str, str]]:
        """(prompt, target) pairs the expert was trained on: what PHATGOOSE's gates train on."""
        return [(e.prompt, e.target) for e in self.train_split(expert)]

    def test_held_out(self) -> list[Example]:
        return [held_out(random.Random(f"control:test:{self.preset.seed}:{i}")) for i in range(self.preset.n_test)]

    def val_held_out(self, n: int | None = None) -> list[Example]:
        """Mixed prompts like the test's, drawn apart from them: for choosing settings."""
        test = {e.prompt for e in self.test_held_out()}
        out: list[Example] = []
        i = 0
        while len(out) < (n or self.preset.n_test):
            e = held_out(random.Random(f"control:val:{self.preset.seed}:{i}"))
            i += 1
            if e.prompt not in test:
                out.append(e)
        return out

    def val_held_in(self, expert: str, n: int = 100) -> list[Example]:
        rng = random.Random(f"control:{expert}:val:{self.preset.seed}")
        return [held_in(rng, expert, self.preset.max_foreign) for _ in range(n)]


def named_preset(name: str) -> ControlPreset:
    """A control preset by name, with ``$MOERGE_ZOO_SEED`` (:func:`moerge.runtime.zoo_seed`) as
    its seed when set."""
    from moerge.runtime import seeded

    if name not in CONTROL_PRESETS:
        raise KeyError(f"unknown control preset {name!r}; choose one of {sorted(CONTROL_PRESETS)}")
    return seeded(CONTROL_PRESETS[name])


def load_control(
    preset: str | ControlPreset = "control",
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    device: str = "cpu",
) -> ControlSuite:
    """The control suite for ``preset``, built on first use and cached under
    ``<cache>/control/<name>-<key>``. ``device`` is where a build trains (in float32; the
    figures in the README are the CPU's)."""
    from moerge.runtime import locked
    from moerge.zoo.build import default_cache_dir

    if isinstance(preset, str):
        preset = named_preset(preset)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = cache / "control" / f"{preset.name}-{preset.key()}"
    with locked(root.with_name(f".{root.name}.lock")):
        if not (root / "meta.json").exists():
            _build(preset, root, progress, device)
    return ControlSuite(root, preset, json.loads((root / "meta.json").read_text()))


def _build(p: ControlPreset, root: Path, progress: bool | None, device: str = "cpu") -> None:
    from peft import LoraConfig, get_peft_model

    from moerge.progress import progress_bar
    from moerge.zoo.build import LORA_TARGETS, _fix_base_path
    from moerge.zoo.train import generate_answers, make_base_model, train_loop

    t0 = time.perf_counter()
    tmp = root.with_name(root.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok = build_tokenizer()
    rng = random.Random(f"control:pretrain:{p.seed}")
    pretrain = [example(rng, [rng.choice(list(VOCABS)) for _ in range(rng.randint(1, 3))], set()) for _ in range(4000)]
    base = make_base_model(tok, p.hidden, p.layers, p.heads, seed=p.seed).to(device)
    train_loop(base, tok, pretrain, steps=p.base_steps, batch_size=p.batch, lr=p.lr, seed=p.seed, weight_decay=0.01,
               desc="control base", progress=progress)  # fmt: skip
    base.eval()
    base.to("cpu").save_pretrained(tmp / "base")
    base.to(device)
    tok.save_pretrained(tmp / "base")
    timings = {"base_s": time.perf_counter() - t0}
    suite = ControlSuite(tmp, p, {})
    reg = Registry(tmp / "registry")
    training = {}
    for i, e in enumerate(progress_bar(list(VOCABS), desc="control experts", progress=progress)):
        t1 = time.perf_counter()
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=p.lora_r, lora_alpha=2 * p.lora_r, target_modules=LORA_TARGETS,
                                                               lora_dropout=0.0))  # fmt: skip
        train_loop(model, tok, suite.train_split(e), steps=p.expert_steps, batch_size=p.batch, lr=p.lr, seed=p.seed * 100 + i,
                   desc=f"expert {e}", progress=progress)  # fmt: skip
        val = suite.val_held_in(e)
        acc = sum(a == x.target for a, x in zip(generate_answers(model, tok, [x.prompt for x in val], max_new_tokens=20), val,
                                                   strict=True)) / len(val)  # fmt: skip
        model.to("cpu").save_pretrained(tmp / "lora" / e)
        _fix_base_path(tmp / "lora" / e, root / "base")
        reg.register(tmp / "lora" / e, e, base=tmp / "base", description=DESCRIPTIONS[e], skills=[e],
                     examples=[x.prompt for x in suite.train_split(e)[:8]], metrics={"val_exact_match": acc},
                     tags=["control"])  # fmt: skip
        training[e] = {"val_exact_match": acc, "seconds": time.perf_counter() - t1}
    from moerge.registry.importers import absolute_path
    from moerge.zoo.build import _rewrite_base_ids

    _rewrite_base_ids(reg, absolute_path(tmp / "base"), absolute_path(root / "base"))
    shutil.rmtree(tmp / "lora")  # the registry holds the experts
    timings["total_s"] = time.perf_counter() - t0
    (tmp / "meta.json").write_text(json.dumps({"preset": asdict(p), "format": CONTROL_FORMAT, "training": training,
                                               "timings": timings, "torch": torch.__version__, "device": str(device)},
                                              indent=2))  # fmt: skip
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
