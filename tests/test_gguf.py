"""GGUF files as base models (issue 27): a tiny Llama written as GGUF in the test — with
llama.cpp's Q/K row order, a byte-level BPE vocabulary and a chat template — converts once into a
Hugging Face folder cached by content hash, answers as the model it was written from, and is
accepted wherever moerge takes a base (registering an expert, compose, merges)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

import moerge  # noqa: E402
from moerge.composer.compose import load_base  # noqa: E402
from moerge.registry import gguf as G  # noqa: E402
from moerge.registry.files import sha256_file  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _llama_cpp_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter stores q/k rows interleaved per head (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama (d 32, 4 heads, 2 KV heads) in float32, written as GGUF; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = _byte_tokens() + [a + b for a, b in (m.split() for m in merges)] + SPECIAL
    eos, bos = tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    sd = model.state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL))
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(bos)
    w.add_chat_template(TEMPLATE)
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd[f"model.{'norm'}.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i in range(2):
        for hf, ggml in per_layer.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _llama_cpp_order(t, 4)
            elif hf == "self_attn.k_proj":
                t = _llama_cpp_order(t, 2)
            w.add_tensor(f"blk.{i}.{ggml}.weight", t.contiguous().numpy())
    del names
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(root / "tiny-llama.F32.gguf")
    return root / "tiny-llama.F32.gguf", model, root / "cache"


def test_a_gguf_file_converts_once_to_a_folder_that_answers_as_the_model_it_was_written_from(tiny, monkeypatch):
    path, model, cache = tiny
    folder = G.converted_folder(path, cache)
    meta = json.loads((folder / "gguf.json").read_text())
    assert meta["sha256"] == sha256_file(path) and folder.name.endswith(meta["sha256"][:16])
    assert meta["architecture"] == "LlamaForCausalLM" and meta["source"] == str(path.resolve())
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    loaded, tok = load_base(str(path), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 70, 200, 3, 9, 150, 42]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)  # Q/K order undone
    text = " the thin hat"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # the byte-level BPE round-trips
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the GGUF's chat template came along

    # found again by content, not reconverted: under its own name, and copied under another one
    monkeypatch.setattr(G, "_convert", lambda *a: pytest.fail("converted twice"))
    assert G.converted_folder(path, cache) == folder
    other = path.with_name("renamed.gguf")
    other.write_bytes(path.read_bytes())
    assert G.converted_folder(other, cache) == folder


def test_a_gguf_base_is_taken_where_a_base_folder_is_and_recorded_by_its_hash(tiny, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    path, model, cache = tiny
    monkeypatch.setenv("MOERGE_CACHE", str(cache))
    reg = moerge.Registry(tmp_path / "reg")
    for seed, name in enumerate(("one", "two")):
        torch.manual_seed(seed)
        lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))  # fmt: skip
        lora.save_pretrained(tmp_path / name)
        rec = reg.register(tmp_path / name, name, base=str(path), examples=["hello"])
    folder = G.converted_folder(path)
    assert rec.base_model == str(folder) and G.source_of(rec.base_model)["sha256"] == sha256_file(path)
    composed = moerge.compose(str(path), reg.select(names=["one", "two"]), "arrow", device="cpu", dtype="float32")
    assert composed.spec.base == str(folder)  # a saved composition names the converted folder
    assert composed.generate(["the"], max_new_tokens=3) == composed.generate(["the"], max_new_tokens=3)
    ex = composed.explain("the hat", max_new_tokens=2)
    assert ex.layers == [0, 1] and ex.experts == ["one", "two"]  # every layer's LoRA'd modules routed and reported
    out = moerge.merge(str(path), reg.select(names=["one", "two"]), "task_arithmetic", tmp_path / "m", output="model")
    folded, _ = load_base(str(out), device="cpu", dtype="float32")  # the experts folded into it
    assert set(folded.state_dict()) == set(model.state_dict())


def test_what_is_not_a_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        G.converted_folder(tmp_path / "missing.gguf", tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="magic bytes"):
        G.converted_folder(fake, tmp_path)
    assert not list((tmp_path / "gguf").glob("*")) if (tmp_path / "gguf").exists() else True
    assert G.local_base("some/folder") == "some/folder" and not G.is_gguf(Path("x.safetensors")) and G.is_gguf("X.GGUF")


def test_a_conversion_parses_the_file_once_and_leaves_the_gguf_package_as_it_was(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    opened: list[str] = []
    reader_cls = gguf.GGUFReader

    def counting(p, mode="r"):  # noqa: ANN001, ANN202
        opened.append(str(p))
        return reader_cls(p, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    name_map = gguf.get_tensor_name_map
    G._convert(path, sha256_file(path), tmp_path / "converted")
    assert len(opened) == 1  # transformers asks three times (config, tokenizer, weights); one parse answers all
    assert gguf.GGUFReader is counting and gguf.get_tensor_name_map is name_map  # restored afterwards
    assert (tmp_path / "converted" / "model.safetensors").exists()
