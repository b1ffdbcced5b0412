"""Symbolic-MoE's recruiting maths against the spec (``shared/docs/methods/symbolic-moe.md``
§3.2–3.4, §3.6), on hand-computed cases (issue 15, first increment)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moerge.symbolic import (
    build_profiles,
    consensus_keywords,
    global_competency,
    local_suitability,
    majority_vote,
    map_keywords,
    parse_keywords,
    plan_by_model,
    recruit,
    recruit_distribution,
    sample_experts,
)

KEYWORDS = {"q1": ["algebra", "geometry"], "q2": ["algebra"], "q3": ["biology"]}
CORRECT = {"A": {"q1": True, "q2": True, "q3": False}, "B": {"q1": False, "q2": True, "q3": True}}


def test_keywords_are_parsed_lowercased_without_periods_and_at_most_20_characters():
    text = "Let me think.\nKeywords: Virology, Cell Biology., a keyword far too long to keep, virology, "
    assert parse_keywords(text) == ["virology", "cell biology"]
    samples = ["Keywords: virology, immunology", "Keywords: Virology", "Keywords: genetics, immunology.", "nothing", "Keywords: "]
    assert consensus_keywords(samples) == ["virology", "immunology"]  # genetics: 1 of 5 samples
    assert consensus_keywords(["Keywords: a", "Keywords: b"]) == []  # empty lists are possible


def test_profiles_add_one_per_keyword_for_a_right_answer_and_take_one_for_a_wrong_one():
    assert build_profiles(KEYWORDS, CORRECT) == {
        "A": {"algebra": 2, "geometry": 1, "biology": -1},
        "B": {"algebra": 0, "geometry": -1, "biology": 1},
    }
    with pytest.raises(ValueError, match="model 'C' has no judgement .* 'q3'"):
        build_profiles(KEYWORDS, {"C": {"q1": True, "q2": True}})


def test_global_competency_shifts_negative_sums_and_squares_at_tau_one_half():
    # g = (2, 0): nothing negative, squared and normalised
    assert global_competency(build_profiles(KEYWORDS, CORRECT)) == {"A": 1.0, "B": 0.0}
    # g = (2, -1): shifted by -min + 1 -> (4, 1), squared (16, 1)
    gamma = global_competency({"A": {"x": 2}, "B": {"x": -1}})
    assert gamma == pytest.approx({"A": 16 / 17, "B": 1 / 17})
    assert global_competency({"A": {"x": 2}, "B": {"x": -1}}, tau=1.0) == pytest.approx({"A": 0.8, "B": 0.2})


def test_recruiting_distribution_follows_the_spec_cases():
    prof = {"A": {"algebra": 2, "geometry": 1, "biology": -1}, "B": {"algebra": 0, "geometry": -1, "biology": 1},
            "C": {"chemistry": 3}}  # fmt: skip
    gamma = {"A": 0.5, "B": 0.3, "C": 0.2}
    assert local_suitability(prof, ["algebra", "algebra"]) == {"A": 4.0, "B": 0.0}  # twice counts twice; C absent
    # candidates are the models with s > 0, weighted by gamma
    assert recruit_distribution(prof, gamma, ["algebra", "biology"]) == pytest.approx({"A": 0.5 / 0.8, "B": 0.3 / 0.8})
    assert recruit_distribution(prof, gamma, ["geometry"]) == {"A": 1.0}
    # nobody positive: every present model shifted by -min + 1 (A: -1 -> 1, B: -1 -> 1), times gamma
    assert recruit_distribution(prof, gamma, ["biology", "geometry"]) == pytest.approx({"A": 0.5 / 0.8, "B": 0.3 / 0.8})
    assert recruit_distribution({"C": {"x": -2}, "D": {"x": -1}}, {"C": 0.5, "D": 0.5}, ["x"]) == pytest.approx(
        {"C": 1 / 3, "D": 2 / 3}
    )
    assert recruit_distribution(prof, gamma, ["poetry"]) is None  # no model knows it: the caller's fallback


def test_three_experts_are_drawn_with_replacement_seeded_and_the_fallback_is_labelled():
    rng = random.Random(0)
    assert sample_experts({"A": 1.0}, ["A", "B"], rng).experts == ["A", "A", "A"]
    draws = Counter()
    rng = random.Random(1)
    for _ in range(20_000):
        draws.update(sample_experts({"A": 0.7, "B": 0.3}, ["A", "B"], rng).experts)
    assert draws["A"] / sum(draws.values()) == pytest.approx(0.7, abs=0.01)
    fallback = sample_experts(None, ["A", "B", "C"], random.Random(2), keywords=["poetry"])
    assert fallback.how == "uniform" and len(fallback.experts) == 3 and fallback.keywords == ["poetry"]
    prof = build_profiles(KEYWORDS, CORRECT)
    queries = {"t1": ["algebra"], "t2": ["biology"], "t3": ["poetry"]}
    first, again = recruit(queries, prof, seed=7), recruit(queries, prof, seed=7)
    assert {q: r.experts for q, r in first.items()} == {q: r.experts for q, r in again.items()}
    assert first["t1"].experts == ["A", "A", "A"]  # gamma_B = 0: B is never drawn where A is a candidate
    assert first["t3"].how == "uniform"


def test_the_batch_plan_groups_by_model_in_order_of_first_appearance_keeping_repeats():
    from moerge.symbolic import Recruitment

    recruited = {"q1": Recruitment(["B", "A", "B"], None), "q2": Recruitment(["C", "A", "A"], None)}
    plan = plan_by_model(recruited)
    assert list(plan) == ["B", "A", "C"]
    assert plan == {"B": [("q1", 0), ("q1", 2)], "A": [("q1", 1), ("q2", 1), ("q2", 2)], "C": [("q2", 0)]}
    assert len(plan) + 1 == 4  # model loads of a batch run: distinct recruited models + the aggregator


def test_majority_vote_breaks_ties_by_first_answer():
    assert majority_vote(["b", "a", "a", "b", "c"]) == "b"
    assert majority_vote(["x", "y", "y"]) == "y"
    with pytest.raises(ValueError):
        majority_vote([])


def test_query_keywords_map_to_the_nearest_validation_keyword_by_minilm():
    vocabulary = ["virology", "finance", "poetry"]
    mapped, sims = map_keywords({"t1": ["vaccines", "finance"], "t2": ["stock market"], "t3": ["sonnets"]}, vocabulary)
    assert mapped == {"t1": ["virology", "finance"], "t2": ["finance"], "t3": ["poetry"]}
    assert sims["finance"] == 1.0 and 0 < sims["vaccines"] < 1
    with pytest.raises(ValueError, match="vocabulary is empty"):
        map_keywords({"t": ["x"]}, [])


# ----------------------------------------------------------------- whole-model experts (kind "model")


def _causal_lm(path, arch="llama"):
    """A tiny causal LM of ``arch`` with a tokenizer (the zoo's word-level one) and a chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from moerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    return path


def test_whole_models_of_different_architectures_register_copied_or_by_reference(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.registry import Registry

    reg = Registry(tmp_path / "reg")
    llama = reg.register(_causal_lm(tmp_path / "llama"), "llama-math", kind="model", skills=["algebra"], description="a")
    gpt2 = reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2-bio", kind="model", reference=True)
    assert llama.storage == "folder" and llama.extra["model"] == {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                                  "chat_template": True}  # fmt: skip
    assert gpt2.storage == "reference" and gpt2.files == {} and gpt2.extra["model"]["architectures"] == ["GPT2LMHeadModel"]
    assert reg.model_folder("gpt2-bio") == (tmp_path / "gpt2").resolve()  # nothing copied
    for name in ("llama-math", "gpt2-bio"):
        folder = reg.model_folder(name)
        AutoModelForCausalLM.from_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder).chat_template
    out = reg.export("gpt2-bio", tmp_path / "exported")
    assert (out / "config.json").is_file() and AutoTokenizer.from_pretrained(out)
    assert reg.verify()["ok"]
    with pytest.raises(ValueError, match="is a 'lora' expert|not a whole model"):
        reg.model_folder(reg.register(_lora(tmp_path), "adapter"))


def _lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_a_model_expert_without_a_tokenizer_or_not_a_causal_lm_is_refused_and_nothing_is_stored(tmp_path):
    import shutil

    from transformers import BertConfig, BertModel

    from moerge.registry import Registry

    reg = Registry(tmp_path / "reg")
    folder = _causal_lm(tmp_path / "llama")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no tokenizer .*tokenizer.save_pretrained"):
        reg.register(bare, "bare", kind="model")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="not a causal language model"):
        reg.register(tmp_path / "bert", "bert", kind="model")
    with pytest.raises(ValueError, match="reference=True keeps whole models"):
        reg.register(_lora(tmp_path), "adapter", reference=True)
    assert reg.list() == []
    ref = reg.register(folder, "moved", kind="model", reference=True)
    shutil.rmtree(folder)  # a reference can go stale: the error says where it looked
    with pytest.raises(FileNotFoundError, match="model expert moved@1"):
        reg.model_folder(ref)


