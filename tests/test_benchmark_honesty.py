"""The demo's routers are prepared without the test split (issue 16): no test prompt occurs in
anything a router is prepared from, the headline GLIDER's expert texts share no instruction
template with the test prompts, and the template-sharing variant is reported as such."""

from __future__ import annotations

import pytest

from moerge.registry import Registry


def test_no_test_prompt_occurs_in_what_a_router_is_prepared_from(small_zoo):
    from moerge.bench.quality import ZOO_ROUTERS, preparation_texts

    z = small_zoo
    test_prompts = {e.prompt for t in z.held_in + z.held_out for e in z.test_split(t)}
    for label, (name, cfg, _) in ZOO_ROUTERS.items():
        for kind, texts in preparation_texts(z, name, cfg).items():
            if kind == "data":  # prompts: set membership
                assert not set(texts) & test_prompts, (label, kind)
            else:  # free text (an expert description, examples quoted in it): substring
                blob = "\n".join(texts)
                assert not [p for p in test_prompts if p in blob], (label, kind)
    for rec in z.registry.list():  # the registered examples (retrieval's bank, GLIDER's variant's texts)
        assert not set(rec.examples) & test_prompts, rec.name


def test_the_headline_glider_shares_no_template_with_the_test_prompts_and_the_variant_does(small_zoo):
    from moerge.bench.quality import ZOO_ROUTERS, template_overlap, test_templates

    z = small_zoo
    name, cfg, _ = ZOO_ROUTERS["GLIDER"]
    assert template_overlap(z, name, cfg)["expert_texts"] == 0
    name, cfg, _ = ZOO_ROUTERS["GLIDER (templates shared)"]
    shared = template_overlap(z, name, cfg)["expert_texts"]
    held_in_templates = {e.instruction for t in z.held_in for e in z.test_split(t)}
    assert shared >= len(held_in_templates) // 2  # the registered examples quote most held-in templates
    assert len(test_templates(z)) > shared  # the held-out phrasings are in no expert text
    assert template_overlap(z, "arrow", {}) == {}  # Arrow: the weights alone


def test_token_types_label_bos_instruction_separator_inputs_arrow_answer():
    from moerge.bench.diagnostics import token_types

    assert token_types("sort the letters : c a b =>", "a b c") == [
        "bos", "instruction", "instruction", "instruction", "separator", "input", "input", "input", "arrow",
        "answer", "answer", "answer",
    ]  # fmt: skip
    import pytest

    with pytest.raises(ValueError, match="is not"):
        token_types("no separator here", "x")


def test_gate_signal_to_noise_tells_seed_noise_from_expert_identity():
    import torch

    from moerge.bench.diagnostics import gate_signal_to_noise

    g = torch.Generator().manual_seed(0)
    identity = torch.randn(4, 64, generator=g)  # each expert's own direction
    a = {"m": identity + 0.1 * torch.randn(4, 64, generator=g)}
    b = {"m": identity + 0.1 * torch.randn(4, 64, generator=g)}
    snr = gate_signal_to_noise(a, b)
    assert snr["same_expert_across_seeds"] > 0.95 and abs(snr["different_experts"]) < 0.3
    noisy = gate_signal_to_noise({"m": torch.randn(4, 64, generator=g)}, {"m": torch.randn(4, 64, generator=g)})
    assert abs(noisy["same_expert_across_seeds"]) < 0.3  # seeds disagree: no signal


def test_routing_breakdown_counts_token_types_apart_and_votes_per_example(small_zoo, tmp_path):
    """The retrieval router decides once per prompt: every token of an example gets the same
    expert, so every token type's accuracy is the share of examples routed right, BOS is counted
    apart, and the vote equals it."""

    import moerge
    from moerge.bench.diagnostics import routing_breakdown

    z = small_zoo
    Registry(z.registry_path).snapshot(tmp_path / "reg")  # artifacts go to a copy
    model = moerge.compose(z.base_path, moerge.Registry(tmp_path / "reg").select(names=z.held_in), "retrieval")
    examples = [e for t in ("sort", "max") for e in z.test_split(t)[:5]]
    own = [model.experts.index(t) for t in ("sort", "max") for _ in range(5)]
    out = routing_breakdown(model, examples, own)
    assert set(out["by_type"]) == {"bos", "instruction", "separator", "input", "arrow", "answer"}
    assert out["tokens"]["bos"] == 10 and out["tokens"]["separator"] == 10
    assert len({round(v, 6) for v in out["by_type"].values()}) == 1 and out["vote"] == out["by_type"]["input"]
    assert out["by_type"]["input"] == 1.0  # retrieval routes these held-in prompts right
    wrong = routing_breakdown(model, examples, [(i + 1) % len(model.experts) for i in own])
    assert wrong["by_type"]["input"] == 0.0 and wrong["vote"] == 0.0


