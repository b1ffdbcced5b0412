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


def test_composed_prompts_put_each_skill_in_its_own_segment():
    import random

    from moerge.zoo.tasks import COMPOSED, SEGMENT_SEP, get_task, pretrain_segmented, with_foreign

    for t in COMPOSED:
        assert len(t.uses) == 2 and all(not get_task(u).held_out for u in t.uses)
        assert set(t.templates) <= {tpl for u in t.uses for tpl in get_task(u).templates}  # seen phrasings
        for e in sample(t, 20, seed=1):
            assert e.prompt.endswith("=>") and e.prompt.count(SEGMENT_SEP) == 1
            assert [task for task, _ in e.segments] == list(t.uses)
            assert e.target == f" {SEGMENT_SEP} ".join(a for _, a in e.segments)
    e = sample("reverse_and_max", 1, seed=0)[0]
    reverse, mx = e.parts
    assert e.segments == (("reverse", " ".join(reverse.items[::-1])), ("max", max(mx.items)))
    assert e.instructions == (reverse.instruction, mx.instruction)
    # an expert's extra training prompts: its own example beside a generic one, either side
    rng = random.Random(0)
    own = sample("sort", 40, seed=2)
    mixed = [with_foreign(rng, o) for o in own]
    assert all(o in m.parts and len(m.parts) == 2 and m.task == "sort" for o, m in zip(own, mixed, strict=True))
    assert {m.parts.index(o) for o, m in zip(own, mixed, strict=True)} == {0, 1}
    assert all(len(p.parts) == 2 for p in pretrain_segmented(5, seed=0))
    tok = build_tokenizer(segments=True)
    assert tok.unk_token_id not in tok(e.text).input_ids


def test_segment_share_is_off_in_the_presets_and_leaves_their_keys_and_tokenizer_alone():
    from moerge.zoo import tasks as T
    from moerge.zoo.build import PRESETS, Preset, training_examples, with_overrides

    assert all(p.segment_share == 0 for p in PRESETS.values())
    assert Preset("small").key() == "77abc8f65ec6ef08"  # zoos cached before the option keep their folder
    seg = with_overrides("small", segment_share=0.25, n_train=40)
    assert seg.key() != with_overrides("small", n_train=40).key()
    plain, mixed = training_examples("sort", with_overrides("small", n_train=40)), training_examples("sort", seg)
    assert plain == mixed[:40] and len(mixed) == 50 and all(isinstance(e, T.Segmented) for e in mixed[40:])
    with pytest.raises(ValueError, match="segment_share must be in"):
        with_overrides("small", segment_share=-0.5)
    a, b = build_tokenizer().get_vocab(), build_tokenizer(segments=True).get_vocab()
    assert "|" not in a and set(b) - set(a) == {"|"}


def test_which_routers_a_build_prepares_is_part_of_the_preset():
    from moerge.zoo.build import PREPARED_ROUTERS, PRESETS, Preset, with_overrides

    assert all(p.prepared == PREPARED_ROUTERS for p in PRESETS.values())
    assert with_overrides("small", prepared=PREPARED_ROUTERS).key() == "77abc8f65ec6ef08"  # the default keeps the key
    fewer = {with_overrides("small", prepared=r).key() for r in [(), ("arrow",), ("phatgoose", "arrow")]}
    assert len(fewer) == 3 and "77abc8f65ec6ef08" not in fewer  # another set is another build
    with pytest.raises(ValueError, match=r"Preset.prepared: \['glider'\] cannot be prepared"):
        Preset("x", prepared=("glider",))


def test_oracle_schedule_routes_each_segment_of_a_composed_prompt_to_its_expert():
    from moerge.bench.control import oracle_schedule
    from moerge.zoo.tasks import COMPOSED

    tok = build_tokenizer(segments=True)
    experts = ["reverse", "max", "count", "uppercase"]
    examples = sample(COMPOSED[0], 3, seed=0) + sample(COMPOSED[1], 3, seed=0)
    enc, sched = oracle_schedule(tok, examples, experts)
    for b, e in enumerate(examples):
        words = e.prompt.split() + e.target.split()
        # the position holding word i - 1 (BOS for i = 0) predicts word i: its segment's expert
        # ("|" closes the segment before it; "=>" closes the prompt's last one)
        owner, j = [], 0
        for w in words:
            owner.append(j)
            j = 0 if w == "=>" else j + (w == "|")
        pad = int((enc["attention_mask"][b] == 0).sum())
        want = [experts.index(e.segments[o][0]) for o in owner]
        assert sched[b, pad : pad + len(words)].tolist() == want