def test_batch_by_model_loads_each_recruited_model_once_and_answers_as_the_per_query_loop(tmp_path):
    """Spec §3.6: loads = distinct recruited models (+ 1 aggregator), whatever the number of
    queries; the answers are the per-query loop's (greedy, prompts of one length: no padding)."""
    from moerge.registry import Registry
    from moerge.symbolic import Recruitment
    from moerge.symbolic.execute import aggregate, aggregate_prompt, load_model_expert, run_batched, run_per_query

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model", reference=True)
    loads = []

    def loader(name):
        loads.append(name)
        return load_model_expert(reg, name)

    prompts = {f"q{i}": f"sort : {' '.join('abcde'[i:] + 'abcde'[:i])} =>" for i in range(5)}
    recruited = {
        q: Recruitment(["llama", "gpt2", "llama"] if i % 2 else ["gpt2", "gpt2", "gpt2"], None) for i, q in enumerate(prompts)
    }
    batched, stats = run_batched(recruited, prompts, loader, max_new_tokens=3, progress=False)
    assert stats.model_loads == stats.distinct_models == 2 and loads == ["gpt2", "llama"]  # order of first appearance
    assert stats.prompts == {"gpt2": 5 + 3 * 2 + 0, "llama": 4}
    loads.clear()
    naive, nstats = run_per_query(recruited, prompts, loader, max_new_tokens=3, progress=False)
    assert nstats.model_loads == 15 and naive == batched
    # answers already generated are reused: a model with nothing left to answer is not loaded
    loads.clear()
    known = {"gpt2": {q: batched[q][recruited[q].experts.index("gpt2")] for q in prompts}}
    again, kstats = run_batched(recruited, prompts, loader, max_new_tokens=3, progress=False, known=known)
    assert again == batched and loads == ["llama"] and kstats.reused == 5 + 3 * 2 and kstats.prompts == {"llama": 4}
    with pytest.raises(ValueError, match="greedy"):
        run_batched(recruited, prompts, loader, max_new_tokens=3, progress=False, known=known, temperature=0.7)
    final, astats = aggregate({q: p for q, p in prompts.items()}, batched, loader, "llama", max_new_tokens=2)
    assert astats.model_loads == 1 and set(final) == set(prompts)
    text = aggregate_prompt("2+2?", ["<think>hmm</think> 4", "5"], "Answer with a number.")
    assert "### Model 1's response:\n4" in text and "hmm" not in text and text.index("### Model 2") < text.index("Question: 2+2?")


