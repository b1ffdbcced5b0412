"""Same seed, same machine → the same figures (issue 26), and the spread arithmetic of
``moerge bench all`` (mean ± sd over seeds; orderings claimed only beyond their paired spread)."""

from __future__ import annotations

import pytest

from moerge.bench import spread


def _run(values: dict[str, float]) -> spread.Figures:
    return {"zoo": {name: {"held-in normalised": v} for name, v in values.items()}}


def test_summary_is_mean_and_sample_sd_with_every_value_kept():
    runs = [_run({"a": 10.0, "b": 1.0}), _run({"a": 12.0, "b": 2.0}), _run({"a": 14.0})]
    s = spread.summarize(runs)["zoo"]
    assert s["a"]["held-in normalised"] == {"values": [10.0, 12.0, 14.0], "mean": 12.0, "sd": 2.0, "n": 3}
    assert s["b"]["held-in normalised"]["n"] == 2  # a cell counts the runs that have it
    assert spread.cell(s["a"]["held-in normalised"]) == "12.0 ± 2.0"
    assert "| a | 12.0 ± 2.0 |" in spread.markdown(spread.summarize(runs), "zoo")


def test_an_ordering_is_claimed_only_when_every_seed_agrees_and_the_mean_exceeds_the_spread():
    clear = [_run({"a": 10 + d, "b": 5.0}) for d in (0.0, 0.5, 1.0)]  # differences 5, 5.5, 6
    assert spread.compare(clear, "zoo", "held-in normalised", "a", "b")["verdict"] == "a > b"
    assert spread.compare(clear, "zoo", "held-in normalised", "b", "a")["verdict"] == "b < a"
    mixed = [_run({"a": a, "b": 5.0}) for a in (6.0, 4.0, 7.0)]  # one seed the other way
    assert spread.compare(mixed, "zoo", "held-in normalised", "a", "b")["verdict"] == "no difference measured"
    noisy = [_run({"a": a, "b": 5.0}) for a in (5.1, 9.0, 5.2)]  # same sign, but sd (2.2) > mean (1.4)
    got = spread.compare(noisy, "zoo", "held-in normalised", "a", "b")
    assert got["verdict"] == "no difference measured" and got["diff_sd"] > abs(got["diff_mean"])
    assert spread.compare(clear[:1], "zoo", "held-in normalised", "a", "b")["verdict"] == "one run: not tested"
    assert spread.compare(clear, "zoo", "held-in normalised", "a", "nope") is None


def test_figures_read_every_table_of_a_bench_all_run():
    result = {
        "methods": {
            "GLIDER": {
                "held_in_normalized": 90.0,
                "held_out_accuracy": 0.25,
                "routing_accuracy": 0.9,
                "held_out_groups": {"unseen phrasings": 50.0, "compositions": None},
            }
        },  # fmt: skip
        "retrieval": {
            "methods": {
                "single: a": {"ndcg_at_10": 70.0, "per_domain": {"a": 80.0, "b": 60.0}, "routing_accuracy": None},
                "single: b": {"ndcg_at_10": 72.0, "per_domain": {"a": 70.0, "b": 74.0}, "routing_accuracy": None},
                "RouterRetriever": {"ndcg_at_10": 73.0, "per_domain": {"a": 79.0, "b": 67.0}, "routing_accuracy": 60.0},
            }
        },  # fmt: skip
        "symbolic": {"methods": {"Symbolic-MoE": {"accuracy": 80.0, "groups": {"ordering": 70.0}}}},
        "token_control": {
            "methods": {"PHATGOOSE": {"held_out_segment_accuracy": 90.0, "routing_accuracy_inputs": 60.0}},
            "best_single": {"expert": "letters", "held_out_segment_accuracy": 26.0},
        },  # fmt: skip
    }
    f = spread.figures(result)
    assert f["zoo"]["GLIDER"] == {"held-in normalised": 90.0, "held-out (%)": 25.0, "held-out: unseen phrasings (%)": 50.0,
                                  "routing (%)": 90.0}  # fmt: skip
    assert f["retrieval"]["best single expert (on test)"]["mean nDCG@10"] == 72.0  # the single expert best on test
    assert f["symbolic"]["Symbolic-MoE"] == {"overall (%)": 80.0, "ordering (%)": 70.0}
    assert f["control"]["best single expert"] == {"held-out segments right (%)": 26.0}
    claims = {(c["a"], c["b"]) for c in spread.orderings([f, f])}
    assert ("RouterRetriever", "best single expert (on test)") in claims and ("PHATGOOSE", "best single expert") in claims


