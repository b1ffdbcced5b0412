"""A saved composition scored by lm-evaluation-harness (the ``lm-eval`` extra), offline: local task
YAMLs over local JSONL, generate_until and multiple_choice, in Python and through ``moerge lm-eval``;
and the likelihoods checked against a forward pass of one unpadded request."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GEN_YAML = """task: zoo_reverse_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["=>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """task: zoo_reverse_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(small_zoo, tmp_path_factory):
    """An Arrow composition of two zoo experts saved as a spec; the reverse task's test prompts as
    a generation task and as a two-way choice (the right answer or the list unchanged)."""
    import moerge

    root = tmp_path_factory.mktemp("lm-eval")
    z = small_zoo
    model = moerge.compose(z.base_path, z.registry.select(names=["reverse", "sort"]), "arrow", device="cpu")
    spec = model.save(root / "arrow.json")
    test = z.test_split("reverse")[:24]
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in test))
    rows = [{"prompt": e.prompt, "choices": [e.target, " ".join(e.items)], "label": 0} for e in test]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(GEN_YAML.format(data=root / "gen.jsonl"))
    (tasks / "mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl"))
    return {"root": root, "spec": spec, "model": model, "test": test, "tasks": tasks}


def _req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.slow
def test_lm_eval_scores_a_saved_composition_as_moerge_does(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moerge.integrations.lm_harness import MoergeLM
    from moerge.zoo import exact_match

    lm = MoergeLM(composition=str(setup["spec"]), device="cpu", batch_size=8)
    res = simple_evaluate(
        model=lm, tasks=["zoo_reverse_gen", "zoo_reverse_mc"], task_manager=TaskManager(include_path=str(setup["tasks"]))
    )
    test = setup["test"]
    ours = exact_match(setup["model"].generate([e.prompt for e in test], max_new_tokens=8), test)
    assert res["results"]["zoo_reverse_gen"]["exact_match,none"] == pytest.approx(ours)  # the same answers, the same score
    # multiple choice: lm-eval's accuracy is the share where the right answer is the likelier continuation
    # (lm-eval puts its target delimiter, a space, between the prompt and each choice)
    pairs = [_req(e.prompt, c) for e in test for c in (" " + e.target, " " + " ".join(e.items))]
    lls = [ll for ll, _ in lm.loglikelihood(pairs)]
    want = sum(lls[2 * i] >= lls[2 * i + 1] for i in range(len(test))) / len(test)  # argmax: the first of equals
    assert res["results"]["zoo_reverse_mc"]["acc,none"] == pytest.approx(want)


@pytest.mark.slow
def test_batched_likelihoods_equal_one_unpadded_forward_and_rolling_windows_cover_the_text(setup):
    from moerge.integrations.lm_harness import MoergeLM

    lm = MoergeLM(model=setup["model"], batch_size=4)
    model, tok = setup["model"], setup["model"].tokenizer
    test = setup["test"]
    reqs = [_req(e.prompt, " " + e.target) for e in test[:6]]
    batched = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, batched, strict=True):
        ctx, cont = tok(r.args[0], add_special_tokens=False)["input_ids"], tok(r.args[1], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tok.bos_token_id, *ctx, *cont]])
        with torch.inference_mode(), model.routed(model.route([r.args[0]])):
            logp = torch.log_softmax(model.model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
        tail = logp[-len(cont) :]
        want = tail.gather(1, torch.tensor(cont)[:, None]).sum()
        assert ll == pytest.approx(float(want), abs=1e-4)
        assert greedy == bool((tail.argmax(-1) == torch.tensor(cont)).all())
    text = test[0].prompt + " " + test[0].target
    whole = lm.loglikelihood_rolling([_req(text)])[0]
    assert whole == pytest.approx(lm.loglikelihood([_req("", text)])[0][0], abs=1e-4)
    lm.max_length = 4  # windows of 4 tokens: every token is still scored once, with less context
    windowed = lm.loglikelihood_rolling([_req(text)])[0]
    assert windowed < 0 and windowed != pytest.approx(whole)


@pytest.mark.slow
def test_moerge_lm_eval_is_lm_evals_command_line_with_the_model_registered(setup, tmp_path):
    from moerge.cli import main

    out = tmp_path / "out"
    args = ["lm-eval", "--model", "moerge", "--model_args", f"composition={setup['spec']}", "--device", "cpu", "--tasks",
            "zoo_reverse_gen", "--include_path", str(setup["tasks"]), "--limit", "4", "--output_path", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    results = list(out.rglob("results_*.json"))
    assert results and "zoo_reverse_gen" in json.loads(results[0].read_text())["results"]


def test_generation_refuses_sampling_and_needs_one_source(setup):
    from moerge.integrations.lm_harness import MoergeLM

    with pytest.raises(ValueError, match="composition= .* or model="):
        MoergeLM()
    lm = MoergeLM(model=setup["model"])
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until([_req("reverse the letters : a b =>", {"until": ["=>"], "do_sample": True})])
