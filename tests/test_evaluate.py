"""``moerge eval`` on a pool built the way a user builds one: a tiny Llama-architecture base, three
LoRAs trained with plain PEFT (no moerge code) on three tasks, JSONL task files with held-in and
held-out tasks written here; then the task-set format's errors, its metrics and the registry's
task tags."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import moerge
from moerge.cli import main
from moerge.evaluation import EvaluationError, TaskSetError, load_task_set
from moerge.evaluation.metrics import cut_at_stop, metric_fn

# the user's three tasks and one held-out task (a held-in skill asked in words no expert saw)
LETTERS = list("abcdefghij")
TASKS = {
    "reverse": ("reverse the letters", lambda xs: xs[::-1]),
    "tail": ("drop the first letter", lambda xs: xs[1:]),
    "shift": ("shift each letter by one", lambda xs: [LETTERS[(LETTERS.index(c) + 1) % 10] for c in xs]),
    "flip": ("flip the order of the letters", lambda xs: xs[::-1]),
}
SIZES = {"train": 400, "validation": 24, "test": 40}


def _examples(task: str, n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    """``n`` examples whose letter lists are not in ``seen`` (splits are disjoint, as they should be)."""
    instruction, fn = TASKS[task]
    out = []
    while len(out) < n:
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        if " ".join(xs) in seen:
            continue
        seen.add(" ".join(xs))
        out.append({"prompt": f"{instruction} : {' '.join(xs)} =>", "target": " ".join(fn(xs))})
    return out


def write_task_set(root: Path, tasks: dict[str, str]) -> Path:
    """tasks.yaml and task/{train,validation,test}.jsonl; splits drawn with disjoint seeds."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["tasks:"]
    for name, role in tasks.items():
        group = "letters" if role == "held_in" else "paraphrases"
        lines.append(f"  {name}: {{role: {role}, group: {group}, metric: exact_match, max_new_tokens: 8}}")
        seen: set[str] = set()
        for i, (split, n) in enumerate(SIZES.items()):
            rng = random.Random(f"{name}-{i}")
            (root / name).mkdir(exist_ok=True)
            rows = _examples(name, n, rng, seen)
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks.yaml").write_text("\n".join(lines) + "\n")
    return root


