"""The synthetic suite and the trained zoo: determinism, splits, and the quality gate."""

from __future__ import annotations

import time

import pytest

from moerge.zoo import HELD_IN, HELD_OUT, TASKS, exact_match, sample, split
from moerge.zoo.tokenizer import build_tokenizer


def test_suite_shape():
    assert len(HELD_IN) >= 8 and len(HELD_OUT) >= 3
    for t in (*HELD_IN, *HELD_OUT):
        assert len(t.templates) >= 2, t.name
    for t in HELD_OUT:
        assert t.uses and all(u in TASKS and not TASKS[u].held_out for u in t.uses)
    held_in_templates = {tpl for t in HELD_IN for tpl in t.templates}
    assert not held_in_templates & {tpl for t in HELD_OUT for tpl in t.templates}  # unseen phrasings


def test_sampling_is_deterministic_and_splits_are_disjoint():
    assert [e.text for e in sample("sort", 20, seed=3)] == [e.text for e in sample("sort", 20, seed=3)]
    assert [e.text for e in sample("sort", 20, seed=3)] != [e.text for e in sample("sort", 20, seed=4)]
    train, test = split("reverse", 300, 50, seed=0)
    assert len(train) == 300 and len(test) == 50
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    e = sample("sort", 1, seed=0)[0]
    assert e.target == " ".join(sorted(e.items)) and e.prompt.endswith("=>")


def test_exact_match():
    ex = sample("max", 4, seed=0)
    assert exact_match([e.target for e in ex], ex) == 1.0
    assert exact_match([" " + e.target + "  " for e in ex[:2]] + ["x", ""], ex) == 0.5
    with pytest.raises(ValueError):
        exact_match(["a"], ex)


def test_tokenizer_round_trip_and_left_padding(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    e = sample("uppercase", 1, seed=0)[0]
    ids = tok(e.text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == e.text
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(e.text).input_ids == ids
    batch = tok([e.prompt, "count the letters : a =>"], padding=True)
    assert batch.input_ids[1][0] == tok.pad_token_id  # left padding for generation


@pytest.mark.slow
def test_small_zoo_quality_gate(small_zoo):
    """Each expert ≥ 90 % on its own task; the base far below; the full matrix is reported."""
    from moerge.bench.quality import evaluate_zoo

    report = evaluate_zoo(small_zoo, progress=False)
    own = report.own_scores()
    assert all(v >= 0.9 for v in own.values()), own
    base = next(r for r in report.rows if r.name == "base")
    held_in_base = [base.per_task[t] for t in small_zoo.held_in]
    assert max(held_in_base) <= 0.4 and sum(held_in_base) / len(held_in_base) <= 0.15, base.per_task
    assert base.held_in_normalized < 20
    # experts specialise: off-diagonal held-in scores stay low
    for e in small_zoo.held_in:
        off = [report.matrix[e][t] for t in small_zoo.held_in if t != e]
        assert max(off) < 0.5, (e, report.matrix[e])
    assert set(report.matrix) == set(small_zoo.held_in)
    assert all(set(row) == set(small_zoo.held_in + small_zoo.held_out) for row in report.matrix.values())
    oracle = next(r for r in report.rows if r.name == "oracle")
    assert oracle.held_in_normalized == pytest.approx(100.0)


@pytest.mark.slow
def test_small_zoo_registry_and_cache(small_zoo):
    from moerge import zoo

    reg = small_zoo.registry
    loras, dense = reg.list(kind="lora"), reg.list(kind="dense")
    assert sorted(r.name for r in loras) == sorted(small_zoo.held_in)
    assert sorted(r.name for r in dense) == sorted(f"{t}-dense" for t in small_zoo.held_in)
    for r in loras:
        assert r.description and r.skills and len(r.examples) >= 3 and r.base_model == str(small_zoo.base_path)
        assert r.lora.r == small_zoo.preset.lora_r and "val_exact_match" in r.metrics
    assert all(r.storage == "task_vector" for r in dense)
    t0 = time.perf_counter()
    again = zoo.load("small", progress=False)
    assert again.root == small_zoo.root and time.perf_counter() - t0 < 10  # cached, not rebuilt
    timings = small_zoo.meta["timings"]
    assert timings["total_s"] > 0