def test_profiles_are_registry_artifacts_per_validation_set_and_a_new_model_is_the_only_one_profiled(tmp_path):
    from moerge.registry import Registry
    from moerge.symbolic.execute import load_model_expert
    from moerge.symbolic.profile import EmbeddingAnnotator, profile_models

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    loads = []

    def loader(name):
        loads.append(name)
        return load_model_expert(reg, name)

    annotate = EmbeddingAnnotator(["sorting", "arithmetic", "spelling"], top_k=1)
    questions = {"v1": "sort : c b a =>", "v2": "max of : 3 9 4 =>", "v3": "reverse the letters : a b c =>"}
    kws = annotate(list(questions.values()))
    assert all(len(k) == 1 for k in kws)
    validation = {q: {"question": t, "answer": "a b c", "keywords": k} for (q, t), k in zip(questions.items(), kws, strict=True)}
    check = lambda response, answer: response == answer  # noqa: E731
    first, report = profile_models(reg, ["llama"], validation, check, loader, max_new_tokens=3)
    assert report["profiled_now"] == ["llama"] and report["model_loads"] == 1
    assert sum(abs(v) for v in first["llama"].values()) == 3  # one keyword per question, +-1 each
    again, report = profile_models(reg, ["llama"], validation, check, loader, max_new_tokens=3)
    assert again == first and report["profiled_now"] == [] and loads == ["llama"]  # loaded from the registry
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model")
    _, report = profile_models(reg, ["llama", "gpt2"], validation, check, loader, max_new_tokens=3)
    assert report["profiled_now"] == ["gpt2"] and loads == ["llama", "gpt2"]  # adding a model profiles it alone
    other = {**validation, "v4": {"question": "sort : b a =>", "answer": "a b", "keywords": ["sorting"]}}
    _, report = profile_models(reg, ["llama"], other, check, loader, max_new_tokens=3)
    assert report["profiled_now"] == ["llama"]  # a profile of another validation set is not reused
    with pytest.raises(ValueError, match="needs 'question', 'answer' and 'keywords'"):
        profile_models(reg, ["llama"], {"x": {"question": "q"}}, check, loader)


