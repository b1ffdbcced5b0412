"""The multi-expert layer against PEFT: scaling rules, ΔW, mixed batches, generate with KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, detached_base, experts_of, ids, lora_config, peft_with_adapters, tiny_gpt2, tiny_llama

from moerge.adapters import (
    Assignment,
    LoraExpert,
    LoraFactors,
    MultiExpertLinear,
    attach,
    attach_slots,
    detach,
    layers,
    load_expert,
    lowrank_from_delta,
    lowrank_from_factors,
    one_hot,
    set_weights,
    use_weights,
)

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scaling_and_delta_match_peft(family):
    if family == "llama":
        base, targets, fifo = tiny_llama(), LLAMA_TARGETS, False
        kw = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3, "down_proj": 5}, use_rslora=True)
    else:
        base, targets, fifo = tiny_gpt2(), GPT2_TARGETS, True
        kw = dict(rank_pattern={"c_fc": 6}, alpha_pattern={"c_proj": 2})
    pm = peft_with_adapters(base, {"x": lora_config(targets, fan_in_fan_out=fifo, **kw)})
    (expert,) = experts_of(pm, ["x"])
    from peft.tuners.lora import LoraLayer

    checked = 0
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            f = expert.modules[name]
            assert f.scaling == pytest.approx(module.scaling["x"]), name
            peft_delta = module.get_delta_weight("x")
            assert torch.allclose(f.delta(), peft_delta.T if fifo else peft_delta, atol=1e-6), name
            checked += 1
    assert checked == len(expert.modules) > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_expert_weight_one_equals_peft(family):
    base, targets = (tiny_llama(), LLAMA_TARGETS) if family == "llama" else (tiny_gpt2(), GPT2_TARGETS)
    pm = peft_with_adapters(base, {"x": lora_config(targets, fan_in_fan_out=family == "gpt2")})
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
        model = detached_base(pm)
        base_logits = model(input_ids=x).logits
        attach(model, experts_of(pm, ["x"]))
        set_weights(model, torch.ones(x.shape[0], 1))
        got = model(input_ids=x).logits
    assert not torch.allclose(want, base_logits, atol=1e-3)  # the adapter does change the output
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_hot_mixed_batch_equals_per_row_peft(family):
    base, targets = (tiny_llama(), LLAMA_TARGETS) if family == "llama" else (tiny_gpt2(), GPT2_TARGETS)
    fifo = family == "gpt2"
    cfgs = {
        "x": lora_config(targets, fan_in_fan_out=fifo),
        "y": lora_config(targets[:2], r=2, lora_alpha=4, fan_in_fan_out=fifo),  # mixed ranks and targets
        "z": lora_config(targets, r=6, lora_alpha=3, use_rslora=True, fan_in_fan_out=fifo),
    }
    pm = peft_with_adapters(base, cfgs)
    x = ids(batch=5)
    assign = ["z", "x", "__base__", "y", "x"]
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=assign).logits
        per_row = []
        for row, name in enumerate(assign):
            if name == "__base__":
                with pm.disable_adapter():
                    per_row.append(pm(input_ids=x[row : row + 1]).logits)
            else:
                pm.set_adapter(name)
                per_row.append(pm(input_ids=x[row : row + 1]).logits)
        model = detached_base(pm)
        attach(model, experts_of(pm, ["x", "y", "z"]))
        w = one_hot([{"x": 0, "y": 1, "z": 2}.get(n, -1) for n in assign], 3)
        with use_weights(model, w):
            got = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, torch.cat(per_row), atol=1e-5)


def test_all_zero_weights_equal_base():
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(LLAMA_TARGETS), "y": lora_config(LLAMA_TARGETS)})
    x = ids()
    with torch.no_grad():
        model = detached_base(pm)
        want = model(input_ids=x).logits
        attach(model, experts_of(pm, ["x", "y"]))
        set_weights(model, torch.zeros(x.shape[0], 2))
        got_zero = model(input_ids=x).logits
        set_weights(model, None)
        got_none = model(input_ids=x).logits
    assert torch.equal(got_zero, want)
    assert torch.equal(got_none, want)


def _hand_layer_output(layer: MultiExpertLinear, factors, x, w):
    y = layer.base(x)
    for e, f in enumerate(factors):
        y = y + w[..., e : e + 1] * f.scaling * (x @ f.A.T @ f.B.T)
    return y


def test_per_token_weights_equal_hand_computed_mixture():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    factors = [LoraFactors(torch.randn(r, 16), torch.randn(12, r), s) for r, s in [(4, 0.5), (2, 2.0), (8, 1.0)]]
    layer = MultiExpertLinear(base, factors, ["x", "y", "z"], name="probe")
    x = torch.randn(3, 5, 16)
    w = torch.softmax(torch.randn(3, 5, 3), -1)
    w[0, 1] = torch.tensor([0.0, 1.0, 0.0])  # sparse rows take the index path
    w[2, :, 2] = 0.0
    layer.weights = w
    with torch.no_grad():
        assert torch.allclose(layer(x), _hand_layer_output(layer, factors, x, w), atol=1e-5)
        # per-sequence weights broadcast over tokens
        ws = torch.tensor([[0.2, 0.0, 0.8], [0.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
        layer.weights = ws
        assert torch.allclose(layer(x), _hand_layer_output(layer, factors, x, ws[:, None, :]), atol=1e-5)


def test_per_token_weights_on_a_model_match_hand_mixture_of_experts():
    """With per-token weights on every module, the model equals a PEFT-free hand mixture: run the
    layer-level check through a whole forward by comparing to the dense-ΔW construction."""
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(["q_proj", "down_proj"]), "y": lora_config(["q_proj", "down_proj"])})
    exps = experts_of(pm, ["x", "y"])
    x = ids(batch=2, length=6)
    w = torch.rand(2, 6, 2)
    with torch.no_grad():
        model = detached_base(pm)
        attach(model, exps)
        set_weights(model, w)
        got = model(input_ids=x).logits
        detach(model)

        # hand: patch each target linear's forward with W x + Σ_e w_e ΔW_e x
        handles = []
        for name, module in model.named_modules():
            if name in exps[0].modules:
                deltas = [e.modules[name].delta() for e in exps]

                def hook(mod, inp, out, deltas=deltas):
                    (xin,) = inp
                    return out + sum(w[..., e : e + 1] * (xin @ d.T) for e, d in enumerate(deltas))

                handles.append(module.register_forward_hook(hook))
        want = model(input_ids=x).logits
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5)


def test_generate_with_kv_cache_matches_peft_mixed_batch():
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(LLAMA_TARGETS), "y": lora_config(LLAMA_TARGETS, r=2)})
    x = ids(batch=3, length=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=["y", "__base__", "x"], **kw)
        model = detached_base(pm)
        attach(model, experts_of(pm, ["x", "y"]))
        with use_weights(model, one_hot([1, -1, 0], 2)):
            got = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            got_nocache = model.generate(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    assert torch.equal(got, want)
    assert torch.equal(got, got_nocache)


def test_generate_with_token_level_weight_function_uses_cache_consistently():
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(LLAMA_TARGETS), "y": lora_config(LLAMA_TARGETS)})
    model = detached_base(pm)
    attach(model, experts_of(pm, ["x", "y"]))
    calls = []

    def by_sign(layer, x):  # a token-level "router": weights from the layer input itself
        calls.append(x.shape[1])
        first = (x[..., 0] > 0).to(x.dtype)
        return torch.stack([first, 1 - first], dim=-1)

    x = ids(batch=2, length=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(x))
    with torch.no_grad(), use_weights(model, by_sign):
        cached = model.generate(input_ids=x, **kw)
        assert 1 in calls  # decode steps saw one new token at a time
        uncached = model.generate(input_ids=x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_detach_restores_the_original_modules():
    model = tiny_llama()
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(["q_proj"])})
    originals = {n: m for n, m in model.named_modules() if n.endswith("q_proj")}
    wrapped = attach(model, experts_of(pm, ["x"]))
    assert set(wrapped) == set(originals) and len(layers(model)) == len(originals)
    with pytest.raises(RuntimeError, match="already has moerge experts"):
        attach(model, experts_of(pm, ["x"]))
    detach(model)
    assert {n: m for n, m in model.named_modules() if n.endswith("q_proj")} == originals
    assert not layers(model)


def test_attach_rejects_factors_that_do_not_fit():
    small = peft_with_adapters(tiny_llama(hidden=32), {"x": lora_config(["q_proj"])})
    big = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*\(32, 32\).*\(48, 48\)"):
        attach(big, experts_of(small, ["x"]))


def test_bad_routing_weights_are_named():
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(["q_proj"])})
    model = detached_base(pm)
    attach(model, experts_of(pm, ["x"]))
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        set_weights(model, torch.ones(2, 3))
    set_weights(model, torch.ones(2, 9, 1))
    with pytest.raises(ValueError, match="do not fit input"):
        model(input_ids=ids(batch=2, length=4))


def test_lowrank_from_delta_is_exact_at_full_rank_and_optimal_when_truncated():
    torch.manual_seed(0)
    delta = torch.randn(20, 12)
    full = lowrank_from_delta(delta, 12)
    assert torch.allclose(full.delta(), delta, atol=1e-5)
    k = 4
    f = lowrank_from_delta(delta, k)
    s = torch.linalg.svdvals(delta)
    assert torch.linalg.norm(delta - f.delta()) == pytest.approx(torch.sqrt((s[k:] ** 2).sum()).item(), rel=1e-4)


def test_thin_qr_route_equals_dense_svd_without_building_the_matrix():
    torch.manual_seed(1)
    terms = [LoraFactors(torch.randn(3, 40), torch.randn(30, 3), 0.7), LoraFactors(torch.randn(5, 40), torch.randn(30, 5), 2.0)]
    dense = terms[0].delta() - terms[1].delta()  # a factor-form difference
    for k in (8, 4, 2):
        via_qr = lowrank_from_factors([(1.0, terms[0]), (-1.0, terms[1])], k)
        via_svd = lowrank_from_delta(dense, k)
        assert via_qr.A.shape == (k, 40) and via_qr.B.shape == (30, k)
        assert torch.allclose(via_qr.delta(), via_svd.delta(), atol=1e-4)
    assert torch.allclose(lowrank_from_factors([(1.0, terms[0]), (-1.0, terms[1])], 8).delta(), dense, atol=1e-4)


@pytest.mark.parametrize("path", ["stacked", "gathered", "grouped", "gathered-chunked"])
def test_topk_weights_equal_the_same_dense_weights(monkeypatch, path):
    """Every top-k path (stacked factors, per-pair gather + bmm, sorted segment matmul, and the
    gathered path cut into chunks where it stands in for the segment matmul) equals the dense
    mixture with the same weights scattered into [..., E]."""
    from moerge.adapters import TopK
    from moerge.adapters import layer as layer_mod

    monkeypatch.setattr(layer_mod, "STACKED_MAX_EXPERTS", 1 << 30 if path == "stacked" else 0)
    monkeypatch.setattr(layer_mod, "STACKED_PER_K", 1 << 30 if path == "stacked" else 0)
    monkeypatch.setattr(layer_mod, "GATHER_PAIRS", 1 << 30 if path.startswith("gathered") else 0)
    if path == "gathered-chunked":
        monkeypatch.setattr(layer_mod, "GATHER_CHUNK", 7)
    torch.manual_seed(1)
    base = torch.nn.Linear(16, 12)
    factors = [LoraFactors(torch.randn(r, 16), torch.randn(12, r), s) for r, s in [(4, 0.5), (2, 2.0), (8, 1.0), (3, 0.7)]]
    layer = MultiExpertLinear(base, factors, ["a", "b", "c", "d"], name="probe")
    x = torch.randn(3, 5, 16)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(15)]).reshape(3, 5, 2)
    w = torch.softmax(torch.randn(3, 5, 2), -1)
    sparse = TopK(idx, w)
    assert layer_mod.topk_path(4, 15, 2) == path.split("-")[0]
    with torch.no_grad():
        layer.weights = sparse
        got = layer(x)
        layer.weights = sparse.dense(4)
        want = layer(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(want, _hand_layer_output(layer, factors, x, sparse.dense(4)), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_assignment_in_slots_equals_peft_mixed_batch(family):
    """Serving's path: experts loaded into slots of an empty layer, a per-row Assignment (gather +
    batched matmuls), equals PEFT's adapter_names batch; so does the uniform fast path."""
    base, targets = (tiny_llama(), LLAMA_TARGETS) if family == "llama" else (tiny_gpt2(), GPT2_TARGETS)
    fifo = family == "gpt2"
    cfgs = {
        "x": lora_config(targets, fan_in_fan_out=fifo),
        "y": lora_config(targets[:2], r=2, lora_alpha=4, fan_in_fan_out=fifo),
        "z": lora_config(targets, r=6, lora_alpha=3, use_rslora=True, fan_in_fan_out=fifo),
    }
    pm = peft_with_adapters(base, cfgs)
    experts = dict(zip(cfgs, experts_of(pm, list(cfgs)), strict=True))
    x = ids(batch=5)
    assign = ["z", "x", "__base__", "y", "x"]
    model = detached_base(pm)
    modules = sorted({m for e in experts.values() for m in e.modules})
    attach_slots(model, modules, capacity=4)
    slots = {"y": 3, "x": 0, "z": 1}  # y (rank 2) first, then larger ranks grow the slots in place
    for name in ["y", "x", "z"]:
        load_expert(model, slots[name], experts[name])
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=assign).logits
        with use_weights(model, Assignment(torch.tensor([slots.get(n, -1) for n in assign]))):
            got = model(input_ids=x).logits
        assert torch.allclose(got, want, atol=1e-5)
        pm.set_adapter("x")
        want_x = pm(input_ids=x).logits
        with use_weights(model, Assignment(torch.zeros(5, dtype=torch.long))):
            got_x = model(input_ids=x).logits
        assert torch.allclose(got_x, want_x, atol=1e-5)
        # two experts in one row with weights (a sequence-level top-k) = the dense per-sequence weights
        mixed = Assignment.rows([[(0, 0.25), (1, 0.75)], [(3, 1.0)], [], [(1, 0.5), (0, 0.5)], [(0, 1.0)]])
        with use_weights(model, mixed):
            got_mixed = model(input_ids=x).logits
        with use_weights(model, mixed.dense(4)):
            want_mixed = model(input_ids=x).logits
        assert torch.allclose(got_mixed, want_mixed, atol=1e-5)


