"""Shared fixtures: tiny models built in-process (no network), PEFT adapters saved on disk, and
the `small` zoo (built once per machine into the moerge cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist every worker is a process of its own: one torch thread each, so two workers
# on two cores do not oversubscribe them (small-op training slows many times over when they do).
# MOERGE_TEST_THREADS=N sets the count instead — the suite must pass with any (issue 26).
_THREADS = os.environ.get("MOERGE_TEST_THREADS") or ("1" if os.environ.get("PYTEST_XDIST_WORKER") else None)
if _THREADS:
    torch.set_num_threads(int(_THREADS))
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)  # the subprocesses tests start (CLI, servers)

# MOERGE_TEST_SEED=N builds the small zoo and the reduced suites with another seed, in this process
# and in every subprocess a test starts (through $MOERGE_ZOO_SEED, which moerge reads when a suite
# is asked for by name): no test may depend on one build's outcomes.
if os.environ.get("MOERGE_TEST_SEED"):
    os.environ["MOERGE_ZOO_SEED"] = os.environ["MOERGE_TEST_SEED"]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 32, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def lora_config(targets, **kw):
    from peft import LoraConfig

    return LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **{"r": 4, "lora_alpha": 8, **kw})


def peft_with_adapters(base, configs: dict, seed: int = 0):
    """A PeftModel holding one randomly initialised (non-zero) adapter per entry of ``configs``."""
    from peft import get_peft_model

    names = list(configs)
    torch.manual_seed(seed)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, configs[n])
    model.eval()
    return model


def experts_of(peft_model, names):
    """Our LoraExperts read from a live PeftModel's state and configs (as a PEFT folder would give)."""
    from peft import get_peft_model_state_dict

    from moerge.adapters import lora_from_state

    out = []
    for n in names:
        state = get_peft_model_state_dict(peft_model, adapter_name=n)
        out.append(lora_from_state(n, peft_model.peft_config[n].to_dict(), state))
    return out


def detached_base(peft_model):
    """The base model without PEFT layers (a deep copy, so the PeftModel stays usable)."""
    import copy

    return copy.deepcopy(peft_model).unload().eval()


@pytest.fixture
def llama_folder(tmp_path: Path) -> Path:
    model = tiny_llama()
    path = tmp_path / "base-llama"
    model.save_pretrained(path)
    return path


@pytest.fixture
def lora_folder(tmp_path: Path, llama_folder: Path) -> Path:
    """A PEFT LoRA folder on the tiny Llama saved at ``llama_folder``."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_folder)
    model = peft_with_adapters(base, {"default": lora_config(["q_proj", "v_proj"])})
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_zoo():
    from moerge import zoo

    return zoo.load("small", progress=False)


def ids(batch: int = 3, length: int = 7, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