def test_control_suite_examples_map_own_items_copy_foreign_ones_and_score_per_segment():
    import random

    from moerge.zoo.control import VOCAB_OF, held_in, held_out, segment_accuracy

    rng = random.Random(0)
    for _ in range(50):
        e = held_in(rng, "digits")
        for (vocab, want), src in zip(e.segments, e.prompt.removesuffix(" =>").split(" | "), strict=True):
            items = src.split()
            assert {VOCAB_OF[c] for c in items} == {vocab}
            if vocab != "digits":
                assert want == src  # foreign segments are copied
            else:
                assert want.split() == [str((int(c) + 1) % 10) for c in items]
    mixed = held_out(rng)
    assert len({v for v, _ in mixed.segments}) == 3
    right = " | ".join(w for _, w in mixed.segments)
    half = " | ".join([mixed.segments[0][1], "x", mixed.segments[2][1]])
    assert segment_accuracy([right, half], [mixed, mixed]) == 5 / 6


def test_control_options_foreign_segments_and_a_validation_set_apart_from_the_test(tmp_path):
    import random

    from moerge.zoo.control import ControlPreset, ControlSuite, held_in

    rng = random.Random(1)
    assert all(len(held_in(rng, "letters", max_foreign=0).segments) == 1 for _ in range(20))
    assert max(len(held_in(rng, "letters", max_foreign=1).segments) for _ in range(50)) == 2
    # the default keeps the key of suites built before the option; another value is another suite
    p = ControlPreset("control")
    assert p.key() != ControlPreset("control", max_foreign=1).key()
    suite = ControlSuite(tmp_path, ControlPreset("t", n_test=60), {})
    val, test = suite.val_held_out(), suite.test_held_out()
    assert len(val) == len(test) == 60 and not {e.prompt for e in val} & {e.prompt for e in test}


def test_the_per_token_oracle_routes_each_position_to_the_segment_its_next_token_belongs_to():
    import torch

    from moerge.bench.control import SegmentOracle, oracle_schedule
    from moerge.zoo.control import Example, build_tokenizer

    experts = ["letters", "digits", "capitals", "late-letters"]
    ex = Example("a b | 3 7 =>", "b c | 4 8", (("letters", "b c"), ("digits", "4 8")))
    short = Example("A B =>", "J I", (("capitals", "J I"),))
    enc, sched = oracle_schedule(build_tokenizer(), [ex, short], experts)
    # position:     BOS a  b  |  3  7  => b  c  |  4  8 (predicts EOS)
    assert sched[0].tolist()[:12] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    T = enc["input_ids"].shape[1]
    assert T == 7 and enc["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]  # left padding
    assert set(sched[1].tolist()) == {2}  # one capitals segment
    hook = SegmentOracle(sched, T)

    class Layer:
        module_name = "m"

    first = hook(Layer, torch.zeros(2, T, 4))
    assert first.index.shape == (2, T, 1) and torch.equal(first.index[..., 0], sched[:, :T])
    for step in range(3):  # each decode step reads the next column
        got = hook(Layer, torch.zeros(2, 1, 4))
        assert torch.equal(got.index[:, 0, 0], sched[:, T + step]) and torch.all(got.weight == 1)


def test_class_mean_keys_average_each_vocabularys_standardised_inputs_over_unpadded_items():
    """The reference keys: per module, the standardised mean of the standardised module input over
    each expert's item tokens, whatever the batching and left padding."""
    import copy
    from contextlib import contextmanager
    from types import SimpleNamespace

    import torch
    from conftest import experts_of, lora_config, peft_with_adapters, tiny_llama

    from moerge.adapters import attach, layers, use_weights
    from moerge.bench.control import class_mean_keys
    from moerge.composer.compose import encode_prompts
    from moerge.routers.token import standardise
    from moerge.zoo.control import VOCAB_OF, build_tokenizer

    tok = build_tokenizer()
    experts = ["letters", "digits", "capitals", "late-letters"]
    pm = peft_with_adapters(tiny_llama(vocab=len(tok)), {e: lora_config(["q_proj", "down_proj"]) for e in experts})
    hf = copy.deepcopy(pm).unload().eval()
    attach(hf, experts_of(pm, experts))
    names = list(layers(hf))
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1]])

    @contextmanager
    def routed(_routing):  # a fixed mix, the same for every token
        with use_weights(hf, lambda layer, x: weights.expand(*x.shape[:-1], 4)):
            yield

    model = SimpleNamespace(model=hf, experts=experts, router=SimpleNamespace(keys={n: torch.zeros(4, 1) for n in names}),
                            _encode=lambda ps: encode_prompts(tok, ps), route=lambda ps: None, routed=routed)  # fmt: skip
    eot = {tok.convert_tokens_to_ids(c): experts.index(v) for c, v in VOCAB_OF.items()}
    prompts = ["a b | 3 7 =>", "A B C | 9 =>", "k t | c | 1 2 3 4 =>", "J =>", "s s s | e =>"]
    got = class_mean_keys(model, prompts, eot, batch_size=2)  # batches of unequal lengths: left padding
    sums, count, seen = {}, torch.zeros(4), {}
    hooks = [layers(hf)[n].register_forward_pre_hook(lambda _m, i, n=n: seen.__setitem__(n, i[0])) for n in names]
    with torch.inference_mode():
        for p in prompts:  # one at a time, no padding
            ids = tok(p, return_tensors="pt")["input_ids"]
            with routed(None):
                hf(input_ids=ids)
            for t, token in enumerate(ids[0].tolist()):
                if token in eot:
                    count[eot[token]] += 1
                    for n in names:
                        sums.setdefault(n, torch.zeros(4, seen[n].shape[-1]))[eot[token]] += standardise(seen[n][0, t])
    for h in hooks:
        h.remove()
    assert count.tolist() == [4, 7, 4, 5] and set(got) == set(names)
    for n in names:
        assert torch.allclose(got[n], standardise(sums[n] / count[:, None]), atol=1e-4), n
    with pytest.raises(ValueError, match="'capitals'"):  # a vocabulary without items has no mean
        class_mean_keys(model, ["a b | 3 =>"], eot)