def train_peft_lora(base: Path, train_file: Path, out: Path, seed: int, steps: int = 200) -> Path:
    """A LoRA trained with plain PEFT and a plain torch loop, as a user would elsewhere."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(rows, 32)
        ids, labels = [], []
        for r in batch:
            p = tok(r["prompt"])["input_ids"]
            t = tok(" " + r["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        loss = model(input_ids=x, attention_mask=(y != -100) | (x != tok.pad_token_id), labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def user_pool(tmp_path_factory, small_zoo):
    """The user's base (a copy of the zoo's pre-trained tiny Llama), their task files and three
    PEFT LoRAs trained on them outside moerge, registered with their tasks."""
    root = tmp_path_factory.mktemp("user")
    base = root / "my-base"
    shutil.copytree(small_zoo.base_path, base)
    tasks = write_task_set(root / "tasks", {"reverse": "held_in", "tail": "held_in", "shift": "held_in", "flip": "held_out"})
    adapters = {
        t: train_peft_lora(base, tasks / t / "train.jsonl", root / "adapters" / t, seed=i)
        for i, t in enumerate(["reverse", "tail", "shift"])
    }
    # a fourth LoRA, registered later (the incremental rerun): another reverse expert
    adapters["reverse2"] = train_peft_lora(base, tasks / "reverse" / "train.jsonl", root / "adapters" / "reverse2", seed=7)
    reg = moerge.Registry(root / "registry")
    reg.register(adapters["reverse"], "rev", description="Reverse the order of a list of letters.", tasks=["reverse"])
    reg.register(adapters["tail"], "tailer", description="Drop the first letter of the list and keep the rest.", tasks=["tail"])
    reg.register(adapters["shift"], "shifter", description="Replace each letter by the next letter of the alphabet.")
    reg.tag("shifter", ["shift"])  # tagged later, as `moerge registry tag` does
    return {"root": root, "base": base, "tasks": tasks, "registry": reg, "adapters": adapters}


FAST_GRID = [
    "glider.alpha=1,100",
    "task_arithmetic.lambda=0.5,1.0",
    "ties.density=0.5",
    "ties.lambda=0.5,1.0",
    "dare_ties.density=0.5",
    "dare_ties.lambda=1.0",
    "twin.rank=4",
    "twin.lambda=0.3,0.5",
    "phatgoose.steps=30",
    "glider.steps=30",
]  # fmt: skip  (a router's own setting, fixed: fewer gate steps)


@pytest.mark.slow
def test_eval_scores_a_user_pool_with_every_method_choosing_on_validation_and_reruns_incrementally(user_pool):
    p = user_pool
    out = p["root"] / "eval"
    report = moerge.evaluate(p["registry"], p["tasks"], grid=FAST_GRID, out=out, device="cpu", progress=False)
    data = json.loads((out / "results.json").read_text())
    rows = data["methods"]
    want = {"base", "oracle", "best single expert", "expert:rev", "expert:tailer", "expert:shifter", "PHATGOOSE", "GLIDER",
            "Arrow", "retrieval", "uniform average", "task arithmetic", "TIES", "DARE-TIES", "Twin-Merging"}  # fmt: skip
    assert set(rows) == want
    for row in rows.values():
        for key in ("per_task", "held_in_normalized", "held_out_accuracy", "held_out_groups", "routing_accuracy", "stored_bytes"):
            assert key in row
        assert row["test_prompts_in_preparation"] == 0  # no test prompt in any router's preparation data
    assert data["held_out_groups"] == {"paraphrases": ["flip"]}
    assert (out / "report.md").read_text().count("| GLIDER |") == 1 and (out / "cross_task.png").stat().st_size > 0
    # the experts learned their tasks: each beats the base on its own task by a margin over the split
    m = data["cross_task_matrix"]
    base = rows["base"]["per_task"]
    for expert, task in [("rev", "reverse"), ("tailer", "tail"), ("shifter", "shift")]:
        assert m[expert][task] >= base[task] + 0.5, (expert, m[expert][task], base[task])
    assert rows["oracle"]["held_in_normalized"] == pytest.approx(100.0)
    # α and λ: chosen on validation, the argmax of the recorded validation means, shown in the table
    for method, param in [("glider", "alpha"), ("task_arithmetic", "lambda"), ("twin", "lambda")]:
        meta = data["meta"]["methods"][method]
        assert len(meta["validation"]) == 2 and len({str(v["params"][param]) for v in meta["validation"]}) == 2
        best = max(meta["validation"], key=lambda x: x["mean"])
        assert meta["chosen"] == best["params"]
        assert set(best["validation"]) == {"reverse", "tail", "shift"}  # held-in validation only
    assert rows["GLIDER"]["chosen"]["alpha"] in (1.0, 100.0) and "chosen on validation" in rows["GLIDER"]["notes"]
    assert rows["PHATGOOSE"]["chosen"]["steps"] == 30 and rows["GLIDER"]["chosen"]["steps"] == 30  # the setting, applied
    # routing accuracy is a share for every router; retrieval's bank has one instruction per task, so it routes by it
    assert all(0 <= rows[n]["routing_accuracy"] <= 1 for n in ("PHATGOOSE", "GLIDER", "Arrow", "retrieval", "Twin-Merging"))
    assert rows["retrieval"]["routing_accuracy"] > 0.9
    assert report.rows[0].name == "base"

    # a rerun with nothing new computes nothing
    again = moerge.evaluate(p["registry"], p["tasks"], grid=FAST_GRID, out=out, device="cpu", progress=False)
    assert again.meta["computed"] == [] and again.to_json()["methods"] == report.to_json()["methods"]

    # one more expert, registered through the CLI; the rerun (CLI) scores only its rows and the pool methods
    r = CliRunner().invoke(main, ["registry", "add", str(p["adapters"]["reverse2"]), "--name", "rev2", "--registry",
                                  str(p["registry"].root), "--task", "reverse", "--description", "Reverse a list."])  # fmt: skip
    assert r.exit_code == 0, r.output
    args = ["eval", "--registry", str(p["registry"].root), "--tasks", str(p["tasks"]), "--out", str(out), "--device", "cpu",
            "--methods", "base,experts,oracle,arrow,task_arithmetic", "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, args + ["--set", "task_arithmetic.lambda=0.5,1.0"])
    assert r.exit_code == 0, r.output
    assert "| expert:rev2 |" in r.output
    computed = json.loads((out / "results.json").read_text())["meta"]["computed"]
    assert computed and all(c.startswith(("expert:rev2/", "arrow[", "task_arithmetic[")) for c in computed), computed
    assert {c.split("/")[1] for c in computed if c.startswith("expert:rev2/")} == {"reverse", "tail", "shift", "flip"}
    data2 = json.loads((out / "results.json").read_text())
    assert data2["methods"]["base"]["per_task"] == rows["base"]["per_task"]  # from the cache, unchanged
    assert data2["meta"]["own_experts"]["reverse"] == ["rev", "rev2"]


def _registry_with(tmp_path, lora_folder, tasks=("a",)):
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(lora_folder, "e1", tasks=list(tasks), description="first")
    return reg


def _tiny_task_set(root: Path, spec: str, rows: dict[str, list[dict]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.yaml").write_text(spec)
    for name, lines in (rows or {"a": [{"prompt": "x", "target": "y"}]}).items():
        (root / name).mkdir(exist_ok=True)
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_a_broken_jsonl_line_is_named_by_file_and_line(tmp_path):
    root = _tiny_task_set(tmp_path / "t", "tasks: {a: {role: held_in}}\n")
    (root / "a" / "test.jsonl").write_text('{"prompt": "x", "target": "y"}\n{"prompt": "x", "target": \n')
    with pytest.raises(TaskSetError, match=r"a/test\.jsonl:2: not valid JSON"):
        load_task_set(root)
    (root / "a" / "test.jsonl").write_text('{"prompt": "x", "target": "y"}\n\n{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(TaskSetError, match=r"test\.jsonl:3: .*answer: unknown field"):
        load_task_set(root)
    (root / "a" / "test.jsonl").write_text('{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "target": "y"}\n')
    with pytest.raises(TaskSetError, match=r"test\.jsonl:1: .*exactly one of \"prompt\" and \"messages\""):
        load_task_set(root)
    (root / "a" / "test.jsonl").write_text('{"prompt": "x", "target": "y"}\n')
    (root / "a" / "valid.jsonl").write_text("")
    with pytest.raises(TaskSetError, match=r"valid\.jsonl is not a split \(did you mean 'validation'\?\)"):
        load_task_set(root)


def test_task_set_spec_errors_name_the_field_and_suggest(tmp_path):
    with pytest.raises(TaskSetError, match=r"tasks\.a\.metric: unknown metric 'exact_mach' \(did you mean 'exact_match'\?\)"):
        load_task_set(_tiny_task_set(tmp_path / "t1", "tasks: {a: {role: held_in, metric: exact_mach}}\n"))
    with pytest.raises(TaskSetError, match=r"tasks\.a\.normalize: .*'lowercase'"):
        load_task_set(_tiny_task_set(tmp_path / "t2", "tasks: {a: {role: held_in, normalize: [lowercase]}}\n"))
    with pytest.raises(TaskSetError, match=r"tasks\.a\.role"):
        load_task_set(_tiny_task_set(tmp_path / "t3", "tasks: {a: {role: heldin}}\n"))
    with pytest.raises(TaskSetError, match=r"max_new_token: unknown field \(did you mean 'max_new_tokens'\?\)"):
        load_task_set(_tiny_task_set(tmp_path / "t4", "tasks: {a: {role: held_in, max_new_token: 3}}\n"))
    with pytest.raises(TaskSetError, match="no held_in task"):
        load_task_set(_tiny_task_set(tmp_path / "t5", "tasks: {a: {role: held_out}}\n"))
    with pytest.raises(TaskSetError, match="declared in .* but has no folder"):
        load_task_set(_tiny_task_set(tmp_path / "t6", "tasks: {a: {role: held_in}, b: {role: held_out}}\n"))
    with pytest.raises(TaskSetError, match="cannot be imported"):
        load_task_set(_tiny_task_set(tmp_path / "t7", "tasks: {a: {role: held_in, metric: 'nowhere.at_all:fn'}}\n"))
    with pytest.raises(TaskSetError, match=r"tasks\.b\.role: Field required"):
        load_task_set(_tiny_task_set(tmp_path / "t8", "tasks: {a: {role: held_in}, b:}\n"))
    ts = load_task_set(_tiny_task_set(tmp_path / "t9", "tasks: {a: {role: held_in, metric: 'test_evaluate:first_letter'}}\n",
                                      {"a": [{"prompt": "x", "targets": ["y", "z"]}]}))  # fmt: skip
    assert ts.held_in == ["a"] and ts["a"].split("test")[0].targets == ("y", "z")
    assert ts["a"].spec.normalize == ["strip", "whitespace"] and ts["a"].spec.max_new_tokens == 16  # the documented defaults


def first_letter(prediction: str, targets: list[str]) -> float:
    return float(any(prediction[:1] == t[:1] for t in targets))


def half_bad(prediction: str, targets: list[str]) -> float:
    return 2.0


def test_metrics_normalise_accept_any_target_and_load_user_functions():
    em = metric_fn("exact_match", ["strip", "whitespace"])
    assert em("  Paris ", ["paris", "Paris"]) == 1.0 and em("paris", ["Paris"]) == 0.0
    assert metric_fn("exact_match", ["case", "punctuation", "strip"])("Paris.", ["paris"]) == 1.0
    assert metric_fn("prefix", ["strip"])("Paris, France", ["Paris"]) == 1.0
    assert metric_fn("prefix", ["strip"])("It is Paris", ["Paris"]) == 0.0
    assert metric_fn("contains", ["case"])("It is PARIS", ["paris", "lyon"]) == 1.0
    user = metric_fn("test_evaluate:first_letter", ["case"])  # gets the raw prediction and targets
    assert user("Paris", ["paris"]) == 0.0 and user("paris", ["pisa"]) == 1.0
    with pytest.raises(
        ValueError, match=r"metric 'test_evaluate:half_bad' returned 2.0 for .*; a metric gives a score in \[0, 1\]"
    ):
        metric_fn("test_evaluate:half_bad", [])("a", ["b"])
    assert cut_at_stop("cold\nQuestion: hot", ["\n", "Question"]) == "cold"
    assert cut_at_stop("cold", ["\n"]) == "cold"


def test_pool_errors_name_what_is_wrong_before_any_model_loads(tmp_path, lora_folder, monkeypatch):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    reg = _registry_with(tmp_path, lora_folder, tasks=["other"])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    ts = _tiny_task_set(tmp_path / "t", "tasks: {a: {role: held_in}}\n")
    with pytest.raises(EvaluationError, match=r"held-in task 'a' has no expert in the pool.*moerge registry tag NAME --task a"):
        moerge.evaluate(reg, ts, methods="base,experts")
    with pytest.raises(ValueError, match=r"unknown method 'phatgose' \(did you mean 'phatgoose'\?\)"):
        moerge.evaluate(reg, ts, methods="base,phatgose")
    with pytest.raises(ValueError, match=r"glider has no hyper-parameter 'alfa' \(did you mean 'alpha'\?\)"):
        moerge.evaluate(reg, ts, methods="glider", grid=["glider.alfa=1,2"])
    reg.tag("e1", ["a"])
    with pytest.raises(EvaluationError, match=r"phatgoose is prepared from each expert's training examples.*e1@1 has none"):
        moerge.evaluate(reg, ts, methods="base,phatgoose")
    # an expert registered for another base: named, with its base
    from conftest import lora_config, peft_with_adapters, tiny_llama

    other_base = tmp_path / "other-base"
    tiny_llama(hidden=48).save_pretrained(other_base)
    other = tmp_path / "other-adapter"
    peft_with_adapters(tiny_llama(hidden=48), {"default": lora_config(["q_proj"])}).save_pretrained(other)
    monkeypatch.undo()
    reg.register(other, "e2", base=str(other_base), tasks=["a"])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(EvaluationError, match=r"do not name one common base"):
        moerge.evaluate(reg, ts, methods="base")
    with pytest.raises(EvaluationError, match=rf"e2@1 \(base {other_base}\) was registered for another base model"):
        moerge.evaluate(reg, ts, methods="base", base=str(tmp_path / "base-llama"))
    r = CliRunner().invoke(
        main, ["eval", "--registry", str(reg.root), "--tasks", str(ts), "--out", str(tmp_path / "o"), "--methods", "bse"]
    )
    assert r.exit_code == 2 and "did you mean 'base'" in r.output


def test_registry_tags_tasks_without_a_new_version_and_keeps_them_through_a_rebuild(tmp_path, lora_folder):
    reg = _registry_with(tmp_path, lora_folder, tasks=["a", "a"])
    assert reg.get("e1").tasks == ["a"]
    assert reg.tag("e1", ["b"], mode="add").tasks == ["a", "b"]
    assert reg.get("e1").version == 1 and json.loads((reg.path("e1") / "record.json").read_text())["tasks"] == ["a", "b"]
    assert reg.tag("e1", ["a"], mode="remove").tasks == ["b"]
    with pytest.raises(ValueError, match="not tagged with"):
        reg.tag("e1", ["zzz"], mode="remove")
    with pytest.raises(ValueError, match="task name 'x/y' contains a path separator"):
        reg.tag("e1", ["x/y"])
    moerge.Registry.rebuild_index(reg.root)
    assert moerge.Registry(reg.root).get("e1").tasks == ["b"]
    r = CliRunner().invoke(main, ["registry", "tag", "e1", "--task", "c", "--task", "d", "--registry", str(reg.root)])
    assert r.exit_code == 0 and "e1@1: tasks c, d" in r.output
    assert reg.get("e1").tasks == ["c", "d"]


def test_chat_examples_are_rendered_with_the_base_tokenizers_template(tmp_path, small_zoo):
    from transformers import AutoTokenizer

    from moerge.evaluation.evaluate import _chat_renderer

    base = tmp_path / "chat-base"
    shutil.copytree(small_zoo.base_path, base)
    ts = load_task_set(_tiny_task_set(tmp_path / "t", "tasks: {a: {role: held_in}}\n",
                                      {"a": [{"messages": [{"role": "user", "content": "reverse the letters : a b"}], "target": "b a"}]}))  # fmt: skip
    assert _chat_renderer(str(base), ts) is None  # the zoo's tokenizer has no template
    with pytest.raises(TaskSetError, match="test.jsonl:1: a chat example"):
        ts["a"].split("test")[0].render(None)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    )
    tok.save_pretrained(base)
    render = _chat_renderer(str(base), ts)
    assert ts["a"].split("test")[0].render(render) == "user : reverse the letters : a b =>"


def test_glider_reads_a_chat_examples_user_message_and_other_methods_the_rendered_prompt(tmp_path):
    """GLIDER's global router embeds what the user asked, not the chat template's system prompt
    around it (on the real suite: 98.4 % of held-in test prompts to their own expert by the user
    message, 70.9 % by the rendered prompt, docs/zoo.md). Plain prompts are their own query, and
    a plain-prompt pool's cache keys are unchanged."""
    from types import SimpleNamespace

    from moerge.evaluation.evaluate import _Run
    from moerge.evaluation.methods import METHODS

    rows = {"a": [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse : a b"}], "target": "b a"},
                  {"messages": [{"role": "user", "content": "reverse : c d"}], "target": "d c"}],
            "b": [{"prompt": "sort : b a =>", "target": "a b"}]}  # fmt: skip
    ts = load_task_set(_tiny_task_set(tmp_path / "t", "tasks: {a: {role: held_in}, b: {role: held_in}}\n", rows))
    assert [e.query for e in ts["a"].split("test")] == ["reverse : a b", "reverse : c d"] and ts["b"].split("test")[
        0
    ].query is None

    def run_over(tasks):  # noqa: ANN001, ANN202
        run = _Run.__new__(_Run)
        rendered = {(t, "test"): [f"<sys>{e.query}<end>" if e.query else e.prompt for e in ts[t].split("test")] for t in tasks}
        queries = {(t, "test"): [e.query for e in ts[t].split("test")] for t in tasks}
        run.specs, run.pool = (
            METHODS,
            SimpleNamespace(prompts=rendered, queries=queries, pool_key=lambda: "p", data_key=lambda: "d"),
        )
        return run

    chat = run_over(["a", "b"])
    assert chat._queries("glider", [("a", "test", None), ("b", "test", None)]) == [
        "reverse : a b",
        "reverse : c d",
        "sort : b a =>",
    ]
    assert chat._queries("glider", [("a", "test", 1)]) == ["reverse : a b"]
    assert chat._queries("phatgoose", [("a", "test", None)]) is None  # token routers read the prompt they generate from
    assert chat.method_key("glider", {})["query"] == "user message" and "query" not in chat.method_key("phatgoose", {})
    plain = run_over(["b"])
    assert plain._queries("glider", [("b", "test", None)]) is None and "query" not in plain.method_key("glider", {})