def test_slot_reload_replaces_an_expert_and_rejects_bad_shapes_without_writing():
    pm = peft_with_adapters(tiny_llama(), {"x": lora_config(LLAMA_TARGETS), "y": lora_config(LLAMA_TARGETS, r=2)})
    ex, ey = experts_of(pm, ["x", "y"])
    model = detached_base(pm)
    attach_slots(model, sorted(ex.modules), capacity=1)
    x = ids(batch=2)
    with torch.no_grad():
        load_expert(model, 0, ex)
        load_expert(model, 0, ey)  # evict x, y takes the slot
        with use_weights(model, Assignment(torch.zeros(2, dtype=torch.long))):
            got = model(input_ids=x).logits
        pm.set_adapter("y")
        assert torch.allclose(got, pm(input_ids=x).logits, atol=1e-5)
        before = {n: layer.lora_A.clone() for n, layer in layers(model).items()}
        name = next(iter(ex.modules))
        bad = LoraExpert("bad", {**ex.modules, name: LoraFactors(torch.ones(2, 7), torch.ones(3, 2), 1.0)})
        with pytest.raises(ValueError, match="bad.*shape"):
            load_expert(model, 0, bad)
        assert all(torch.equal(before[n], layer.lora_A) for n, layer in layers(model).items())
        with pytest.raises(ValueError, match="without slots"):
            load_expert(model, 0, LoraExpert("odd", {"lm_head": ex.modules[name]}))