def test_explanation_diagnostics_pool_top1_choices_per_token_type_layer_and_vote():
    import torch

    from moerge.composer.explain import Explanation

    kinds = ["bos", "instruction", "input", "input", "answer"]
    one = torch.eye(2)  # row 0: expert a, row 1: expert b
    #                   bos     instr   input   input   answer
    m0 = torch.stack([one[1], one[0], one[0], one[0], one[1]])  # layer 0
    m1 = torch.stack([one[1], one[1], one[0], one[1], one[1]])  # layer 1
    ex = Explanation("p", "o", list("vwxyz"), ["a", "b"], "token",
                     {"model.layers.0.mlp.up_proj": m0, "model.layers.1.mlp.up_proj": m1}, {}, kinds)  # fmt: skip
    d = ex.diagnostics("a")
    assert d["content_tokens"] == "input" and d["vote"] == "a"
    assert d["by_type"]["input"] == {"tokens": 2, "top": "a", "share": 0.75, "accuracy": 0.75}
    assert d["by_type"]["bos"]["top"] == "b" and d["by_type"]["bos"]["accuracy"] == 0.0
    assert d["by_type"]["instruction"]["accuracy"] == 0.5
    assert d["by_layer"]["0"]["accuracy"] == 1.0 and d["by_layer"]["1"]["accuracy"] == 0.5
    assert "accuracy" not in ex.diagnostics()["by_type"]["input"]
    assert "input → a 75%, a 75%" in ex.summary(expected="a")
    with pytest.raises(ValueError, match="'c' is not among"):
        ex.diagnostics("c")


def test_the_demo_prebuild_runs_beside_and_gives_its_thread_back(tmp_path):
    import torch

    from moerge.bench.prebuild import Background, cached, maybe_start

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bg = Background(tmp_path, None, None, threads=2)  # builds nothing: exits at once
        assert torch.get_num_threads() == 1  # one thread each while both run
        bg.wait()
        assert bg.returncode == 0 and bg.poll() and torch.get_num_threads() == 2
        assert "usage" not in (tmp_path / "prebuild.log").read_text()
        assert not cached(tmp_path, "retrieval-small", None) and not cached(tmp_path, None, "control-small")
        assert cached(tmp_path, None, None)
        assert maybe_start(tmp_path, "retrieval-small", "control-small", threads=1) is None  # no second core to use
        assert maybe_start(tmp_path, None, None, threads=2) is None  # nothing to build
    finally:
        torch.set_num_threads(before)