@pytest.mark.slow
def test_symbolic_moe_runs_in_the_evaluator_over_whole_model_experts(tmp_path, small_zoo):
    from moerge.zoo.export import export_task_set

    tasks = export_task_set(tmp_path / "tasks", "small", ["reverse", "sort", "count", "flip_paraphrase"])
    reg = moerge.Registry(tmp_path / "models")
    for t in ("reverse", "sort", "count"):  # the zoo's dense fine-tunes as whole models, kept where they are
        reg.register(small_zoo.dense_path(t), f"m-{t}", kind="model", reference=True, tasks=[t])
    with pytest.raises(EvaluationError, match="run symbolic_moe apart from base"):
        moerge.evaluate(reg, tasks, methods="base,symbolic_moe")
    r = CliRunner().invoke(main, ["eval", "--registry", str(reg.root), "--tasks", str(tasks), "--methods",
                                  "symbolic_moe,majority_vote,best_single", "--limit", "24", "--out", str(tmp_path / "o"),
                                  "--device", "cpu", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    rows, sym = data["methods"], data["meta"]["symbolic"]
    assert set(rows) == {"Symbolic-MoE", "majority vote of the recruited", "best single model"}
    assert all(row["test_prompts_in_preparation"] == 0 for row in rows.values())
    # every model answered every test query once (the matrix); recruiting reuses those answers, so
    # the run loads the aggregator (chosen on validation) only
    assert sym["distinct_models"] == 3 and sym["model_loads"] == 1 and sym["every_model_loads"] == 3
    assert sym["reused_answers"] == 3 * 24 * 4  # k = 3 for each of 24 test prompts of four tasks
    assert (
        sym["aggregator"] in ("m-reverse", "m-sort", "m-count") and "1 model load for 96 queries" in rows["Symbolic-MoE"]["notes"]
    )
    # recruiting from validation profiles finds each task's model: the recruits' majority is far above one model
    assert rows["majority vote of the recruited"]["held_in_normalized"] > rows["best single model"]["held_in_normalized"] + 30
    assert sym["best_single"] == max(sym["validation_accuracy"], key=sym["validation_accuracy"].get)


@pytest.mark.slow
def test_one_more_held_out_task_computes_only_its_entries_and_no_validation_means_no_choice(user_pool, tmp_path):
    p = user_pool
    tasks = tmp_path / "tasks"
    shutil.copytree(p["tasks"], tasks)
    cache = tmp_path / "cache"
    kw = dict(experts=["rev", "tailer", "shifter"], methods="base,experts,oracle,arrow,task_arithmetic", device="cpu",
              grid=["task_arithmetic.lambda=0.5,1.0"], cache_dir=cache, limit=8, progress=False)  # fmt: skip
    moerge.evaluate(p["registry"], tasks, **kw)
    shutil.copytree(tasks / "flip", tasks / "flip2")
    (tasks / "tasks.yaml").write_text((tasks / "tasks.yaml").read_text() + "  flip2: {role: held_out, group: paraphrases}\n")
    again = moerge.evaluate(p["registry"], tasks, **kw)
    assert again.meta["computed"] and all("/flip2/" in c for c in again.meta["computed"]), again.meta["computed"]
    # without validation splits a grid cannot be chosen: the method says so instead of guessing
    for t in ("reverse", "tail", "shift"):
        (tasks / t / "validation.jsonl").unlink()
    none = moerge.evaluate(p["registry"], tasks, **kw)
    assert "task arithmetic" not in {r.name for r in none.rows} and "Arrow" in {r.name for r in none.rows}
    assert "no validation data to choose lambda" in none.meta["skipped"]["task_arithmetic"]