def test_the_llm_annotator_samples_five_times_seeded_and_keeps_the_consensus(tmp_path, monkeypatch):
    from moerge.registry import Registry
    from moerge.symbolic import execute
    from moerge.symbolic.profile import LLMAnnotator

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    loaded = execute.load_model_expert(reg, "llama")
    ann = LLMAnnotator(loaded, max_new_tokens=4)
    assert ann(["sort : c b a =>"]) == ann(["sort : c b a =>"])  # seeded sampling
    calls = []
    canned = iter(["Keywords: algebra, logic", "Keywords: algebra", "Keywords: logic, geometry", "Keywords: x", "none"])

    def fake_generate(loaded, prompts, **kw):
        calls.append(kw)
        return [next(canned)]

    monkeypatch.setattr(execute, "generate", fake_generate)
    assert ann(["q"]) == [["algebra", "logic"]]
    assert len(calls) == 5 and {c["temperature"] for c in calls} == {0.7} and len({c["seed"] for c in calls}) == 5


def test_the_aggregator_benchmark_has_one_right_and_two_wrong_answers_and_picks_the_best_candidate(tmp_path, monkeypatch):
    from moerge.registry import Registry
    from moerge.symbolic import execute
    from moerge.symbolic.profile import aggregator_benchmark, select_aggregator, validation_fingerprint

    reg = Registry(tmp_path / "reg")
    for name in ("a", "b", "c"):
        reg.register(_causal_lm(tmp_path / name), name, kind="model")
    validation = {"v1": {"question": "sort : b a =>", "answer": "a b", "keywords": ["sorting"]},
                  "v2": {"question": "sort : c a =>", "answer": "a c", "keywords": ["sorting"]}}  # fmt: skip
    key = {"validation": validation_fingerprint(validation), "questions": 2}
    runs = {"a": {"v1": "a b", "v2": "c a"}, "b": {"v1": "b a", "v2": "a c"}, "c": {"v1": "x", "v2": "y"}}
    for m, ans in runs.items():  # as profile_models stores them
        correct = {q: ans[q] == validation[q]["answer"] for q in validation}
        reg.put_artifact(m, "symbolic_profile", key, {"profile": {}, "accuracy": 0.0, "correct": correct, "answers": ans})
    bench = aggregator_benchmark(reg, ["a", "b", "c"], validation, seed=0)
    assert sorted(bench["v1"]) == sorted(["a b", "b a", "x"]) and sorted(bench["v2"]) == sorted(["a c", "c a", "y"])
    assert aggregator_benchmark(reg, ["a", "b", "c"], validation, seed=0) == bench  # seeded

    def fake_generate(loaded, prompts, **kw):  # candidate "b" copies the right answer, the others echo a wrong one
        return [validation["v1" if "b a =>" in p else "v2"]["answer"] if loaded.name == "b" else "zz" for p in prompts]

    monkeypatch.setattr(execute, "generate", fake_generate)
    best, scores = select_aggregator(reg, ["a", "b"], ["a", "b", "c"], validation, lambda r, a: r == a,
                                     lambda n: execute.load_model_expert(reg, n))  # fmt: skip
    assert best == "b" and scores == {"a": 0.0, "b": 1.0}
    reg.register(_causal_lm(tmp_path / "d"), "d", kind="model")
    with pytest.raises(ValueError, match="model 'd' has no profile for this validation set"):
        aggregator_benchmark(reg, ["d"], validation)