def test_oracle_answers_with_a_cache_equal_a_full_recompute_under_the_same_routing():
    """The per-token oracle's decode steps read the right column of its schedule: greedy decoding
    with the KV cache gives what recomputing every prefix under the whole schedule gives."""
    import copy

    import torch
    from conftest import experts_of, lora_config, peft_with_adapters, tiny_llama

    from moerge.adapters import attach, one_hot, use_weights
    from moerge.bench.control import SegmentOracle, oracle_answers, oracle_schedule
    from moerge.zoo.tasks import COMPOSED
    from moerge.zoo.train import generate_answers

    tok = build_tokenizer(segments=True)
    experts = ["reverse", "max"]
    cfg = lora_config(["q_proj", "v_proj", "down_proj"], lora_alpha=64)
    pm = peft_with_adapters(tiny_llama(vocab=len(tok)), {n: copy.deepcopy(cfg) for n in experts})
    model = copy.deepcopy(pm).unload().eval()
    attach(model, experts_of(pm, experts))
    examples = sample(COMPOSED[0], 4, seed=3)
    steps = 6
    got = oracle_answers(model, tok, examples, experts, max_new_tokens=steps)
    enc, sched = oracle_schedule(tok, examples, experts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full = torch.cat([sched, sched[:, -1:].expand(-1, ids.shape[1] + steps)], dim=1)  # the last column repeats
    with torch.inference_mode():
        for _ in range(steps):
            with use_weights(model, SegmentOracle(full, ids.shape[1])):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    want = []
    for row in ids[:, enc["input_ids"].shape[1] :].tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row  # generate stops at EOS
        want.append(" ".join(tok.decode(row, skip_special_tokens=True).split()))
    assert got == want
    for j in range(len(experts)):  # and the routing matters: one expert throughout answers otherwise
        with use_weights(model, one_hot([j] * len(examples), len(experts))):
            assert generate_answers(model, tok, [e.prompt for e in examples], max_new_tokens=steps) != got


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
def test_pair_encoder_tokenises_each_example_once_and_batches_as_encode_pairs():
    """A training loop's encoder (kept across steps) gives the batches a fresh encode_pairs gives,
    with one tokenizer call per distinct prompt/target; prompt tokens carry no loss unless asked."""
    import torch

    from moerge.training import PairEncoder, encode_pairs

    tok = build_tokenizer()
    calls = []

    class Counting:
        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(tok, name)

        def __call__(self, text, **kw):  # noqa: ANN001, ANN204
            calls.append(text)
            return tok(text, **kw)

    pairs = [e for t in ("sort", "max") for e in sample(t, 6, seed=3)]
    pairs = [(e.prompt, e.target) for e in pairs] + ["sort : c a b => a b c"]
    for prompt_loss in (False, True):
        enc = PairEncoder(Counting(), prompt_loss)
        for step in range(4):  # the same examples, sampled in another order each step
            batch_examples = pairs[step:] + pairs[:step]
            got, want = enc(batch_examples), encode_pairs(tok, batch_examples, prompt_loss=prompt_loss)
            assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "attention_mask", "labels"))
        assert len(calls) == 2 * (len(pairs) - 1) + 1  # prompt and target once per pair; the plain text once
        calls.clear()
        masked = (got["labels"] == -100) & (got["attention_mask"] == 1)
        assert bool(masked.any()) != prompt_loss  # the prompt's tokens: no loss, unless prompt_loss
    with pytest.raises(ValueError, match="at least one example"):
        enc([])


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
    # the build stored the routers' per-expert artifacts: composing them again computes nothing
    from moerge.composer import compose
    from moerge.zoo.build import PREPARED_ROUTERS

    for name in PREPARED_ROUTERS:
        model = compose(small_zoo.base_path, reg.select(names=small_zoo.held_in), name, data=small_zoo.expert_data)
        assert model.prepared and all(not r.computed and r.cached for r in model.prepared), (name, model.prepared)


def test_finding_a_built_zoo_imports_neither_torch_nor_transformers(small_zoo):
    """`moerge zoo build --path` on a built zoo (the docs' "$(moerge zoo build --path)") and
    `import moerge` stay light: the heavy libraries load where tensors are read or written."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import moerge\n"
        "from moerge.cli import main\n"
        "r = CliRunner().invoke(main, ['zoo', 'build', '--preset', 'small', '--path'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.output.strip())\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, loaded = out.stdout.strip().splitlines()
    assert path == str(small_zoo.root) and loaded == "[]"
