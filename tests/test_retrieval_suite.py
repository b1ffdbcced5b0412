"""The embedded retrieval suite, its trained query-encoder experts, the composed RouterRetriever
encoder and Table 1 (issue 14), on the reduced preset (three domains, 150 documents each)."""

from __future__ import annotations

import json

import pytest
import torch

from moerge import compose
from moerge.retrieval import load_beir
from moerge.retrieval.router_retriever import RouterRetriever
from moerge.zoo.retrieval import DOMAINS, MULTITASK, RETRIEVAL_PRESETS, domain_beir, load_suite, read_snapshot


@pytest.fixture(scope="module")
def suite():
    """The reduced suite in the default cache (the demo test reuses it); tests that store
    anything work on :func:`reg_copy`."""
    return load_suite("retrieval-small", progress=False)


@pytest.fixture()
def reg_copy(suite, tmp_path):
    """A copy of the suite's registry (pilots stored by one test must not leak into another)."""

    from moerge.registry import Registry

    Registry(suite.root / "registry").snapshot(tmp_path / "registry")
    return Registry(tmp_path / "registry")


def test_snapshot_has_six_domains_of_at_least_a_thousand_real_documents():
    rows = read_snapshot()
    assert list(rows) == list(DOMAINS)
    for d, docs in rows.items():
        assert len(docs) >= 1000, d
        assert len({r["id"] for r in docs}) == len(docs), d
    with pytest.raises(ValueError, match="unknown retrieval domain 'jargn'.*jargon"):
        read_snapshot(("jargn",))


def test_domain_splits_are_disjoint_deterministic_and_graded():
    p = RETRIEVAL_PRESETS["retrieval"]
    rows = read_snapshot(("jargon",))["jargon"]
    corpus, queries, qrels = domain_beir(rows, p)
    again = domain_beir(list(reversed(rows)), p)
    assert (corpus, queries, qrels) == again  # order of the snapshot does not matter
    assert len(corpus) == p.docs and {s: len(v) for s, v in qrels.items()} == {
        "test": p.n_test,
        "dev": p.n_dev,
        "train": p.n_train,
    }
    splits = [set(v) for v in qrels.values()]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    grades = [g for judged in qrels["test"].values() for g in judged.values()]
    assert set(grades) == {1, 2} and all(sum(g == 2 for g in j.values()) == 1 for j in qrels["test"].values())
    assert all(doc["title"] == "" for doc in corpus.values())  # a headword title would give the answer away


