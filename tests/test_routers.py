"""Routers and compose(): the equivalences of the PHATGOOSE/GLIDER spec (§4), Arrow's prototypes,
the retrieval baseline, preparation caching, configs, explain and saved compositions.

Fast tests use synthetic tensors; the rest run on the `small` zoo (a copy of its registry, so
artifacts written here never touch the shared cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import lora_config, peft_with_adapters

import moerge
from moerge.adapters import layers
from moerge.registry import Registry
from moerge.routers import (
    GliderConfig,
    PhatgooseConfig,
    Recorder,
    arrow_prototypes,
    get_router,
    make_router,
    train_gates,
)
from moerge.routers.token import phatgoose_logits, standardise, topk_renormalised, topk_softmax

FAST = dict(steps=15, batch_size=16)  # gate training kept short in tests


# ------------------------------------------------------------------ the maths, on tensors


def test_softmax_over_topk_logits_equals_full_softmax_topk_renormalised():
    torch.manual_seed(0)
    logits = torch.randn(50, 7, 16) * 4
    for k in (1, 2, 4, 16):
        idx, w = topk_softmax(logits, k)
        dense = torch.zeros_like(logits).scatter(-1, idx, w)
        assert torch.allclose(dense, topk_renormalised(logits, k), atol=2e-6)


def test_phatgoose_scores_are_invariant_to_shifting_and_scaling_gates_and_inputs():
    torch.manual_seed(0)
    u, V = torch.randn(10, 64), torch.randn(5, 64)
    ref = phatgoose_logits(u, standardise(V))
    shifted_gates = standardise(V * torch.tensor([3.0, 0.2, 7.0, 1.0, 0.5])[:, None] + torch.randn(5, 1) * 5)
    # exact up to LayerNorm's eps (1e-5 against a variance of 0.04 at the 0.2 scale)
    assert torch.allclose(phatgoose_logits(u, shifted_gates), ref, atol=1e-3)
    assert torch.allclose(phatgoose_logits(4.0 * u - 2.5, standardise(V)), ref, atol=1e-3)
    assert ref.abs().max() <= 64**0.5 + 1e-3  # sqrt(d)·Pearson correlation is bounded by sqrt(d)

    # LayerNorm on both sides, spelled out (biased variance, eps 1e-5)
    def ln(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)

    explicit = ln(u) @ ln(V).T / 64**0.5
    assert torch.allclose(ref, explicit, atol=1e-5)


def test_arrow_prototype_is_the_top_right_singular_vector_of_delta_w(small_zoo):
    expert = moerge.adapters.load_lora("sort", registry=small_zoo.registry)
    protos = arrow_prototypes(expert)
    for module, f in list(expert.modules.items())[:4]:
        top = torch.linalg.svd(f.delta()).Vh[0]
        assert abs(float(protos[module] @ top)) == pytest.approx(1.0, abs=1e-4), module


def test_router_configs_round_trip_and_bad_fields_are_named():
    r = make_router("glider", alpha=5.0, top_k=3, query_separator=" : ")
    again = make_router("glider", r.config.to_json())
    assert again.config == r.config and isinstance(again.config, GliderConfig)
    assert r.config.effective_alpha == 5.0
    assert make_router("glider", alpha_preset="unseen").config.effective_alpha == 3.0
    with pytest.raises(ValueError, match="top_k"):
        make_router("phatgoose", top_k=0)
    with pytest.raises(ValueError, match="alpah"):
        make_router("glider", alpah=3)
    with pytest.raises(KeyError, match="known routers"):
        get_router("nope")


# ------------------------------------------------------------------------- on the zoo


@pytest.fixture
def zoo_reg(tmp_path, small_zoo):
    Registry(small_zoo.registry_path).snapshot(tmp_path / "reg")
    return moerge.Registry(tmp_path / "reg")


@pytest.fixture
def clean_reg(tmp_path, small_zoo):
    """A copy of the small zoo's registry without derived artifacts: the demo and other tests
    store theirs in the shared zoo, and what a test counts as prepared must start from nothing."""
    shutil.copytree(small_zoo.registry_path, tmp_path / "reg", ignore=shutil.ignore_patterns("artifacts", "group-artifacts"))
    reg = moerge.Registry(tmp_path / "reg")
    with reg._write() as con:
        con.execute("DELETE FROM artifacts")
        con.execute("DELETE FROM group_artifacts")
    return reg


def _logits(model, zoo, prompts):
    tok = zoo.tokenizer()
    with torch.no_grad():
        return model(**tok(prompts, return_tensors="pt", padding=True)).logits


def _prompts(zoo, n=6):
    return [e.prompt for t in ("sort", "max", "reverse_uppercase") for e in zoo.test_split(t)[: n // 3]]


def test_one_expert_composition_equals_the_plain_peft_lora(small_zoo, zoo_reg):
    from peft import PeftModel

    prompts = _prompts(small_zoo)
    for router in ("phatgoose", "arrow"):
        m = moerge.compose(
            small_zoo.base_path,
            zoo_reg.select(names=["sort"]),
            router,
            data=small_zoo.expert_data,
            **(FAST if router == "phatgoose" else {}),
        )
        got = m.forward(prompts).logits
        peft = PeftModel.from_pretrained(small_zoo.load_base(), small_zoo.lora_path("sort")).eval()
        assert torch.allclose(got, _logits(peft, small_zoo, prompts), atol=1e-5), router


def test_glider_with_alpha_zero_equals_phatgoose_exactly(small_zoo, zoo_reg):
    sel = zoo_reg.select(names=["sort", "reverse", "uppercase", "max"])
    prompts = _prompts(small_zoo)
    pg = moerge.compose(small_zoo.base_path, sel, "phatgoose", data=small_zoo.expert_data, **FAST)
    gl = moerge.compose(small_zoo.base_path, sel, "glider", data=small_zoo.expert_data, alpha=0.0, **FAST)
    assert all(r.computed == [] for r in gl.prepared if r.producer == "phatgoose-gates")  # gates reused, not retrained
    assert torch.equal(pg.forward(prompts).logits, gl.forward(prompts).logits)
    assert pg.generate(prompts, max_new_tokens=6) == gl.generate(prompts, max_new_tokens=6)


def test_glider_with_huge_alpha_is_static_topk_by_instruction_cosine(small_zoo, zoo_reg):
    sel = zoo_reg.select(names=["sort", "reverse", "uppercase", "max", "count"])
    m = moerge.compose(small_zoo.base_path, sel, "glider", data=small_zoo.expert_data, alpha=1e4, top_k=2, **FAST)
    prompts = _prompts(small_zoo)
    routing = m.route(prompts)
    want = routing.info["cosine"].topk(2, dim=-1).indices.sort(-1).values  # [B, 2]
    rec = Recorder()
    routing.hook.recorder = rec
    with m.routed(routing), torch.no_grad():
        m.model(**m._encode(prompts))
    assert len(rec.calls) == len(layers(m.model))
    for _, idx, _ in rec.calls:  # every module, every token: the cosine top-2
        assert torch.equal(idx.sort(-1).values, want[:, None, :].expand_as(idx))


def test_glider_expert_texts_written_by_a_causal_lm_from_registered_examples(small_zoo, zoo_reg):
    """GLIDER's expert texts written by a model (spec §2.3): the describing LM is shown the first k
    registered example prompts, through its chat template; greedy, written once per expert; what
    it wrote is what GLIDER embeds. A random tiny Llama over MiniLM's vocabulary writes nonsense,
    which is enough to check the mechanics."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moerge.routers import HFDescriber
    from moerge.routers.embedding import default_embedder_path, load_embedder
    from moerge.routers.glider import first_sentence

    tok = AutoTokenizer.from_pretrained(default_embedder_path())
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)  # fmt: skip
    lm = LlamaForCausalLM(cfg).eval()
    calls = []
    generate = lm.generate
    lm.generate = lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw)
    describer = HFDescriber(lm, tok, k=2, max_new_tokens=12)
    names = ["sort", "reverse", "max"]
    records = [zoo_reg.get(n) for n in names]
    assert all(len(r.examples) > 2 for r in records)  # the zoo registers examples; the describer sees two
    request = describer.request(records[0].examples[:2])
    assert request.startswith("<user> Here are 2 examples of the same kind of request") and request.endswith("<assistant>")
    assert f"- {records[0].examples[0]}\n- {records[0].examples[1]}\n" in request and records[0].examples[2] not in request
    texts = [describer(r) for r in records]
    assert all(t and "\n" not in t for t in texts) and len(calls) == 3
    assert [describer(r) for r in records] == texts and len(calls) == 3  # written once each
    m = moerge.compose(small_zoo.base_path, zoo_reg.select(names=names), "glider", data=small_zoo.expert_data,
                       expert_text="describer", describer=describer, **FAST)  # fmt: skip
    assert m.router.expert_texts == texts and len(calls) == 3
    embedder = load_embedder(m.router.config.embedder)
    assert torch.allclose(m.router.expert_embeddings, embedder.encode(texts), atol=1e-5)
    assert first_sentence("\n  Sort the letters. Then more.\nnext") == "Sort the letters."
    with pytest.raises(ValueError, match="needs a describer"):
        moerge.compose(small_zoo.base_path, zoo_reg.select(names=names), "glider", data=small_zoo.expert_data,
                       expert_text="describer", **FAST)  # fmt: skip
    with pytest.raises(ValueError, match="sort.*no registered examples"):
        describer(records[0].model_copy(update={"examples": []}))


