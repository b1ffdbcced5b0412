"""The moerge command: --help everywhere, registry round trip, and the demo on the small zoo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moerge.cli import main

COMMANDS = [
    [],
    ["demo"],
    ["zoo"],
    ["zoo", "build"],
    ["zoo", "tasks"],
    ["registry"],
    ["registry", "add"],
    ["registry", "list"],
    ["registry", "show"],
    ["registry", "rm"],
    ["registry", "export"],
    ["route"],
    ["bench"],
    ["bench", "all"],
    ["bench", "routing"],
    ["bench", "serving"],
    ["serve"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "moerge")
def test_every_command_has_help(cmd):
    result = CliRunner().invoke(main, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_registry_commands_round_trip(tmp_path, lora_folder, llama_folder):
    run = CliRunner().invoke
    reg = ["--registry", str(tmp_path / "reg")]
    r = run(
        main,
        [
            "registry",
            "add",
            *reg,
            str(lora_folder),
            "--name",
            "qa",
            "--skill",
            "qa",
            "--tag",
            "t",
            "--example",
            "q?",
            "--metric",
            "em=0.5",
            "--base",
            str(llama_folder),
            "--description",
            "answers",
        ],
    )
    assert r.exit_code == 0 and "registered qa@1 (lora, peft)" in r.output, r.output
    r = run(main, ["registry", "list", *reg, "--json"])
    listed = json.loads(r.output)
    assert [e["name"] for e in listed] == ["qa"] and listed[0]["metrics"] == {"em": 0.5}
    assert "qa@1" in run(main, ["registry", "list", *reg]).output
    shown = json.loads(run(main, ["registry", "show", *reg, "qa"]).output)
    assert shown["skills"] == ["qa"] and shown["path"].endswith("qa/1")
    r = run(main, ["registry", "export", *reg, "qa", str(tmp_path / "out")])
    assert r.exit_code == 0 and (tmp_path / "out" / "adapter_config.json").exists()
    r = run(main, ["registry", "add", *reg, str(lora_folder), "--name", "../bad"])
    assert r.exit_code == 2 and "path separator" in r.output
    r = run(main, ["registry", "add", *reg, str(lora_folder), "--name", "x", "--metric", "oops"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = run(main, ["registry", "show", *reg, "missing"])
    assert r.exit_code == 2 and "'missing' is not in the registry" in r.output
    assert run(main, ["registry", "rm", *reg, "qa", "--yes"]).output.strip() == "removed qa@1"
    assert json.loads(run(main, ["registry", "list", *reg, "--json"]).output) == []


def test_zoo_tasks_lists_every_task():
    from moerge.zoo import TASKS
    from moerge.zoo.tasks import COMPOSED

    out = CliRunner().invoke(main, ["zoo", "tasks"]).output
    assert all(name in out for name in TASKS)
    rows = {line.split()[0]: line for line in out.splitlines()}
    for t in COMPOSED:  # listed apart, one segment per skill
        assert rows[t.name].split()[1] == "composed" and " | " in rows[t.name]


def _assert_merge_rows(data: dict, output: str) -> None:
    """Every merge row printed, with its storage, and its settings the validation split's best."""
    for name in ("uniform average", "task arithmetic", "TIES", "DARE-TIES", "Twin-Merging"):
        m = data["methods"][name]
        assert 0 < m["stored_bytes"] and m["experts_bytes"] > 0 and f"| {name} |" in output
        meta = data["meta"]["merges"][name]
        if name == "uniform average":  # nothing to choose: no validation pass, and the notes say so
            assert meta["grid"] == [] and "(fixed)" in m["notes"]
            continue
        best = max(meta["grid"], key=lambda g: g["val_exact_match"])
        assert meta["chosen"] == best["params"] and "chosen on validation" in m["notes"]  # the validation split's best