def test_suite_is_written_in_the_beir_layout_with_trained_registered_experts(suite):
    for d in suite.domains:
        corpus, queries, qrels = load_beir(suite.data_path(d), "test")
        assert len(corpus) == suite.preset.docs and len(qrels) == suite.preset.n_test
        assert len(suite.index(d)) == len(corpus)
    names = {r.name for r in suite.registry.list()}
    assert names == {*suite.domains, MULTITASK}
    cfg = json.loads((suite.root / "experts" / "python" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32 and sorted(cfg["target_modules"]) == ["query", "value"]
    assert suite.meta["losses"][MULTITASK]["steps"] > suite.meta["losses"]["python"]["steps"]


def test_in_batch_loss_is_cross_entropy_over_the_batchs_distinct_positives():
    from moerge.retrieval.train import in_batch_loss

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    d = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)  # queries 0 and 2 share document 1
    pos = torch.tensor([1, 0, 1])
    logits = q @ d.T / 0.05
    manual = -(logits[[0, 1, 2], pos] - logits.logsumexp(1)).mean()
    torch.testing.assert_close(in_batch_loss(q, d, pos, 0.05), manual)


def test_training_lowers_the_contrastive_loss_of_its_queries(tmp_path):
    """A few epochs on 24 queries: the trained LoRA ranks its positives above the batch's others
    better than the base does (the loss is wired to the query encoder, documents frozen)."""
    from moerge.retrieval.encoder import ExpertEncoder
    from moerge.retrieval.train import QueryLoraConfig, in_batch_loss, train_query_lora
    from moerge.routers.embedding import default_embedder_path

    rows = read_snapshot(("jargon",))["jargon"][:24]
    base = ExpertEncoder()
    docs = base.embed([r["doc"] for r in rows])
    queries = [r["query"] for r in rows]
    pos = list(range(len(rows)))
    before = float(in_batch_loss(base.embed(queries), docs, torch.tensor(pos), 0.05))
    stats = train_query_lora(default_embedder_path(), queries, pos, docs, tmp_path / "lora",
                             QueryLoraConfig(epochs=6, batch=8, lr=2e-3), progress=False)  # fmt: skip
    from moerge.registry import Registry

    reg = Registry(tmp_path / "reg")
    reg.register(tmp_path / "lora", "jargon-toy")
    after = float(in_batch_loss(ExpertEncoder(None, reg.select()).embed(queries, "jargon-toy"), docs, torch.tensor(pos), 0.05))
    assert stats["steps"] == 18 and after < before


def test_composed_encoder_routes_embeds_in_mixed_batches_and_loads_its_pilots(suite, reg_copy, monkeypatch):
    data = {d: suite.data_path(d) for d in suite.domains}
    enc = compose(None, reg_copy.select(names=suite.domains), router="router_retriever", data=data, rebuild=True)
    assert enc.computed == suite.domains and set(enc.experts) == set(suite.domains)
    _, test_q, _ = suite.load("jargon", "test")
    texts = list(test_q.values())[:10]
    routes = enc.route(texts)
    assert all(set(r["similarities"]) <= set(suite.domains) and r["expert"] in r["similarities"] for r in routes)
    torch.testing.assert_close(enc.embed(texts), enc.encoder.embed(texts, [r["expert"] for r in routes]))
    torch.testing.assert_close(enc.embed(texts, "__base__"), enc.encoder.embed(texts, None))
    why = enc.explain(texts[0])
    assert why.expert == routes[0]["expert"] and all(p["dataset"] in suite.domains for ps in why.pilots.values() for p in ps)
    assert routes[0]["expert"] in str(why)
    # a second composition finds the pilots in the registry: nothing is scored again
    monkeypatch.setattr(RouterRetriever, "score_experts", lambda *a, **k: pytest.fail("scored again"))
    again = compose(None, reg_copy.select(names=suite.domains), router="router_retriever")
    assert again.computed == [] and [r["expert"] for r in again.route(texts)] == [r["expert"] for r in routes]


def test_router_retriever_settings_are_validated_and_pilots_are_required(suite, reg_copy):
    experts = reg_copy.select(names=suite.domains)
    with pytest.raises(ValueError, match="agg"):
        compose(None, experts, router="router_retriever", agg="median")
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        compose(None, experts, router="router_retriever", tie="drop")
    with pytest.raises(ValueError, match="no stored RouterRetriever pilots.*data="):
        compose(None, experts, router="router_retriever", ties="first")  # pilots are stored per tie policy


def test_an_expert_for_another_encoder_is_refused_by_name(suite, reg_copy, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    other = BertModel(
        BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64, vocab_size=100)
    )
    other.save_pretrained(tmp_path / "other-encoder")
    get_peft_model(other, LoraConfig(r=4, target_modules=["query", "value"])).save_pretrained(tmp_path / "alien")
    reg_copy.register(tmp_path / "alien", "alien", base=tmp_path / "other-encoder")
    with pytest.raises(
        ValueError, match="expert alien@1 was trained for encoder .*other-encoder.*compose it with its own encoder"
    ):
        compose(None, reg_copy.select(names=["python", "alien"]), router="router_retriever", data={})
    assert {r.name for r in reg_copy.list()} == {*suite.domains, MULTITASK, "alien"}  # nothing changed


def test_table_one_rows_and_the_oracle_ordering(suite):
    from moerge.bench.retrieval import format_table, run

    result = run(suite=suite, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    singles = [f"single: {d}" for d in suite.domains]
    assert {"base (MiniLM)", "multi-task LoRA", "DatasetRouter", "ClassificationHeadRouter", "RouterRetriever",
            "DatasetOracle", "InstanceOracle", *singles} <= set(rows)  # fmt: skip
    inst = rows["InstanceOracle"]["ndcg_at_10"]
    for name in ("DatasetRouter", "ClassificationHeadRouter", "RouterRetriever", "DatasetOracle", *singles):
        assert rows[name]["ndcg_at_10"] <= inst + 1e-9, name  # the per-query ceiling over the pool
    assert rows["DatasetOracle"]["routing_accuracy"] == 100.0
    rr = rows["RouterRetriever"]
    for d in suite.domains:  # the end-to-end mixed-batch run agrees with the per-expert table
        assert abs(rr["per_domain_end_to_end"][d] - rr["per_domain"][d]) < 1.0
    assert rows["ClassificationHeadRouter"]["chosen_on_dev"]["weight_decay"] in (0.0, 1e-3, 1e-2, 1e-1)
    assert "RouterRetriever" in format_table(result)


def test_embedding_service_batches_concurrent_requests_by_expert_in_one_forward(suite, reg_copy):
    """What a /v1/embeddings worker does: requests arriving together (an expert, the base,
    ``auto``) form one batch, embedded in one mixed forward; unknown models are named."""
    import asyncio

    from moerge.serving.embeddings import EmbeddingService, EmbeddingSettings
    from moerge.serving.types import UnknownExpert

    compose(None, reg_copy.select(names=suite.domains), router="router_retriever",
            data={d: suite.data_path(d) for d in suite.domains})  # fmt: skip  # stores the pilots
    svc = EmbeddingService(EmbeddingSettings(registry=str(reg_copy.root), experts=list(suite.domains),
                                             max_wait_s=0.2, search={"python": str(suite.data_path("python"))}))  # fmt: skip
    assert set(svc.models) == {*suite.domains, "__base__", "auto"}
    with pytest.raises(UnknownExpert, match="unknown model 'pyton'.*did you mean 'python'"):
        svc.check_model("pyton")
    _, q, _ = suite.load("python", "test")
    texts = list(q.values())[:6]

    async def go():
        return await asyncio.gather(
            svc.embed(texts[:2], "jargon"), svc.embed(texts[2:4], "__base__"), svc.embed(texts[4:], "auto")
        )

    (e1, x1), (e2, x2), (e3, x3) = asyncio.run(go())
    assert svc.batches == 1 and svc.texts == 6  # one forward for three requests and three kinds of model
    assert x1 == ["jargon"] * 2 and x2 == ["__base__"] * 2 and set(x3) <= set(suite.domains)
    torch.testing.assert_close(torch.tensor(e1), svc.encoder.embed(texts[:2], "jargon"), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(e3), svc.encoder.embed(texts[4:], x3), atol=1e-5, rtol=0)
    hits = asyncio.run(svc.search(texts[:1], "auto", "python", 5))
    assert len(hits[0]["hits"]) == 5 and hits[0]["hits"][0]["score"] >= hits[0]["hits"][-1]["score"]


def test_cli_retrieval_eval_with_the_router_prints_every_expert_and_the_routed_row(suite, reg_copy):
    from click.testing import CliRunner

    from moerge.cli import main

    data = str(suite.data_path("foldoc"))
    r = CliRunner().invoke(main, ["retrieval", "eval", "--data", data, "--router", "router_retriever"])
    assert r.exit_code == 2 and "--router needs --registry" in r.output
    r = CliRunner().invoke(main, ["retrieval", "eval", "--data", data, "--expert", "python"])
    assert r.exit_code == 2 and "go with --router" in r.output
    r = CliRunner().invoke(main, ["retrieval", "eval", "--data", data, "--router", "router_retriever",
                                  "--registry", str(reg_copy.root), "--pilots", str(suite.root / "data"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{") :])
    experts = [*suite.domains, MULTITASK]  # default: every LoRA of this encoder in the registry
    assert set(out["results"]) == {"base", "router_retriever", *(f"expert {e}" for e in experts)}
    assert sum(out["routed"].values()) == suite.preset.n_test
