"""LoRAHub (issue 28): the reference's composition (its PEFT state dicts added with one weight per
LoRA), its search (NGOpt from 0 in [−1.5, 1.5], L1 0.05, seeded), ``moerge.lorahub`` end to end
and in ``moerge eval``, with the few examples from validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import detached_base, experts_of, ids, lora_config, peft_with_adapters, tiny_llama

pytest.importorskip("nevergrad")

from moerge.adapters import attach, detach, one_hot, use_weights  # noqa: E402
from moerge.adapters.lorahub import check_composable, combine, l1_penalty, reference_loss, search  # noqa: E402


def _logits_with(base, expert, x):  # noqa: ANN001, ANN202
    attach(base, [expert])
    try:
        with torch.no_grad(), use_weights(base, one_hot([0] * x.shape[0], 1)):
            return base(x).logits
    finally:
        detach(base)


def test_the_composition_is_the_references_weighted_sum_of_the_peft_state_dicts():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    cfg = lora_config(["q_proj", "v_proj", "down_proj"])
    names = ["x", "y", "z"]  # PEFT warns of adapter names inside its "lora_" prefix
    model = peft_with_adapters(tiny_llama(), dict.fromkeys(names, cfg))
    experts = copy.deepcopy(experts_of(model, names))  # its tensors share the PeftModel's, which are overwritten below
    base = detached_base(model)
    w = [0.7, -1.2, 0.4]
    # the reference: every key of the adapters' state dicts added with its adapter's weight, loaded
    # into the first adapter (its config: the same scaling)
    states = [get_peft_model_state_dict(model, adapter_name=n) for n in names]
    set_peft_model_state_dict(model, {k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]},
                              adapter_name="x")  # fmt: skip
    model.set_adapter("x")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    torch.testing.assert_close(_logits_with(base, combine(experts, w), x), want, atol=1e-5, rtol=1e-5)
    # not the weighted sum of the experts' ΔW: the cross terms B_i·A_j are in
    merged = combine(experts, w)
    m = "model.layers.0.self_attn.q_proj"
    linear = sum(wi * e.modules[m].delta() for wi, e in zip(w, experts, strict=True))
    assert (merged.modules[m].delta() - linear).norm() > 1e-3 * linear.norm()


def test_different_scalings_are_folded_into_a_and_one_hot_weights_give_that_expert():
    model = peft_with_adapters(
        tiny_llama(), {"x": lora_config(["q_proj"], lora_alpha=8), "y": lora_config(["q_proj"], lora_alpha=2)}
    )
    a, b = experts_of(model, ["x", "y"])
    m = "model.layers.1.self_attn.q_proj"
    w = [0.5, 1.5]
    fa, fb = a.modules[m], b.modules[m]
    want = (w[0] * fa.B + w[1] * fb.B) @ (w[0] * fa.scaling * fa.A + w[1] * fb.scaling * fb.A)
    torch.testing.assert_close(combine([a, b], w).modules[m].delta(), want)
    torch.testing.assert_close(combine([a, b], [0.0, 1.0]).modules[m].delta(), fb.delta())  # one-hot: that expert exactly


def test_experts_that_cannot_be_added_factor_by_factor_are_refused_by_name():
    model = peft_with_adapters(tiny_llama(), {"x": lora_config(["q_proj"], r=4), "y": lora_config(["q_proj"], r=8)})
    a, b = experts_of(model, ["x", "y"])
    with pytest.raises(ValueError, match=r"same rank.*q_proj.*x: A 4×32.*y: A 8×32"):
        check_composable([a, b])
    with pytest.raises(ValueError, match="at least two"):
        check_composable([a])
    with pytest.raises(ValueError, match="2 weights for 1 experts|1 experts"):
        combine([a], [1.0, 2.0])


def test_the_search_is_seeded_bounded_starts_at_zero_and_counts_the_l1_term():
    target = [1.0, -0.5, 0.0, 2.0]  # the last is out of bounds: the search stays within ±1.5

    def loss(w):  # noqa: ANN001, ANN202
        return sum((a - b) ** 2 for a, b in zip(w, target, strict=True))

    r1 = search(loss, 4, budget=30, seed=3)
    r2 = search(loss, 4, budget=30, seed=3)
    assert r1.weights == r2.weights and [h["weights"] for h in r1.history] == [h["weights"] for h in r2.history]
    assert len(r1.history) == 30 and r1.history[0]["weights"] == [0.0] * 4  # the reference's init
    assert all(-1.5 <= x <= 1.5 for h in r1.history for x in h["weights"])
    assert all(h["objective"] == pytest.approx(h["loss"] + l1_penalty(h["weights"])) for h in r1.history)
    assert r1.best["objective"] < r1.history[0]["objective"] - 1.0  # it found better than the start
    assert l1_penalty([1.0, -3.0]) == pytest.approx(0.05 * 2.0) and reference_loss([1.0, 2.0], 6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="budget"):
        search(loss, 4, budget=0)


@pytest.mark.slow
def test_lorahub_on_a_tasks_validation_examples_lowers_their_loss_and_writes_what_peft_loads(small_zoo, tmp_path):
    import moerge
    from moerge.composer.compose import load_base

    task = small_zoo.held_in[0]
    examples = [(e.prompt, e.target) for e in small_zoo.val_split(task)[:5]]
    sel = small_zoo.registry.select(names=small_zoo.held_in)
    path = moerge.lorahub(small_zoo.base_path, sel, examples, tmp_path / "hub", budget=20, progress=False, device="cpu")
    report = json.loads((path / "moerge_lorahub.json").read_text())
    assert report["loss"] < report["loss_at_zero"] and len(report["history"]) == 20
    assert set(report["weights"]) == {r.ref for r in sel.records}
    # the PEFT folder: PeftModel loads it and answers as the composition does
    from peft import PeftModel

    base, tok = load_base(small_zoo.base_path, device="cpu", dtype="float32")
    x = tok([examples[0][0]], return_tensors="pt").input_ids
    folded = moerge.lorahub(small_zoo.base_path, sel, examples, budget=20, output="model", progress=False, device="cpu")
    assert folded.lorahub_report.weights == report["weights"]  # the same seed, the same search
    with torch.no_grad():
        want = folded(x).logits
        got = PeftModel.from_pretrained(base, path).eval()(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        moerge.lorahub(small_zoo.base_path, sel, [], progress=False)
    with pytest.raises(ValueError, match="example 0 must be"):
        moerge.lorahub(small_zoo.base_path, sel, ["just a prompt"], progress=False)


@pytest.mark.slow
def test_moerge_eval_learns_each_tasks_weights_from_its_validation_examples_never_its_test(small_zoo, tmp_path, monkeypatch):
    import importlib

    import moerge
    from moerge.zoo.export import export_task_set

    hub = importlib.import_module("moerge.composer.lorahub")  # the module (moerge.composer.lorahub is the function)

    tasks = export_task_set(tmp_path / "tasks", small_zoo.preset)
    seen: list[list[tuple[str, str]]] = []
    real = hub.lorahub

    def spy(base, experts, examples, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(list(examples))
        return real(base, experts, examples, *a, **kw)

    monkeypatch.setattr(hub, "lorahub", spy)
    experts = small_zoo.held_in  # every held-in task needs its expert (the oracle); limit keeps it small
    report = moerge.evaluate(small_zoo.registry, tasks, base=str(small_zoo.base_path), methods=["base", "lorahub"],
                             grid=["lorahub.budget=6", "lorahub.shots=3"], experts=experts, limit=8, device="cpu",
                             dtype="float32", expert_tasks={t: [t] for t in experts}, cache_dir=None, progress=False)  # fmt: skip
    row = next(r for r in report.rows if r.name == "LoRAHub")
    every = small_zoo.held_in + small_zoo.held_out
    assert "budget=6" in row.notes and len(seen) == len(every) and all(len(s) == 3 for s in seen)
    validation = {e.prompt for t in every for e in small_zoo.val_split(t)}
    test = {e.prompt for t in every for e in small_zoo.test_split(t)}
    assert all(p in validation and p not in test for s in seen for p, _ in s)
    weights = report.meta["methods"]["lorahub"]["weights"]
    assert set(weights) == set(every) and all(set(w) == {f"{t}@1" for t in experts} for w in weights.values())


@pytest.mark.slow
def test_the_merge_command_runs_lorahub_on_an_examples_file(small_zoo, tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main

    task = small_zoo.held_in[1]
    lines = [json.dumps({"prompt": e.prompt, "target": e.target}) for e in small_zoo.val_split(task)[:4]]
    (tmp_path / "ex.jsonl").write_text("\n".join(lines) + "\n")
    args = ["merge", "--method", "lorahub", "--experts", ",".join(small_zoo.held_in[:3]), "--registry",
            str(small_zoo.registry_path), "--examples", str(tmp_path / "ex.jsonl"), "--set", "budget=5", "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "weights:" in r.output and (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "moerge_lorahub.json").read_text())["budget"] == 5
    bad = CliRunner().invoke(main, [*(a if a != "budget=5" else "budgett=5" for a in args), "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "no setting budgett" in bad.output
    missing = CliRunner().invoke(main, ["merge", "--method", "lorahub", "--experts", "a,b", "--out", str(tmp_path / "o3")])
    assert missing.exit_code != 0 and "--examples" in missing.output