# the tour and bench all score the same zoo: one xdist worker runs both, in this order, so bench all
# reads the tour's cached answers (make test runs pytest-xdist with --dist loadgroup)
@pytest.mark.xdist_group("small-zoo-tables")
@pytest.mark.slow
def test_demo_is_a_tour_with_one_table_per_family_and_a_cached_rerun(tmp_path, small_zoo):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    titles = ("The registry", "Baselines", "Routers", "Merges", "RouterRetriever", "Symbolic-MoE")
    assert all(f"## {t}" in r.output for t in titles) and r.output.count("*What this shows:*") == len(titles)
    assert "zoo preset `small`" in r.output and "moerge bench all" in r.output  # the preset named; the full run named
    data = json.loads((tmp_path / "r.json").read_text())
    listing = {e["name"]: e for e in data["registry"]}  # the registry: every expert, its task and its stored artifacts
    assert sorted(listing) == sorted(data["held_in"]) and all(listing[t]["tasks"] == [t] for t in data["held_in"])
    assert all({"phatgoose-gates", "arrow-prototypes"} <= set(listing[t]["artifacts"]) for t in data["held_in"])
    for name in ("base", "oracle", "best single expert", "PHATGOOSE", "GLIDER", "Arrow", "retrieval"):
        m = data["methods"][name]
        assert set(m["per_task"]) == set(data["held_in"] + data["held_out"]) and f"| {name} |" in r.output
    for name in ("PHATGOOSE", "GLIDER", "Arrow", "retrieval"):
        assert 0.0 <= data["methods"][name]["routing_accuracy"] <= 1.0
    assert "routing accuracy, held-in prompt tokens (%)" in r.output  # the tour counts every prompt token
    # GLIDER routes held-in prompts to their own expert (instruction embedding vs expert description), over the split
    assert data["methods"]["GLIDER"]["routing_accuracy"] > 0.8
    assert data["meta"]["routers"]["GLIDER"]["test_templates_in_preparation"]["expert_texts"] == 0
    _assert_merge_rows(data, r.output)
    twin = data["methods"]["Twin-Merging"]  # the spec's claim on this zoo: a dynamic merge recovers the experts
    assert twin["held_in_normalized"] > 80 and twin["routing_accuracy"] > 0.8
    assert twin["held_in_normalized"] > max(data["methods"][n]["held_in_normalized"] for n in ("task arithmetic", "TIES")) + 20
    retrieval = data["retrieval"]["methods"]  # RouterRetriever's Table 1 on the reduced retrieval suite
    for name in ("base (MiniLM)", "multi-task LoRA", "DatasetRouter", "RouterRetriever", "DatasetOracle", "InstanceOracle"):
        assert 0.0 <= retrieval[name]["ndcg_at_10"] <= 100.0 and f"| {name} |" in r.output
    sym = data["symbolic"]["methods"]  # Symbolic-MoE on the zoo's whole-model pool, without the per-query baseline
    assert {"best single model", "Symbolic-MoE", "majority vote of the recruited"} <= set(sym)
    assert sym["Symbolic-MoE"]["model_loads"] == sym["Symbolic-MoE"]["distinct_models"] + 1 and data["symbolic"]["speed"] is None
    assert (out / "report.md").read_text().startswith("# moerge demo") and (out / "cross_task.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun reads every answer from the cache and prints the same figures
    again = CliRunner().invoke(
        main, [*args[:3], "--json", str(tmp_path / "r2.json"), "--no-progress", "--no-retrieval", "--no-symbolic"]
    )
    assert again.exit_code == 0, again.output
    data2 = json.loads((tmp_path / "r2.json").read_text())
    assert data2["meta"]["eval_cache"]["misses"] == 0 and data2["meta"]["eval_cache"]["hits"] > 0
    for name, m in data["methods"].items():
        assert data2["methods"][name]["per_task"] == m["per_task"], name


@pytest.mark.xdist_group("small-zoo-tables")
@pytest.mark.slow
def test_bench_all_writes_the_full_tables_breakdown_and_control(tmp_path, small_zoo):
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "all",
            "--preset",
            "small",
            "--seeds",
            "0",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
            "--no-retrieval",
            "--no-symbolic",
        ],  # the tour's test covers those two; here the breakdown and the control
    )
    assert r.exit_code == 0, r.output
    assert "| base |" in r.output and "| oracle |" in r.output and "best single expert" in r.output
    assert "| PHATGOOSE |" in r.output and "| Twin-Merging |" in r.output
    full = json.loads((tmp_path / "r.json").read_text())  # every seed's run, the summary and the orderings
    assert full["seeds"] == [0] and full["n"] == 1 and set(full["runs"]) == {"0"}
    data = full["runs"]["0"]
    glider = full["summary"]["zoo"]["GLIDER"]["held-in normalised"]
    assert glider["values"] == [data["methods"]["GLIDER"]["held_in_normalized"]] and glider["sd"] == 0.0
    assert all(o["verdict"] == "one run: not tested" for o in full["orderings"])  # one seed: no ordering claimed
    assert "mean ± sd over n = 1" in r.output and (out / "seed-0" / "results.json").exists()
    for name in ("base", "oracle", "best single expert", "PHATGOOSE", "GLIDER", "Arrow", "retrieval"):
        m = data["methods"][name]
        assert {"held_in_normalized", "held_out_accuracy", "per_task"} <= set(m)
        assert set(m["per_task"]) == set(data["held_in"] + data["held_out"])
    groups = data["held_out_groups"]  # held-out by kind: one expert's skill in new words, or two experts' composed
    assert set(groups) == {"unseen phrasings", "compositions"} and sorted(sum(groups.values(), [])) == sorted(data["held_out"])
    assert "held-out: unseen phrasings (%)" in r.output and "held-out: compositions (%)" in r.output
    for g, tasks in groups.items():
        oracle = data["methods"]["oracle"]
        want = 100 * sum(oracle["per_task"][t] for t in tasks) / len(tasks) if tasks else None
        assert oracle["held_out_groups"][g] == want
    for name in ("PHATGOOSE", "GLIDER", "Arrow", "retrieval"):
        assert f"| {name} |" in r.output
        assert 0.0 <= data["methods"][name]["routing_accuracy"] <= 1.0
    # GLIDER routes held-in prompts to their own expert (instruction embedding vs expert description)
    assert data["methods"]["GLIDER"]["routing_accuracy"] > 0.9
    for name in ("GLIDER", "GLIDER (templates shared)"):  # α: the validation split's best, for every task
        g = data["meta"]["routers"][name]
        assert (
            g["alpha"] == float(max(g["alpha_validation"], key=lambda a: g["alpha_validation"][a])) and f"| {name} |" in r.output
        )
    assert data["meta"]["routers"]["GLIDER"]["test_templates_in_preparation"]["expert_texts"] == 0
    for name in ("PHATGOOSE", "GLIDER", "Arrow", "retrieval"):  # routing per token type, BOS apart; the column is inputs
        routing = data["meta"]["routers"][name]["routing"]
        assert set(routing["by_type"]) == {"bos", "instruction", "separator", "input", "arrow", "answer"}
        assert routing["by_type"]["input"] == data["methods"][name]["routing_accuracy"] and 0 <= routing["vote"] <= 1
    snr = data["meta"]["routers"]["PHATGOOSE"]["gate_snr"]
    assert -1 <= snr["different_experts"] <= 1 and -1 <= snr["same_expert_across_seeds"] <= 1
    assert data["meta"]["routers"]["GLIDER (templates shared)"]["test_templates_in_preparation"]["expert_texts"] > 0
    _assert_merge_rows(data, r.output)
    twin = data["methods"]["Twin-Merging"]
    # the spec's claim on this zoo: a dynamic merge recovers the experts; static merges do not
    assert twin["held_in_normalized"] > 80 and twin["routing_accuracy"] > 0.8
    assert twin["held_in_normalized"] > max(data["methods"][n]["held_in_normalized"] for n in ("task arithmetic", "TIES")) + 20
    assert "retrieval" not in data and "symbolic" not in data
    control = data["token_control"]  # the positive control for token routing (reduced size)
    best = control["best_single"]["held_out_segment_accuracy"]
    phatgoose = control["methods"]["PHATGOOSE"]
    assert phatgoose["held_out_segment_accuracy"] >= 2 * best and "| PHATGOOSE |" in r.output
    for floor in ("Arrow", "retrieval", "random gates (PHATGOOSE, keys replaced)", "uniform average", "task arithmetic", "TIES"):
        assert phatgoose["held_out_segment_accuracy"] > control["methods"][floor]["held_out_segment_accuracy"]
    assert phatgoose["routing_accuracy_inputs"] > control["chance_routing"]
    oracle = control["methods"]["per-token oracle router"]  # every position to its segment's expert
    # near the ceiling, as PHATGOOSE is: top-2 mixing can tie it or pass it by a prompt or two (seed 5: both 88.8)
    assert oracle["routing_accuracy_inputs"] == 100.0
    assert oracle["held_out_segment_accuracy"] >= max(2 * best, phatgoose["held_out_segment_accuracy"] - 5)
    reference = control["methods"]["class-mean keys (token labels; reference)"]  # one key per expert, from labels
    assert reference["routing_accuracy_inputs"] > control["chance_routing"]
    seed_report = (out / "seed-0" / "report.md").read_text()  # each seed's own table keeps its notes
    assert "density=" in seed_report and "chosen on validation" in seed_report and seed_report.startswith("# moerge bench all")
    assert (out / "report.md").read_text().startswith("# moerge bench all")
    assert (out / "seed-0" / "cross_task.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_rejects_an_unknown_router_row():
    r = CliRunner().invoke(main, ["demo", "--routers", "PHATGOOSE,nope"])
    assert r.exit_code != 0 and "nope" in r.output


@pytest.mark.slow
def test_route_prints_a_summary_and_writes_heatmap_json_and_spec(tmp_path, small_zoo):
    run = CliRunner().invoke
    png, spec = tmp_path / "route.png", tmp_path / "comp.json"
    prompt = small_zoo.test_split("sort")[0].prompt
    args = ["route", prompt, "--zoo", "small", "--router", "glider", "--expert", "sort", "--expert", "max", "--set", "steps=10"]
    r = run(main, [*args, "--png", str(png), "--save", str(spec), "--expect", "sort"])
    assert r.exit_code == 0, r.output
    assert "top expert per token" in r.output and "α=100" in r.output
    # the routing diagnostics: per token type (BOS apart), per layer on the items, the vote
    assert "top-1 routing by token type: bos → " in r.output and "; input → " in r.output and ", sort " in r.output
    assert "by layer (input tokens): layer 0 → " in r.output and "vote over input tokens: " in r.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = run(main, ["route", prompt, "--composition", str(spec), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{") :])
    assert data["experts"] == ["sort", "max"] and data["tokens"]
    assert {"bos", "instruction", "separator", "input", "arrow"} <= set(data["diagnostics"]["by_type"])
    assert len(data["kinds"]) == len(data["tokens"]) and data["diagnostics"]["expected"] is None
    bad = run(main, ["route", prompt, "--composition", str(spec), "--expect", "nope"])
    assert bad.exit_code != 0 and "'nope' is not among" in bad.output
    bad = run(main, ["route", prompt, "--zoo", "small", "--router", "nope"])
    assert bad.exit_code == 2 and "known routers" in bad.output
    bad = run(main, ["route", prompt, "--set", "top_k"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output


def test_bench_routing_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "routing",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--experts",
            "2,3",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["single LoRA"]["forward_ratio"] == 1.0
    assert {"base (no experts)", "PHATGOOSE top-2, E=2", "PHATGOOSE top-2, E=3", "every expert computed, E=3"} <= set(rows)
    assert "× single LoRA" in r.output
    bad = CliRunner().invoke(main, ["bench", "routing", "--experts", "a,b"])
    assert bad.exit_code != 0 and "--experts" in bad.output


def test_bench_routing_and_mixed_batches_run_on_a_pretrained_base_folder(tmp_path, llama_folder):
    """--base: the timings on a saved model (the real LM is `--base real`) with random experts on
    its projections; the report names the model and its own size, not the random Llama's."""
    out = tmp_path / "routing.json"
    args = ["bench", "routing", "--base", str(llama_folder), "--experts", "2", "--batch", "2", "--seq", "4", "--repeats", "1"]
    r = CliRunner().invoke(main, [*args, "--json", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["config"]["hidden"] == 32 and data["config"]["layers"] == 2 and str(llama_folder) in data["model"]
    assert {row["name"] for row in data["rows"]} >= {"single LoRA", "PHATGOOSE top-2, E=2"} and str(llama_folder) in r.output
    args = ["bench", "serving", "--no-http", "--base", str(llama_folder), "--ks", "1,2", "--batch", "2", "--new-tokens", "2"]
    r = CliRunner().invoke(main, [*args, "--repeats", "1", "--json", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["mixed"]["config"]["hidden"] == 32 and "hidden 32, 2 layers" in r.output
    bad = CliRunner().invoke(main, ["bench", "routing", "--base", str(tmp_path / "nope"), "--no-progress"])
    assert bad.exit_code != 0 and "nope" in bad.output and "Traceback" not in bad.output


def test_bench_serving_mixed_batches_report_ratios_and_plot(tmp_path):
    out, png = tmp_path / "serving.json", tmp_path / "mixed.png"
    args = ["bench", "serving", "--no-http", "--hidden", "32", "--layers", "1", "--batch", "8", "--new-tokens", "2"]
    r = CliRunner().invoke(main, [*args, "--repeats", "1", "--json", str(out), "--png", str(png), "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["mixed"]["rows"]
    got = {(row["variant"], row["k"]) for row in rows}
    assert {("moerge", k) for k in (1, 2, 4, 8)} <= got and ("peft adapter_names", 8) in got
    assert ("peft set_adapter per request", 8) in got
    assert next(row for row in rows if row["variant"] == "moerge" and row["k"] == 1)["vs_single"] == 1.0
    assert png.stat().st_size > 1000 and "vs single" in r.output
    bad = CliRunner().invoke(main, ["bench", "serving", "--no-http", "--batch", "6", "--no-progress"])
    assert bad.exit_code == 2 and "divide the batch" in bad.output


def test_serve_rejects_bad_settings_before_starting_anything():
    r = CliRunner().invoke(main, ["serve", "--registry", ".", "--replicas", "0"])
    assert r.exit_code == 2 and "--replicas" in r.output


def test_bench_serving_decode_steps_eager_vs_compiled_and_the_floor(tmp_path):
    """--compile times decode steps both ways and against the weight-read floor (the eager
    backend keeps this quick on CI; inductor / CUDA graphs are what a GPU run uses)."""
    out = tmp_path / "decode.json"
    args = ["bench", "serving", "--no-http", "--hidden", "32", "--layers", "1", "--batch", "4", "--new-tokens", "4"]
    r = CliRunner().invoke(
        main,
        [*args, "--ks", "1,2", "--repeats", "1", "--compile", "--compile-backend", "eager", "--json", str(out), "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())["mixed"]["decode"]
    # step times are differences of two timings (no timed assertions: on a busy CI machine noise
    # can push a tiny model's below 0); the fields are there, and the floor comes from a real measurement
    assert isinstance(d["eager_ms_per_step"], float) and isinstance(d["compiled_ms_per_step"], float)
    assert "compiled_speedup" in d and d["floor_ms"] > 0 and d["bandwidth_gb_s"] > 0
    assert "decode steps" in r.output and "floor" in r.output
    bad = CliRunner().invoke(main, ["bench", "serving", "--no-http", "--dtype", "fp8", "--no-progress"])
    assert bad.exit_code == 2 and "unknown dtype" in bad.output


def test_serve_refuses_bad_device_settings_before_starting_anything():
    for extra, message in [
        (["--gpus-per-worker", "1.5"], "--gpus-per-worker"),
        (["--device", "cuda"], "--gpus-per-worker"),
        (["--dtype", "fp8"], "unknown dtype"),
    ]:
        r = CliRunner().invoke(main, ["serve", "--registry", ".", *extra])
        assert r.exit_code == 2 and message in r.output, (extra, r.output)


@pytest.mark.xdist_group("small-zoo-tables")  # after bench all, which builds the same control-small suite
def test_bench_control_scores_chosen_rows_with_phatgoose_settings(tmp_path):
    """`moerge bench control` on the reduced suite: the routers and merges asked for, PHATGOOSE
    with its settings (here gradient accumulation, few steps), the oracle, on the validation prompts."""
    out = tmp_path / "control.json"
    args = ["bench", "control", "--preset", "control-small", "--split", "val", "--routers", "phatgoose", "--merges", "ties"]
    r = CliRunner().invoke(main, [*args, "--set", "steps=5", "--set", "accumulate=2", "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["split"] == "val" and data["phatgoose"] == {"steps": 5, "accumulate": 2}
    assert {"PHATGOOSE", "TIES", "per-token oracle router"} <= set(data["methods"]) and "Arrow" not in data["methods"]
    assert "| PHATGOOSE |" in r.output and data["methods"]["per-token oracle router"]["routing_accuracy_inputs"] == 100.0
    bad = CliRunner().invoke(main, ["bench", "control", "--routers", "nope"])
    assert bad.exit_code == 2 and "unknown row" in bad.output
    bad = CliRunner().invoke(main, [*args, "--set", "no_such_setting=1", "--device", "cpu"])
    assert bad.exit_code != 0 and "no_such_setting" in bad.output


def test_bench_perf_runs_each_speed_benchmark_with_its_defaults(tmp_path, monkeypatch):
    from moerge.cli import bench as bench_cli

    calls = {}
    for part in bench_cli.PERF_PARTS:
        cmd = getattr(bench_cli, f"bench_{part}")
        monkeypatch.setattr(cmd, "callback", lambda _part=part, **kw: calls.setdefault(_part, kw))
    r = CliRunner().invoke(main, ["bench", "perf", "--json-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert list(calls) == list(bench_cli.PERF_PARTS)
    assert (
        calls["symbolic"]["json_path"] == str(tmp_path / "symbolic.json") and calls["symbolic"]["queries"] == 48
    )  # its defaults
    assert "per-query model loading" in r.output and "per-request adapter switching" in r.output
