"""Symbolic-MoE on the zoo's whole-model pool: the pool (specialists by reference, group models,
the trained aggregator, validation with skills), the nearest-question annotator, the majority
fallback when the aggregator answers nothing, and the serving service's batch window (one load
per recruited model per window) — without Ray. The demo's rows are tested in test_cli."""

from __future__ import annotations

import asyncio

import pytest

from moerge.registry import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(small_zoo):
    from moerge.zoo.symbolic import load_pool

    return load_pool(small_zoo, progress=False)


@pytest.fixture
def pool_registry(pool, tmp_path):
    """A copy of the pool's registry (profiles are written into it)."""
    Registry(pool.root / "registry").snapshot(tmp_path / "registry")
    return tmp_path / "registry"


def test_pool_holds_specialists_by_reference_group_models_and_an_aggregator(pool, small_zoo):
    reg = pool.registry
    records = {r.name: r for r in reg.list(kind="model")}
    assert set(records) == {*pool.models, pool.aggregator} and pool.aggregator not in pool.models
    assert {f"group-{g}" for g, _ in pool.preset.groups} <= set(pool.models)
    for task in small_zoo.held_in:  # the zoo's dense fine-tunes, not copied
        assert records[task].storage == "reference" and reg.model_folder(task) == small_zoo.dense_path(task)
    val, test = pool.validation(), pool.test()
    assert all(v["keywords"] for v in val.values()) and not any("keywords" in v for v in test.values())
    assert not {v["question"] for v in val.values()} & {v["question"] for v in test.values()}
    assert {v["group"] for v in test.values()} == {*(g for g, _ in pool.preset.groups), "unseen phrasings"}
    # the group models learned their tasks (the base answers ~none of them); training metrics are
    # recorded. 16 validation questions a task, short training: 0.44 to 1.0 over seeds 0 and 1
    for group, info in pool.meta["groups"].items():
        assert min(info["val_exact_match"].values()) > 0.25, (group, info)


class FakeEmbedder:
    """Bag of words over a fixed vocabulary (enough to test nearest-question voting)."""

    def __init__(self, words):
        self.words = words

    def encode(self, texts):
        import torch

        return torch.tensor([[float(w in t.split()) for w in self.words] + [1e-3] for t in texts])


def test_nearest_question_annotator_keeps_keywords_two_of_five_neighbours_name():
    from moerge.symbolic import NearestQuestionAnnotator

    labelled = {"sort a b": ["sorting", "ordering"], "sort c d": ["sorting"], "reverse a b": ["reversal", "ordering"],
                "count a": ["counting"], "count b": ["counting"], "max 1 2": ["maximum"]}  # fmt: skip
    ann = NearestQuestionAnnotator(
        labelled, neighbours=3, min_votes=2, embedder=FakeEmbedder(["sort", "reverse", "count", "max", "a", "b"])
    )
    got = ann(["sort a b please", "count a b"])
    assert got[0] == ["sorting", "ordering"]  # neighbours: sort a b, sort c d, reverse a b
    assert got[1] == ["counting"]
    only_instruction = NearestQuestionAnnotator(labelled, neighbours=1, min_votes=1, text=lambda q: q.split(" : ")[0],
                                                embedder=FakeEmbedder(["sort", "reverse", "count", "max"]))  # fmt: skip
    assert only_instruction(["reverse : sort sort"]) == [["reversal", "ordering"]]
    with pytest.raises(ValueError, match="min_votes"):
        NearestQuestionAnnotator(labelled, neighbours=2, min_votes=3, embedder=FakeEmbedder(["a"]))


def test_the_final_answer_falls_back_to_the_majority_vote_when_the_aggregator_says_nothing(pool, pool_registry, monkeypatch):
    import moerge.symbolic.moe as moe_mod
    from moerge.registry import Registry
    from moerge.symbolic import NearestQuestionAnnotator, SymbolicMoE
    from moerge.symbolic.recruit import Recruitment

    val = pool.validation()
    annotator = NearestQuestionAnnotator({v["question"]: v["keywords"] for v in val.values()})
    moe = SymbolicMoE(Registry(pool_registry), pool.models, annotator, aggregator=pool.aggregator, max_new_tokens=8)
    test = list(pool.test().values())[:4]
    questions = {f"q{i}": v["question"] for i, v in enumerate(test)}
    recruited = {q: Recruitment(["reverse", "reverse", "sort"], None, "uniform") for q in questions}
    real = moe_mod.aggregate

    def silent_on_q0(qs, *args, **kw):  # the real aggregator, but it says nothing for q0
        out, stats = real(qs, *args, **kw)
        return {q: ("" if q == "q0" else a) for q, a in out.items()}, stats

    monkeypatch.setattr(moe_mod, "aggregate", silent_on_q0)
    out = moe.run(questions, recruited=recruited)
    r0 = out["results"]["q0"]
    assert r0["final_from"] == "majority" and r0["final"] == r0["majority"] == r0["answers"][0]  # reverse answered twice
    assert {r["final_from"] for q, r in out["results"].items() if q != "q0"} == {"aggregator"}
    assert out["model_loads"] == 3  # reverse, sort, the aggregator
    naive = moe.run(questions, recruited=recruited, per_query=True)
    assert naive["model_loads"] == 4 * len(questions)
    assert [r["answers"] for r in naive["results"].values()] == [r["answers"] for r in out["results"].values()]


def test_service_batch_window_loads_each_recruited_model_once(pool, pool_registry):
    """Concurrent requests inside one window are recruited together: one load per recruited
    model and one for the aggregator, whatever the number of requests; the answers are those of
    one run over the window's questions."""
    from moerge.serving.symbolic import SymbolicService, SymbolicSettings

    test = list(pool.test().values())
    settings = SymbolicSettings(registry=str(pool_registry), validation=pool.validation(), models=pool.models,
                                aggregator=pool.aggregator, instruction_sep=" : ", aggregate_template="compact",
                                max_new_tokens=10, max_wait_s=0.5, threads=1)  # fmt: skip
    svc = SymbolicService(settings)
    groups = [[test[0]["question"], test[15]["question"]], [test[30]["question"]], [test[45]["question"], test[60]["question"]]]

    async def traffic():
        return await asyncio.gather(*(svc.answer(g) for g in groups))

    results = asyncio.run(traffic())
    assert svc.stats.windows == 1 and svc.stats.last["requests"] == 3
    last = svc.stats.last
    assert last["model_loads"] == last["distinct_models"] + 1
    flat = [r for rs in results for r in rs]
    assert [len(rs) for rs in results] == [2, 1, 2]
    assert all(r["window"]["questions"] == 5 and r["aggregator"] == pool.aggregator for r in flat)
    again = svc.moe.run({f"{j}:{i}": q for j, g in enumerate(groups) for i, q in enumerate(g)}, progress=False)
    assert [r["text"] for r in flat] == [r["final"] for r in again["results"].values()]
    assert all(sum(e["weight"] for e in r["experts"]) == pytest.approx(1.0) for r in flat)

    async def mixed():  # two generation settings in one window: one sub-batch each
        return await asyncio.gather(svc.answer(groups[0], max_new_tokens=4), svc.answer(groups[1], max_new_tokens=10))

    asyncio.run(mixed())
    assert svc.stats.windows == 2 and svc.stats.last["sub_batches"] == 2
