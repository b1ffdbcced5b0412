"""AdaMerging (issue 28): merging coefficients learnt by entropy minimisation on unlabeled
prompts — at the prior it is task arithmetic with λ = 0.3, the entropy falls, λ stays in [0, 1],
the LoRA it writes is the model it folds, and ``moerge eval`` learns it from validation prompts only."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import moerge
from moerge.composer.adamerging import softmax_entropy

pytestmark = pytest.mark.slow


def _inputs(zoo, tasks):  # noqa: ANN001, ANN202
    return {t: [e.prompt for e in zoo.val_split(t)][:12] for t in tasks}  # ≤ one batch: the same prompts every step


def _logits(model, tok, prompts):  # noqa: ANN001, ANN202
    from moerge.composer.compose import encode_prompts

    with torch.no_grad():
        return model(**encode_prompts(tok, prompts)).logits


def test_at_the_prior_it_is_task_arithmetic_and_the_entropy_falls_within_the_clamp(small_zoo, tmp_path):
    experts = small_zoo.held_in[:3]
    sel = small_zoo.registry.select(names=experts)
    inputs = _inputs(small_zoo, experts)
    prompts = inputs[experts[0]][:4]
    still = moerge.adamerging(small_zoo.base_path, sel, inputs, steps=0, output="model", progress=False, device="cpu")
    ta = moerge.merge(
        small_zoo.base_path, sel, "task_arithmetic", output="model", progress=False, device="cpu", **{"lambda": 0.3}
    )
    torch.testing.assert_close(
        _logits(still, still.tokenizer, prompts), _logits(ta, still.tokenizer, prompts), atol=1e-4, rtol=1e-4
    )

    for granularity in ("task", "layer"):
        path = moerge.adamerging(small_zoo.base_path, sel, inputs, tmp_path / granularity, granularity=granularity, steps=4,
                                 lr=0.05, progress=False, device="cpu")  # fmt: skip
        rep = json.loads((path / "moerge_adamerging.json").read_text())
        assert len(rep["entropy"]) == 5 and rep["entropy"][-1] < rep["entropy"][0]  # the objective fell
        lam = rep["coefficients"] if granularity == "task" else {k: v for m in rep["coefficients"].values() for k, v in m.items()}
        assert set(lam) == {r.ref for r in sel.records} and all(0.0 <= v <= 1.0 for v in lam.values())
        if granularity == "layer":
            assert len(rep["coefficients"]) > 1 and len({json.dumps(v) for v in rep["coefficients"].values()}) > 1
    # the LoRA written (every expert's factors side by side) answers as the model folded with the same λ
    from peft import PeftModel

    from moerge.composer.compose import load_base

    folded = moerge.adamerging(small_zoo.base_path, sel, inputs, granularity="layer", steps=4, lr=0.05, output="model",
                               progress=False, device="cpu")  # fmt: skip
    base, tok = load_base(str(small_zoo.base_path), device="cpu", dtype="float32")
    peft = PeftModel.from_pretrained(base, tmp_path / "layer").eval()
    torch.testing.assert_close(_logits(peft, tok, prompts), _logits(folded, tok, prompts), atol=1e-4, rtol=1e-4)
    assert softmax_entropy(torch.zeros(2, 8)).allclose(torch.full((2,), float(torch.log(torch.tensor(8.0)))))
    with pytest.raises(ValueError, match="granularity"):
        moerge.adamerging(small_zoo.base_path, sel, inputs, granularity="block", progress=False)
    with pytest.raises(ValueError, match="unlabeled prompts"):
        moerge.adamerging(small_zoo.base_path, sel, {"t": []}, progress=False)


def test_moerge_eval_learns_the_coefficients_from_validation_prompts_only(small_zoo, tmp_path, monkeypatch):
    from moerge.zoo.export import export_task_set

    mod = importlib.import_module("moerge.composer.adamerging")
    seen: list[dict] = []
    real = mod.adamerging

    def spy(base, experts, inputs, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(dict(inputs))
        return real(base, experts, inputs, *a, **kw)

    monkeypatch.setattr(mod, "adamerging", spy)
    tasks = export_task_set(tmp_path / "tasks", small_zoo.preset)
    experts = small_zoo.held_in
    report = moerge.evaluate(small_zoo.registry, tasks, base=str(small_zoo.base_path), methods=["adamerging"],
                             grid=["adamerging.steps=2"], experts=experts, limit=8, device="cpu", dtype="float32",
                             expert_tasks={t: [t] for t in experts}, cache_dir=None, progress=False)  # fmt: skip
    every = small_zoo.held_in + small_zoo.held_out
    assert len(seen) == 1 and set(seen[0]) == set(every)  # one merge for the whole set, from every task's inputs
    validation = {e.prompt for t in every for e in small_zoo.val_split(t)}
    test = {e.prompt for t in every for e in small_zoo.test_split(t)}
    assert all(p in validation and p not in test for ps in seen[0].values() for p in ps)
    row = next(r for r in report.rows if r.name == "AdaMerging")
    assert "steps=2" in row.notes and set(report.meta["methods"]["adamerging"]["learnt"]["coefficients"])