@pytest.mark.slow
def test_the_same_seed_twice_builds_the_same_zoo_and_the_same_table(tmp_path):
    """The smallest zoo built twice from scratch with one seed (two caches): the same expert
    weights, byte for byte, and the same answers, so every figure of the table is equal."""
    from moerge import zoo as zoo_mod
    from moerge.bench.quality import evaluate_zoo

    tiny = zoo_mod.with_overrides(
        "small",
        base_steps=40,
        n_train=200,
        n_val=16,
        n_test=16,
        lora_max_steps=20,
        dense_max_steps=5,
        min_steps=10,
        eval_every=10,
        seed=3,
        prepared=("arrow",),
    )  # fmt: skip  (retrieval's bank only embeds)
    built = [zoo_mod.load(tiny, cache_dir=tmp_path / f"cache{i}", progress=False) for i in (0, 1)]
    from moerge.composer import compose

    for z in built:  # PHATGOOSE's gates trained and stored in each registry, as a build prepares them (fewer steps:
        # what is compared is their bytes, not their quality)
        compose(z.base_path, z.registry.select(names=z.held_in), "phatgoose", data=z.expert_data, progress=False,
                dtype="float32", seed=3, steps=10)  # fmt: skip
    # every stored weight file's sha256 (adapter_config.json names the base's folder, which differs)
    files = [{(r.name, f): h for r in z.registry.list() for f, h in r.files.items() if f.endswith(".safetensors")} for z in built]
    assert files[0] == files[1] and len(files[0]) >= 8
    # and the routers' artifacts (the build's Arrow prototypes, the gates trained above), byte for byte
    import hashlib

    def artifacts(z):  # noqa: ANN001, ANN202
        return {(n, a["producer"], a["config_hash"]): hashlib.sha256((z.registry_path / "experts" / n / "1" / a["file"]).read_bytes()).hexdigest()
                for n in z.held_in for a in z.registry.list_artifacts(n)}  # fmt: skip

    prepared = [artifacts(z) for z in built]
    assert prepared[0] == prepared[1] and {k[1] for k in prepared[0]} == {"phatgoose-gates", "arrow-prototypes"}
    reports = [evaluate_zoo(z, ["Arrow"], ["TIES"], progress=False, breakdown=False) for z in built]
    rows = [{r.name: (r.per_task, r.routing_accuracy) for r in rep.rows} for rep in reports]
    assert rows[0] == rows[1] and {"base", "oracle", "Arrow", "TIES"} <= set(rows[0])


def test_determinism_compares_weights_bitwise_and_the_table_by_its_largest_move():
    from moerge.bench import determinism

    a = {"weights": {"x": "h1", "y": "h2"}, "rows": {"base": {"per_task": {"t": 0.5, "u": 0.25}, "held_in_normalized": 40.0}}}
    b = {"weights": {"x": "h1", "y": "other"}, "rows": {"base": {"per_task": {"t": 0.5, "u": 0.5}, "held_in_normalized": 42.5}}}
    got = determinism.compare(a, b)
    assert got["weights_equal"] == "1/2" and got["cells_changed"] == 1 and got["cells"] == 2
    assert got["max_cell_move"] == 25.0 and got["max_row_move"] == 2.5
    assert determinism.compare(a, a)["cells_changed"] == 0
    result = {
        "reference": "r",
        "probes": {"r": {"capability": "AVX512", "threads": 2}, "p": {"capability": "AVX2", "threads": 2, **got}},
    }
    assert "| p | AVX2 | 2 | 1/2 | 1/2 | 25.0 | 2.5 |" in determinism.markdown(result)


def test_bench_determinism_names_an_unknown_probe():
    from click.testing import CliRunner

    from moerge.cli import main

    r = CliRunner().invoke(main, ["bench", "determinism", "--probe", "avx3"])
    assert r.exit_code != 0 and "avx3" in r.output and "AVX2 kernels" in r.output


def test_moerge_zoo_seed_selects_another_build_of_every_named_suite(monkeypatch):
    from moerge.bench import prebuild
    from moerge.runtime import zoo_seed

    monkeypatch.delenv("MOERGE_ZOO_SEED", raising=False)
    assert zoo_seed() is None and prebuild._control("control-small").seed == 0
    monkeypatch.setenv("MOERGE_ZOO_SEED", "5")
    assert zoo_seed() == 5 and prebuild._control("control-small").seed == 5
    assert prebuild._retrieval("retrieval-small").lora.seed == 5
    monkeypatch.setenv("MOERGE_ZOO_SEED", "five")
    with pytest.raises(ValueError, match="MOERGE_ZOO_SEED"):
        zoo_seed()


@pytest.mark.xdist_group("grouping-check")
def test_xdist_groups_keep_their_tests_on_one_worker(request) -> None:
    """`--dist loadgroup` renames a grouped test's node id to ``...@group`` on the worker; when it
    does not (pytest 9.2 with pytest-xdist 3.8), groups are silently split over the workers."""
    if getattr(request.config.option, "loadgroup", False):  # set on pytest-xdist workers under --dist loadgroup
        assert request.node.nodeid.endswith("@grouping-check"), request.node.nodeid


@pytest.fixture(scope="module")
def _module_resource() -> dict[str, int]:
    return {"setups": 1}


def test_a_module_fixture_keeps_its_module_on_one_worker(request, _module_resource) -> None:
    """tests/conftest.py groups the tests of a module that uses a module fixture (unless already
    grouped), so the fixture is set up once: the node id carries the module's group."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@module-test_reproducible"), request.node.nodeid
    assert _module_resource == {"setups": 1}