@pytest.mark.slow
def test_batch_by_model_on_ray_runs_one_task_per_model_and_answers_as_in_process(tmp_path):
    import ray

    from moerge.registry import Registry
    from moerge.runtime import ensure_ray
    from moerge.symbolic import Recruitment
    from moerge.symbolic.execute import load_model_expert, run_batched, run_batched_ray

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model")
    prompts = {f"q{i}": f"sort : {' '.join('abcd'[i:] + 'abcd'[:i])} =>" for i in range(4)}
    recruited = {q: Recruitment(["llama", "gpt2", "gpt2"], None) for q in prompts}
    local, _ = run_batched(recruited, prompts, lambda n: load_model_expert(reg, n), max_new_tokens=3, progress=False)
    started = not ray.is_initialized()
    ensure_ray(num_cpus=2, log_to_driver=False)
    try:
        remote, stats = run_batched_ray(recruited, prompts, str(reg.root), max_resident=2, num_cpus=0.5, threads=1,
                                        max_new_tokens=3, progress=False)  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    assert remote == local and stats.model_loads == stats.distinct_models == 2
    with pytest.raises(ValueError, match="max_resident must be"):
        run_batched_ray(recruited, prompts, str(reg.root), max_resident=0)


@pytest.mark.slow
def test_bench_symbolic_counts_loads_for_both_runs_on_the_zoos_whole_model_pool(small_zoo, tmp_path):
    import json

    from click.testing import CliRunner

    from moerge.cli import main

    out = tmp_path / "sym.json"
    r = CliRunner().invoke(
        main, ["bench", "symbolic", "--queries", "6", "--max-new-tokens", "4", "--json", str(out), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["per_query"]["model_loads"] == 6 * 3 and d["batched"]["model_loads"] == d["distinct_models"] <= 8
    assert d["answers_agree"] == 1.0 and d["speedup"] > 0 and "batch by model" in r.output


def test_symbolic_moe_end_to_end_on_registered_models(tmp_path):
    """profile -> select_aggregator -> run: loads = distinct recruited + 1, every query answered,
    majority vote beside the aggregator's answer; stored profiles make a second profile() free."""
    from moerge.registry import Registry
    from moerge.symbolic import EmbeddingAnnotator
    from moerge.symbolic.moe import SymbolicMoE

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model")
    moe = SymbolicMoE(reg, ["llama", "gpt2"], EmbeddingAnnotator(["sorting", "arithmetic"], top_k=1), max_new_tokens=2)
    with pytest.raises(RuntimeError, match="profile\\(validation\\) first"):
        moe.recruit({"t": "x"})
    validation = {"v1": {"question": "sort : b a =>", "answer": "a b"}, "v2": {"question": "max of : 3 9 =>", "answer": "9"}}
    profiles = moe.profile(validation)
    assert set(profiles) == {"llama", "gpt2"} and all(len(v["keywords"]) == 1 for v in moe.validation.values())
    assert moe.select_aggregator() in ("llama", "gpt2") and set(moe.report["aggregator_scores"]) == {"llama", "gpt2"}
    out = moe.run({"t1": "sort : c a =>", "t2": "max of : 1 4 =>", "t3": "sort : d b =>"})
    used = {m for r in out["results"].values() for m in r["experts"]}
    assert out["model_loads"] == len(used) + 1 == out["distinct_models"] + 1
    assert all(
        len(r["answers"]) == 3 and r["final"] is not None and r["majority"] in r["answers"] for r in out["results"].values()
    )
    assert moe.profile(validation) == profiles and moe.report["profile"]["profiled_now"] == []
    reg.register(_lora(tmp_path), "adapter")
    with pytest.raises(ValueError, match="recruits whole models .*adapter"):
        SymbolicMoE(reg, ["llama", "adapter"], EmbeddingAnnotator(["x"]))


def test_cli_symbolic_profile_and_run(tmp_path):
    import json

    from click.testing import CliRunner

    from moerge.cli import main
    from moerge.registry import Registry

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model", reference=True)
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text(
        '{"id": "v1", "question": "sort : b a =>", "answer": "a b"}\n{"id": "v2", "question": "max of : 3 9 =>", "answer": "9"}\n'
    )
    test.write_text('{"id": "t1", "question": "sort : c a =>", "answer": "a c"}\n{"id": "t2", "question": "max of : 1 4 =>"}\n')
    common = [
        "--registry",
        str(reg.root),
        "--validation",
        str(val),
        "--skills",
        "sorting,arithmetic",
        "--max-new-tokens",
        "2",
        "--no-progress",
    ]
    r = CliRunner().invoke(main, ["symbolic", "profile", *common])
    assert r.exit_code == 0, r.output
    assert (
        "| llama |" in r.output and "| gpt2 |" in r.output and "profiled now: gpt2, llama" in r.output
    )  # the registry lists by name
    r = CliRunner().invoke(main, ["symbolic", "profile", *common])
    assert "profiled now: none (all stored)" in r.output
    r = CliRunner().invoke(main, ["symbolic", "run", *common, "--test", str(test), "--json", str(tmp_path / "out.json")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert "aggregator:" in r.output and "of 1" in r.output and out["model_loads"] == out["distinct_models"] + 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "v1", "question": "q"}\n')
    r = CliRunner().invoke(main, ["symbolic", "profile", "--registry", str(reg.root), "--validation", str(bad), "--skills", "x"])
    assert r.exit_code == 2 and "bad.jsonl:1: needs 'id', 'question' and answer" in r.output
    r = CliRunner().invoke(main, ["symbolic", "profile", "--registry", str(reg.root), "--validation", str(val)])
    assert r.exit_code == 2 and "--skills" in r.output and "--annotator" in r.output
    labelled = tmp_path / "labelled.jsonl"  # with keywords, neither is needed: nearest validation questions annotate
    labelled.write_text(
        '{"id": "v1", "question": "sort : b a =>", "answer": "a b", "keywords": ["sorting"]}\n'
        '{"id": "v2", "question": "max of : 3 9 =>", "answer": "9", "keywords": ["arithmetic"]}\n'
    )
    r = CliRunner().invoke(main, ["symbolic", "run", "--registry", str(reg.root), "--validation", str(labelled),
                                  "--test", str(test), "--max-new-tokens", "2", "--no-progress", "--aggregator", "llama"])  # fmt: skip
    assert r.exit_code == 0 and "aggregator llama" in r.output, r.output


def test_model_experts_load_in_the_dtype_asked_for(tmp_path):
    """``dtype="auto"`` is float32 on the CPU (bfloat16 on a CUDA card); a named dtype is honoured."""
    import torch

    from moerge.registry import Registry
    from moerge.symbolic.execute import generate, load_model_expert

    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model")
    assert next(load_model_expert(reg, "llama").model.parameters()).dtype == torch.float32
    bf16 = load_model_expert(reg, "llama", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert len(generate(bf16, ["a b", "c"], max_new_tokens=2)) == 2


def _chat_task_set(root, messages=None):
    """Two held-in chat tasks and one held-out, a few examples each (case and punctuation normalised)."""
    import json

    rows = {"upper": [("say a", "A"), ("say b", "B"), ("say c", "C")], "lower": [("give A", "a"), ("give B", "b"), ("give C", "c")],
            "other": [("what is d", "d"), ("what is e", "e")]}  # fmt: skip
    spec = '{role: %s, metric: exact_match, normalize: ["strip", "case", "punctuation"], max_new_tokens: 2, stop: ["\\n"]}'
    root.mkdir()
    (root / "tasks.yaml").write_text(
        "tasks:\n" + "".join(f"  {t}: {spec % ('held_out' if t == 'other' else 'held_in')}\n" for t in rows)
    )
    for t, pairs in rows.items():
        (root / t).mkdir()
        for split in ("train", "validation", "test"):
            lines = [{"messages": messages or [{"role": "user", "content": f"{q} ({split})"}], "target": a} for q, a in pairs]
            (root / t / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_symbolic_moe_in_the_evaluator_asks_chat_tasks_through_each_models_template_and_takes_its_settings(tmp_path, monkeypatch):
    """Chat tasks reach every model as their user message, wrapped by the model's own template;
    a model without a template or a multi-turn example is refused by name; seed, k and a named
    aggregator are settings of one value; validation answers are judged by the task's metric."""
    import moerge
    from moerge.evaluation import EvaluationError, load_task_set
    from moerge.evaluation.symbolic import gold, task_check
    from moerge.registry import Registry
    from moerge.symbolic import execute

    tasks = _chat_task_set(tmp_path / "tasks")
    reg = Registry(tmp_path / "reg")
    reg.register(_causal_lm(tmp_path / "llama"), "llama", kind="model", tasks=["upper"])
    reg.register(_causal_lm(tmp_path / "gpt2", "gpt2"), "gpt2", kind="model", tasks=["lower"])
    seen: list[tuple[str, bool, str]] = []
    real_generate = execute.generate

    def spy(loaded, prompts, **kw):
        seen.extend((loaded.name, loaded.chat, p) for p in prompts)
        return real_generate(loaded, prompts, **kw)

    monkeypatch.setattr(execute, "generate", spy)
    kw = dict(methods="symbolic_moe,majority_vote,best_single", device="cpu", progress=False)
    r = moerge.evaluate(reg, tasks, grid=["symbolic_moe.aggregator=gpt2", "symbolic_moe.seed=3", "symbolic_moe.k=2"], **kw)
    sym = r.meta["symbolic"]
    assert sym["aggregator"] == "gpt2@1" and not sym["aggregator_chosen"] and sym["aggregator_scores"] is None
    assert sym["seed"] == 3 and sym["k"] == 2
    # every model answered every test query once, for the matrix; recruiting reuses those answers,
    # so the run itself loads the aggregator only
    test_pairs = [(name, p) for name, _, p in seen if p.endswith("(test)") and "### Model" not in p]  # not aggregating
    queries = len({p for _, p in test_pairs})
    assert queries > 0 and len(test_pairs) == 2 * queries  # each model answered each test query once, not again
    assert sym["model_loads"] == 1 and sym["reused_answers"] == 2 * queries  # k = 2 recruited answers reused each
    asked = {p for _, _, p in seen}
    assert {"say a (validation)", "give B (test)", "what is e (test)"} <= asked  # the user message itself
    assert all(chat for name, chat, _ in seen)  # ... which generate wraps in each model's own template
    assert not any(p.startswith("say") and "(train)" in p for p in asked)  # nothing from the train split
    assert all(row.test_prompts_in_preparation == 0 for row in r.rows)
    # the profile's judge is the task's: stop strings, normalisation, any target
    check = task_check(load_task_set(tasks))
    assert check(" a.\nmore", gold("upper", ["A"])) and not check("b", gold("upper", ["A"]))
    assert check("x", gold("upper", ["A", "X"]))
    for bad, why in (
        (["symbolic_moe.seed=1,2"], "takes one value"),
        (["symbolic_moe.k=0"], "k must be an integer ≥ 1"),
        (["symbolic_moe.aggregator=nobody"], "aggregator: expert 'nobody' is not in the registry"),
    ):
        with pytest.raises(EvaluationError, match=why):
            moerge.evaluate(reg, tasks, grid=bad, **kw)
    reg.register(_lora(tmp_path), "adapter")
    with pytest.raises(EvaluationError, match="aggregator must be a whole model .*adapter@1 is 'lora'"):
        moerge.evaluate(reg, tasks, grid=["symbolic_moe.aggregator=adapter"], experts=["llama", "gpt2"], **kw)
    # a model without a chat template cannot take chat messages; a chat example is one user message
    plain = _causal_lm(tmp_path / "plain")
    (plain / "tokenizer_config.json").write_text(
        (plain / "tokenizer_config.json").read_text().replace('"chat_template"', '"unused_template"')
    )
    for f in plain.glob("chat_template.*"):
        f.unlink()
    reg.register(plain, "plain", kind="model", tasks=["upper"])
    with pytest.raises(EvaluationError, match="model expert\\(s\\) plain@1 have no chat template"):
        moerge.evaluate(reg, tasks, experts=["llama", "plain"], **kw)
    turns = _chat_task_set(tmp_path / "turns", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}])
    with pytest.raises(EvaluationError, match="must be one user message"):
        moerge.evaluate(reg, turns, experts=["llama", "gpt2"], **kw)
