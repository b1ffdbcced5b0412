"""``moerge moe build`` (issue 28): a Mixtral MoE from dense experts, read from mergekit-moe's config —
every tensor and the config equal to ``mergekit-moe``'s on the same files, a model plain
transformers loads and generates with, experts equal to the base give the base back, registry
experts (a LoRA folded into the MLPs, prompts from its registered examples), and bad configs
refused by field before any tensor is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow


def _config(zoo, tasks, mode="hidden", **kw):  # noqa: ANN001, ANN003, ANN202
    experts = []
    for i, t in enumerate(tasks):
        e = {"source_model": str(zoo.dense_path(t)), "positive_prompts": [x.prompt for x in zoo.val_split(t)[:3]]}
        if i == 0:
            e["negative_prompts"] = [x.prompt for x in zoo.val_split(tasks[1])[:2]]
        experts.append(e)
    return {"base_model": str(zoo.base_path), "gate_mode": mode, "dtype": "float32", "experts": experts, **kw}


@pytest.mark.parametrize(("mode", "shared"), [("hidden", False), ("hidden_avg", False), ("cheap_embed", False), ("hidden", True)])
def test_every_tensor_and_the_config_equal_mergekit_moes(small_zoo, tmp_path, mode, shared):
    pytest.importorskip("mergekit")
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build
    from safetensors.torch import load_file

    from moerge.composer.moe import build_moe

    cfg = _config(small_zoo, ["sort", "reverse", "max"], mode, experts_per_token=2)
    if shared:  # Qwen2-MoE: one shared expert (mergekit-moe 0.1.5 reads it only when it is the base or an expert)
        cfg["shared_experts"] = [{"source_model": str(small_zoo.base_path), "positive_prompts": ["max of : 3 9 4 =>"]}]
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    # mergekit-moe's own build, in this process (its command line is this function behind click)
    build(MoEMergeConfig.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(), device="cpu")
    ours = build_moe(tmp_path / "moe.yml", tmp_path / "ours", progress=False)
    want, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(ours / "model.safetensors")
    assert set(want) == set(got) and any(".mlp.gate.weight" in k for k in got)
    assert any("shared_expert_gate" in k for k in got) == shared
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert json.loads((tmp_path / "mk" / "config.json").read_text()) == json.loads((ours / "config.json").read_text())


def _qwen3_family(zoo, root):  # noqa: ANN001, ANN202
    """A tiny Qwen3 base (the zoo's tokenizer) and three perturbed copies, as model folders."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=131, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, dtype="float32")  # fmt: skip
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(cfg)
    tok = AutoTokenizer.from_pretrained(zoo.base_path)
    for i, name in enumerate(("base", "e0", "e1", "e2")):
        m = Qwen3ForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * i * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_qwen3_models_make_mergekit_moes_qwen3_moe_tensor_for_tensor(small_zoo, tmp_path):
    """Qwen3 inputs give mergekit-moe's Qwen3-MoE (every tensor and the config equal), which plain
    transformers loads and generates with; a shared expert is refused by name for them."""
    pytest.importorskip("mergekit")
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.composer.moe import MoEConfigError, build_moe

    root = _qwen3_family(small_zoo, tmp_path / "q3")
    prompts = {t: [x.prompt for x in small_zoo.val_split(t)[:3]] for t in ("sort", "reverse", "max")}
    cfg = {"base_model": str(root / "base"), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
           "experts": [{"source_model": str(root / f"e{i}"), "positive_prompts": prompts[t]} for i, t in
                       enumerate(("sort", "reverse", "max"))]}  # fmt: skip
    build(MoEMergeConfig.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(), device="cpu")
    ours = build_moe(cfg, tmp_path / "ours", progress=False)
    want, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(ours / "model.safetensors")
    assert set(want) == set(got) and "model.layers.0.self_attn.q_norm.weight" in got
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    config = json.loads((ours / "config.json").read_text())
    assert json.loads((tmp_path / "mk" / "config.json").read_text()) == config and config["model_type"] == "qwen3_moe"
    model, tok = AutoModelForCausalLM.from_pretrained(ours), AutoTokenizer.from_pretrained(ours)
    ids = tok(prompts["sort"][0], return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    for name in ("Qwen3 MoE", "qwen"):  # named as mergekit-moe names it (a prefix)
        named = build_moe({**cfg, "architecture": name}, tmp_path / name.replace(" ", "-"), progress=False)
        assert load_file(named / "model.safetensors").keys() == got.keys()
    with pytest.raises(MoEConfigError, match="Qwen3 models make a Qwen3-MoE, which has no shared expert"):
        build_moe({**cfg, "shared_experts": [{"source_model": str(root / "base"), "positive_prompts": ["x"]}]},
                  tmp_path / "no", progress=False)  # fmt: skip


def test_it_loads_generates_and_with_the_base_as_every_expert_is_the_base(small_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.composer.moe import build_moe

    same = {"base_model": str(small_zoo.base_path), "gate_mode": "random", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(small_zoo.base_path)} for _ in range(3)]}  # fmt: skip
    path = build_moe(same, tmp_path / "same", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(path).eval()
    base = AutoModelForCausalLM.from_pretrained(small_zoo.base_path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["sort the letters : c a b =>", "max of : 3 9 4 =>"], return_tensors="pt", padding=True)
    with torch.no_grad():  # top-k weights sum to 1 and every expert is the base's MLP: the base again
        torch.testing.assert_close(moe(**enc).logits, base(**enc).logits, atol=1e-5, rtol=1e-5)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    cfg = _config(small_zoo, ["sort", "reverse"])
    built = build_moe(cfg, tmp_path / "real", progress=False)
    out = AutoModelForCausalLM.from_pretrained(built).generate(**tok(["sort the letters : c a b =>"], return_tensors="pt"),
                                                               max_new_tokens=4, do_sample=False)  # fmt: skip
    assert out.shape[1] > 0 and json.loads((built / "moerge_moe.json").read_text())["gate_mode"] == "hidden"


def test_registry_experts_fold_their_lora_and_route_by_their_registered_examples(small_zoo, tmp_path):
    from safetensors.torch import load_file

    from moerge.adapters import load_lora
    from moerge.composer.moe import build_moe
    from moerge.registry.files import TensorFolder

    reg = small_zoo.registry
    cfg = {"base_model": str(small_zoo.base_path), "dtype": "float32",
           "experts": [{"source_model": "sort"}, {"source_model": "reverse"}]}  # fmt: skip
    from moerge.registry.importers import MoergeWarning

    with pytest.warns(MoergeWarning, match="non-MLP module"):  # a Mixtral expert is an MLP: its attention ΔW is left out
        path = build_moe(cfg, tmp_path / "reg", registry=reg, progress=False)
    state = load_file(path / "model.safetensors")
    base = TensorFolder(small_zoo.base_path)
    lora = load_lora(reg._resolve("sort"), registry=reg)
    m = next(k for k in lora.modules if ".mlp." in k and k.endswith("down_proj"))
    layer = int(m.split(".")[2])
    want = base.get(f"{m}.weight").float() + lora.modules[m].delta()
    torch.testing.assert_close(state[f"model.layers.{layer}.mlp.experts.down_proj"][0], want)
    last = max(int(k.split(".")[2]) for k in state if k.endswith("mlp.gate.weight"))
    rows = state[f"model.layers.{last}.mlp.gate.weight"]  # layer 0 reads the last token's embedding, "=>" for every prompt
    assert rows.shape[0] == 2 and not torch.allclose(rows[0], rows[1])  # prompts from each expert's own examples
    assert json.loads((path / "moerge_moe.json").read_text())["prompts"][0]["positive"] == len(reg._resolve("sort").examples)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"experts_per_token": 3}, r"experts: 2 expert\(s\) for experts_per_token 3"),
        ({"gate_mode": "psychic"}, r"field gate_mode"),
        ({"shared_experts": [{"source_model": "x"}]}, r"shared_experts\[0\]\.positive_prompts"),
        ({"shared_experts": [{"source_model": "x", "positive_prompts": ["p"]}], "architecture": "mixtral"}, r"no shared expert"),
        ({"shared_experts": [{"source_model": "x", "positive_prompts": ["p"]}] * 2}, r"exactly one shared expert"),
        ({"architecture": "deepseek"}, r"architecture 'deepseek'"),
        ({"bogus": 1}, r"field bogus"),
        ({"same_prompts": True}, r"identical for every expert"),
        ({"no_prompts": True}, r"experts\[1\]\.positive_prompts"),
    ],
)
def test_bad_configs_are_refused_by_field_before_a_tensor_is_read(small_zoo, tmp_path, change, match, monkeypatch):
    from moerge.composer import moe as M

    cfg = _config(small_zoo, ["sort", "reverse"])
    if change.pop("same_prompts", False):
        cfg["experts"][1]["positive_prompts"] = cfg["experts"][0]["positive_prompts"]
        cfg["experts"][1]["negative_prompts"] = cfg["experts"][0]["negative_prompts"]
    if change.pop("no_prompts", False):
        del cfg["experts"][1]["positive_prompts"]
    cfg.update(change)
    monkeypatch.setattr(M, "TensorFolder", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(M.MoEConfigError, match=match):
        M.build_moe(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_experts_of_another_shape_are_refused_by_name(small_zoo, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moerge.composer.moe import MoEConfigError, build_moe

    wide = LlamaConfig.from_pretrained(small_zoo.base_path)
    wide.intermediate_size *= 2
    LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    cfg = _config(small_zoo, ["sort", "reverse"])
    cfg["experts"][1]["source_model"] = str(tmp_path / "wide")
    with pytest.raises(MoEConfigError, match=r"intermediate_size is 256, the base's 128|intermediate_size"):
        build_moe(cfg, tmp_path / "out", progress=False)
    shutil.rmtree(tmp_path / "wide")


def test_the_random_gate_modes_are_seeded_here_and_drawn_as_mergekit_draws_them(small_zoo):
    from moerge.composer.moe import gate_vectors

    prompts = [([], [])] * 4
    u = gate_vectors(small_zoo.base_path, prompts, "uniform_random", seed=1)
    d = u.shape[-1]
    assert u.shape[1] == 4 and float(u.abs().max()) <= d**-0.5  # U(±1/√d), torch.nn.Linear's initialisation
    r = gate_vectors(small_zoo.base_path, prompts, "random", seed=1)
    assert abs(float(r.mean())) < 0.1 and abs(float(r.std()) - 1) < 0.1  # N(0, 1); mergekit draws these unseeded
    assert torch.equal(r, gate_vectors(small_zoo.base_path, prompts, "random", seed=1))
    assert not torch.equal(r, gate_vectors(small_zoo.base_path, prompts, "random", seed=2))
