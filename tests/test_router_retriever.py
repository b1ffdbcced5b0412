"""RouterRetriever's pilot library and routing rule (issue 14): the spec's Algorithm 1, its tie
and zero-score handling, mean (paper) vs max (code) aggregation, cosine vs dot, removal."""

from __future__ import annotations

import zlib

import pytest
import torch

from moerge.retrieval import Index, evaluate, load_beir, write_beir
from moerge.retrieval.router_retriever import Dataset, RouterRetriever, best_experts


def bag(texts):
    out = torch.zeros(len(texts), 32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.encode()) % 32] += 1.0
    return torch.nn.functional.normalize(out + 1e-6, dim=1)


class FakeEncoder:
    """Base embeddings = bag of words; expert e adds a fixed direction (enough to test the
    library's bookkeeping, which never looks inside the experts)."""

    experts = ["a", "b", "c"]

    def embed(self, texts, experts=None, batch_size=64):
        base = bag(list(texts))
        names = [experts] * len(texts) if experts is None or isinstance(experts, str) else list(experts)
        for i, e in enumerate(names):
            if e is not None:
                base[i, self.experts.index(e)] += 0.5
        return torch.nn.functional.normalize(base, dim=1)


def test_best_expert_drops_ties_and_zero_scores_unless_asked_to_keep_the_codes_bias():
    scores = {
        "a": {"q1": 0.9, "q2": 0.5, "q3": 0.0},
        "b": {"q1": 0.1, "q2": 0.5, "q3": 0.0},
        "c": {"q1": 0.0, "q2": 0.2, "q3": 0.0},
    }
    assert best_experts(scores, ["a", "b", "c"]) == {"q1": "a"}  # q2 tied, q3 all zero
    assert best_experts(scores, ["a", "b", "c"], ties="first") == {"q1": "a", "q2": "a", "q3": "a"}


def test_pilots_are_centroids_of_base_embeddings_of_each_best_expert_group():
    enc = FakeEncoder()
    rr = RouterRetriever(enc)
    queries = {"q1": "cats purr", "q2": "cats sleep", "q3": "stocks fell", "q4": "nobody wins"}
    scores = {"a": {"q1": 1.0, "q2": 0.7, "q3": 0.0, "q4": 0.0}, "b": {"q1": 0.0, "q2": 0.1, "q3": 0.8, "q4": 0.0}, "c": {}}
    data = Dataset(index=None, queries=queries, qrels={})  # scores given: no retrieval needed
    sizes = rr.add_dataset("sci", data, scores)
    assert sizes == {"a": 2, "b": 1} and rr.library.dropped == {"sci": 1}
    torch.testing.assert_close(
        rr.library.pilots["a"][0], bag(["cats purr", "cats sleep"]).mean(0)
    )  # base, not expert, embeddings
    torch.testing.assert_close(rr.library.pilots["b"][0], bag(["stocks fell"])[0])
    rr.add_dataset("fin", Dataset(None, {"x": "bond yields"}, {}), {"a": {"x": 0.2}, "b": {"x": 0.9}, "c": {"x": 0.0}})
    assert rr.library.pilots["b"].shape[0] == 2 and [p["dataset"] for p in rr.library.provenance["b"]] == ["sci", "fin"]
    rr.add_dataset("sci", data, scores)  # recomputing a dataset replaces its pilots, keeps the others
    assert [p["dataset"] for p in rr.library.provenance["b"]] == ["fin", "sci"] and rr.library.pilots["a"].shape[0] == 1
    rr.remove_expert("b")
    assert "b" not in rr.library.pilots and rr.route(["cats purr"]) == ["a"]


def test_mean_aggregation_is_the_papers_and_max_the_codes():
    enc = FakeEncoder()
    q = bag(["cats purr"])[0]
    far = -q
    mid = torch.nn.functional.normalize(q + torch.nn.functional.normalize(torch.ones(32), dim=0) * 3, dim=0)
    for agg, expected in (("max", "a"), ("mean", "b")):
        rr = RouterRetriever(enc, agg=agg)
        rr.library.add("a", q, "d1", 1)  # one pilot right on the query ...
        rr.library.add("a", far, "d2", 1)  # ... and one opposite it
        rr.library.add("b", mid, "d1", 1)
        assert rr.route(["cats purr"]) == [expected], agg
    with pytest.raises(ValueError, match="agg must be mean|max"):
        RouterRetriever(enc, agg="median")
    with pytest.raises(RuntimeError, match="pilot library is empty"):
        RouterRetriever(enc).route(["x"])