def test_gate_training_lowers_the_experts_loss_and_freezes_everything_else(small_zoo):
    base, tok = small_zoo.load_base(), small_zoo.tokenizer()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    expert = moerge.adapters.load_lora("reverse", registry=small_zoo.registry)
    lora_before = {m: f.A.clone() for m, f in expert.modules.items()}
    out = train_gates(base, tok, expert, small_zoo.expert_data("reverse"), PhatgooseConfig(steps=40, batch_size=16))
    first, last = sum(out.losses[:5]) / 5, sum(out.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert set(out.gates) == set(expert.modules) and all(v.abs().sum() > 0 for v in out.gates.values())
    assert not layers(base), "the training wrapper must be detached"
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    assert all(torch.equal(lora_before[m], f.A) for m, f in expert.modules.items())


def test_adding_an_expert_prepares_that_expert_alone(small_zoo, clean_reg):
    first = moerge.compose(
        small_zoo.base_path, clean_reg.select(names=["sort", "max"]), "glider", data=small_zoo.expert_data, **FAST
    )
    assert {r.producer: sorted(r.computed) for r in first.prepared} == {
        "phatgoose-gates": ["max@1", "sort@1"],
        "glider-text-embedding": ["max@1", "sort@1"],
    }
    again = moerge.compose(
        small_zoo.base_path, clean_reg.select(names=["sort", "max", "count"]), "glider", data=small_zoo.expert_data, **FAST
    )
    assert {r.producer: (r.computed, sorted(r.cached)) for r in again.prepared} == {
        "phatgoose-gates": (["count@1"], ["max@1", "sort@1"]),
        "glider-text-embedding": (["count@1"], ["max@1", "sort@1"]),
    }
    # a different gate-training config is a different artifact key: prepared anew
    other = moerge.compose(
        small_zoo.base_path, clean_reg.select(names=["sort"]), "phatgoose", data=small_zoo.expert_data, steps=5, batch_size=4
    )
    assert other.prepared[0].computed == ["sort@1"]


def test_phatgoose_without_training_data_says_what_to_pass(small_zoo, zoo_reg):
    with pytest.raises(ValueError, match="data="):
        moerge.compose(small_zoo.base_path, zoo_reg.select(names=["sort"]), "phatgoose", seed=12345)


def test_retrieval_routes_each_input_to_the_expert_of_its_nearest_example(small_zoo, zoo_reg):
    m = moerge.compose(small_zoo.base_path, zoo_reg.select(names=["sort", "max", "count"]), "retrieval")
    # the records' own example prompts are in the bank: each retrieves its own expert
    texts = [zoo_reg.get(n).examples[0] for n in ("max", "sort", "count")]
    routing = m.route(texts)
    assert routing.granularity == "sequence"
    assert routing.weights.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # one-hot, top-1


def test_explain_records_every_prefill_and_decode_step(small_zoo, zoo_reg, tmp_path):
    m = moerge.compose(
        small_zoo.base_path, zoo_reg.select(names=["sort", "max", "reverse"]), "phatgoose", data=small_zoo.expert_data, **FAST
    )
    prompt = small_zoo.test_split("sort")[0].prompt
    ex = m.explain(prompt, max_new_tokens=5)
    n_prompt = len(small_zoo.tokenizer()(prompt).input_ids)
    assert len(ex.tokens) == n_prompt + len(small_zoo.tokenizer()(ex.output, add_special_tokens=False).input_ids)
    assert set(ex.modules) == set(layers(m.model))
    for w in ex.weights.values():
        assert w.shape == (len(ex.tokens), 3)
        assert torch.allclose(w.sum(-1), torch.ones(len(ex.tokens)), atol=1e-5)
        assert int((w > 0).sum(-1).max()) <= 2  # top-2
    assert ex.top_expert().shape == (2, len(ex.tokens))
    assert "top expert per token" in ex.summary()
    assert ex.plot(tmp_path / "route.png").stat().st_size > 1000
    assert set(ex.to_json()) >= {"tokens", "modules", "expert_share"}


def test_saved_composition_reloads_with_the_same_outputs(small_zoo, zoo_reg, tmp_path):
    m = moerge.compose(
        small_zoo.base_path, zoo_reg.select(names=["sort", "max"]), "glider", data=small_zoo.expert_data, alpha=7.0, **FAST
    )
    path = m.save(tmp_path / "comp.json")
    again = moerge.load_composition(path)  # artifacts come from the registry: no data needed
    assert again.spec == m.spec and again.router.config.alpha == 7.0
    prompts = _prompts(small_zoo)
    assert torch.equal(m.forward(prompts).logits, again.forward(prompts).logits)
    bad = tmp_path / "bad.json"
    bad.write_text('{"base": 1}')
    with pytest.raises(ValueError, match="composition spec"):
        moerge.load_composition(bad)


def test_compose_rejects_non_lora_experts_and_names_them(small_zoo, zoo_reg):
    with pytest.raises(ValueError, match="sort-dense"):
        moerge.compose(small_zoo.base_path, zoo_reg.select(names=["sort", "sort-dense"]), "arrow")


def test_gate_training_accumulates_gradients_over_batches(small_zoo):
    """``accumulate``: each step sums the gradients of that many batches (the effective batch is
    their product); the loss recorded per step is their mean; it is part of the gates' key."""
    base, tok = small_zoo.load_base(), small_zoo.tokenizer()
    expert = moerge.adapters.load_lora("reverse", registry=small_zoo.registry)
    calls = []
    handle = base.register_forward_hook(lambda m, a, k, out: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = train_gates(
            base, tok, expert, small_zoo.expert_data("reverse"), PhatgooseConfig(steps=3, batch_size=4, accumulate=5)
        )
    finally:
        handle.remove()
    assert calls == [4] * 15 and len(out.losses) == 3 and all(0 < x < 20 for x in out.losses)
    assert "accumulate" not in PhatgooseConfig().gate_key()  # gates trained before the option keep their key
    assert PhatgooseConfig(accumulate=5).gate_key()["accumulate"] == 5


def test_the_embedder_encodes_each_distinct_text_once_and_returns_every_row():
    """GLIDER embeds each prompt's instruction part: a few texts repeated over a batch. Each
    distinct text goes through MiniLM once; every input still gets its row, in order."""
    from moerge.routers.embedding import load_embedder

    emb = load_embedder()
    seen = []
    encode = emb.model.encode

    def counting(texts, **kw):  # noqa: ANN001, ANN202
        seen.append(list(texts))
        return encode(texts, **kw)

    texts = ["sort :", "max of :", "sort :", "reverse :", "max of :", "sort :"]
    emb.model.encode = counting
    try:
        got = emb.encode(texts)
    finally:
        del emb.model.encode
    assert seen == [["sort :", "max of :", "reverse :"]] and got.shape == (6, emb.dim)
    torch.testing.assert_close(got, emb.encode(["sort :", "max of :", "reverse :"])[[0, 1, 0, 2, 1, 0]], atol=0, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_arrow_equals_peft_create_arrow_model_on_the_same_adapters(small_zoo, tmp_path):
    """moerge's Arrow against PEFT's (``create_arrow_model``, 0.21) on three LoRAs on the zoo's
    base: the same prototypes (PEFT's power iteration converges here: each ΔW has one dominant
    direction) and the same logits, at top-k 1, 2 and 3 — which differ from each other, so the
    comparison tells the routings apart."""
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    shutil.copytree(small_zoo.base_path, base)
    reg = moerge.Registry(tmp_path / "reg")
    folders = []
    for i in range(3):
        m = peft_with_adapters(
            LlamaForCausalLM.from_pretrained(base), {"default": lora_config(["q_proj", "v_proj"], r=4)}, seed=i
        )
        with torch.no_grad():  # one dominant singular direction per ΔW
            for n, p in m.named_parameters():
                if "lora_A" in n:
                    p[0].mul_(10)
                elif "lora_B" in n:
                    p[:, 0].mul_(10)
        m.save_pretrained(tmp_path / f"a{i}")
        cfg = json.loads((tmp_path / f"a{i}" / "adapter_config.json").read_text())
        (tmp_path / f"a{i}" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
        folders.append(str(tmp_path / f"a{i}"))
        reg.register(tmp_path / f"a{i}", name=f"e{i}")
    prompts = _prompts(small_zoo)
    enc = small_zoo.tokenizer()(prompts, return_tensors="pt", padding=True)
    outputs = {}
    for k in (1, 2, 3):
        cfg = ArrowConfig(top_k=k, router_temperature=1.0, rng_seed=0)
        theirs = create_arrow_model(LlamaForCausalLM.from_pretrained(base).eval(), folders, cfg).eval()
        with torch.no_grad():
            want = theirs(**enc).logits
        ours = moerge.compose(base, reg.select(names=["e0", "e1", "e2"]), "arrow", top_k=k)
        got = ours.forward(prompts).logits
        mask = enc["attention_mask"].bool()
        torch.testing.assert_close(got[mask], want[mask], atol=2e-4, rtol=0)
        outputs[k] = got[mask]
        if k == 2:
            layers = {n.split(".lora_arrow")[0].removeprefix("base_model.model."): m
                      for n, m in theirs.named_modules() if isinstance(m, ArrowLoraLinearLayer)}  # fmt: skip
            assert set(layers) == set(ours.router.keys)
            for name, layer in layers.items():
                cos = torch.nn.functional.cosine_similarity(layer.prototypes.float(), ours.router.keys[name].float(), dim=-1)
                assert (cos.abs() > 1 - 1e-5).all(), name  # the same directions, up to sign
    assert (outputs[1] - outputs[2]).abs().max() > 1e-2 and (outputs[2] - outputs[3]).abs().max() > 1e-2

    # GenKnowSub (PEFT's use_gks): two general LoRAs' mean factors subtracted from every expert's
    general = []
    for i in range(2):
        m = peft_with_adapters(
            LlamaForCausalLM.from_pretrained(base), {"default": lora_config(["q_proj", "v_proj"], r=4)}, seed=10 + i
        )
        m.save_pretrained(tmp_path / f"g{i}")
        general.append(str(tmp_path / f"g{i}"))
        reg.register(tmp_path / f"g{i}", name=f"g{i}")
    cfg = ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0, use_gks=True)
    theirs = create_arrow_model(LlamaForCausalLM.from_pretrained(base).eval(), folders, cfg, general_adapter_paths=general).eval()
    with torch.no_grad():
        want = theirs(**enc).logits
    ours = moerge.compose(base, reg.select(names=["e0", "e1", "e2"]), "arrow", top_k=2, general=["g0", "g1"])
    got = ours.forward(prompts).logits
    torch.testing.assert_close(got[mask], want[mask], atol=2e-4, rtol=0)
    assert (got[mask] - outputs[2]).abs().max() > 1e-3  # the subtraction changed the answer
    m = peft_with_adapters(LlamaForCausalLM.from_pretrained(base), {"default": lora_config(["q_proj", "v_proj"], r=2)})
    m.save_pretrained(tmp_path / "g-r2")
    reg.register(tmp_path / "g-r2", name="g-r2")
    with pytest.raises(ValueError, match="GenKnowSub: the general LoRAs \\['g-r2'\\] do not adapt .* with e0's rank 4"):
        moerge.compose(base, reg.select(names=["e0", "e1"]), "arrow", general=["g0", "g-r2"])