def test_dot_product_favours_tight_clusters_where_cosine_does_not():
    enc = FakeEncoder()
    q = bag(["cats purr"])[0]
    cos_rr, dot_rr = RouterRetriever(enc, sim="cos"), RouterRetriever(enc, sim="dot")
    for rr in (cos_rr, dot_rr):
        rr.library.add("a", 0.3 * q, "d", 5)  # a diverse group: its centroid is short, but points at q
        rr.library.add("b", torch.nn.functional.normalize(q + 0.6 * bag(["stocks fell"])[0], dim=0), "d", 5)
    assert cos_rr.route(["cats purr"]) == ["a"] and dot_rr.route(["cats purr"]) == ["b"]


@pytest.fixture
def toy(tmp_path):
    """A BEIR folder, a registry with two random LoRA experts on the bundled MiniLM, their
    ExpertEncoder and the base index."""
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer

    from moerge.registry import Registry
    from moerge.retrieval.encoder import ExpertEncoder
    from moerge.routers.embedding import default_embedder_path

    corpus = {f"d{i}": {"title": "", "text": t} for i, t in enumerate(
        ["cats purr when happy", "dogs bark at strangers", "stocks fell on tuesday", "bond yields rose sharply",
         "proteins fold into shapes", "enzymes speed up reactions"])}  # fmt: skip
    queries = {
        "t1": "why do cats purr",
        "t2": "market drop tuesday",
        "t3": "how do proteins fold",
        "s1": "dog barking",
        "s2": "yields rising",
    }
    qrels = {"train": {"t1": {"d0": 1}, "t2": {"d2": 1}, "t3": {"d4": 1}}, "test": {"s1": {"d1": 1}, "s2": {"d3": 1}}}
    root = write_beir(tmp_path / "toy", corpus, queries, qrels)
    reg = Registry(tmp_path / "reg")
    for i, name in enumerate(["x", "y"]):
        st = SentenceTransformer(default_embedder_path(), device="cpu")
        torch.manual_seed(i)
        lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], init_lora_weights=False)
        get_peft_model(st[0].auto_model, lora).save_pretrained(tmp_path / name)
        reg.register(tmp_path / name, name)
    enc = ExpertEncoder(None, reg.select(kind="lora"))
    corpus_, train_q, train_qrels = load_beir(root, "train")
    return root, reg, enc, Index.build(corpus_), train_q, train_qrels


def test_pilots_live_in_the_registry_incrementally(toy, monkeypatch):
    """Stored as artifacts of their experts: a second router loads them without scoring; a new
    dataset is the only one scored (incremental mode); removing an expert removes its pilots."""
    from moerge.retrieval.encoder import ExpertEncoder

    root, reg, enc, index, train_q, train_qrels = toy
    data = {"toy": Dataset(index, train_q, train_qrels)}
    first = RouterRetriever(enc, ties="first")
    assert first.build_or_load(reg, data) == ["toy"]
    second = RouterRetriever(enc, ties="first")
    monkeypatch.setattr(RouterRetriever, "score_experts", lambda *a, **k: pytest.fail("scored again"))
    assert second.build_or_load(reg, data) == []
    assert {e: p.shape for e, p in second.library.pilots.items()} == {e: p.shape for e, p in first.library.pilots.items()}
    for e in first.library.pilots:
        torch.testing.assert_close(second.library.pilots[e], first.library.pilots[e])
    monkeypatch.undo()
    more = {**data, "toy2": Dataset(index, {"t9": "cats and dogs"}, {"t9": {"d0": 1}})}
    assert RouterRetriever(enc, ties="first").build_or_load(reg, more) == ["toy2"]  # only the new dataset
    owner = next(iter(first.library.pilots))
    reg.remove(owner)
    rest = RouterRetriever(ExpertEncoder(None, reg.select(kind="lora")), ties="first")
    rest.load(reg, more)
    assert owner not in rest.library.pilots


def test_end_to_end_on_a_beir_folder_with_real_expert_encoders(toy):
    """Algorithm 1 with real retrieval: every expert is scored by trec_eval's nDCG@10 on the
    training queries, pilots come from the train split only, and test queries are routed and
    embedded by their expert in mixed batches."""
    root, reg, enc, index, train_q, train_qrels = toy
    rr = RouterRetriever(enc, ties="first")  # with two random experts, ties are common; keep every query
    scores = rr.score_experts(Dataset(index, train_q, train_qrels))
    assert set(scores) == {"x", "y"} and set(scores["x"]) == set(train_q)
    rr.build({"toy": Dataset(index, train_q, train_qrels)}, scores={"toy": scores})
    assert sum(p["queries"] for rows in rr.library.provenance.values() for p in rows) == 3
    _, test_q, test_qrels = load_beir(root, "test")
    routed = rr.route(list(test_q.values()))
    assert set(routed) <= {"x", "y"}
    emb = rr.embed(list(test_q.values()))
    torch.testing.assert_close(emb, enc.embed(list(test_q.values()), routed))
    res = evaluate(index.search(test_q, k=6, embeddings=emb), test_qrels)
    assert 0.0 <= res["ndcg@10"] <= 1.0
