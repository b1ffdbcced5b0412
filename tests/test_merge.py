"""Static merges: kernel agreement with PEFT's merge_utils and with mergekit, LoRA merges in ΔW
space, SVD re-factoring, PEFT round trips, dense streaming and sharding, errors and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ids, lora_config, peft_with_adapters, tiny_llama
from safetensors.torch import load_file

import moerge
from moerge.adapters import load_lora, lowrank_from_delta
from moerge.adapters import merge as K
from moerge.registry.importers import MoergeWarning


def _tensors(n=3, shape=(12, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ kernels vs PEFT


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {}),
        ("magnitude_prune", {"density": 0.3}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ],
)
def test_deterministic_kernels_equal_peft_merge_utils(method, params):
    from peft.utils import merge_utils

    ts, w = _tensors(), torch.tensor([0.5, 1.0, 0.7])
    ours = K.get_merge(method)(ts, w, **params)
    args = [params[k] for k in ("density", "majority_sign_method") if k in params]
    theirs = getattr(merge_utils, method)(ts, w, *args)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_the_same_random_mask_equals_peft(method):
    from peft.utils import merge_utils

    ts, w = _tensors(seed=1), torch.tensor([1.0, 0.4, 0.8])
    torch.manual_seed(123)
    theirs = getattr(merge_utils, method)(ts, w, 0.4)
    ours = K.get_merge(method)(ts, w, density=0.4, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # a different seed draws a different mask
    other = K.get_merge(method)(ts, w, density=0.4, generator=torch.Generator().manual_seed(124))
    assert not torch.allclose(other, theirs)


def test_kernel_definitions_on_hand_examples():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -0.5])
    torch.testing.assert_close(K.average([a, b]), (a + b) / 2)
    torch.testing.assert_close(K.average([a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    torch.testing.assert_close(K.task_arithmetic([a, b], lambda_=0.3), 0.3 * (a + b))
    # TIES at density 1: sign elected by the sum (+, -, 0 -> +), mean of the agreeing entries
    torch.testing.assert_close(K.ties([a, b], density=1.0), torch.tensor([2.0, -2.0, 0.5]))
    # SVD: rank 1 of a rank-2 matrix is its Eckart–Young truncation
    m = torch.diag(torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(K.svd([m], rank=1), torch.diag(torch.tensor([3.0, 0.0])))
    torch.testing.assert_close(K.svd([a], rank=1), a)  # 1-D passes through


def test_merge_params_are_validated_with_names():
    with pytest.raises(ValueError, match=r"needs \['density'\]"):
        K.merge_params("ties", {})
    with pytest.raises(ValueError, match="does not take \\['rank'\\]"):
        K.merge_params("ties", {"density": 0.2, "rank": 3})
    with pytest.raises(ValueError, match="density must be in"):
        K.merge_params("dare_ties", {"density": 1.5})
    with pytest.raises(KeyError, match="unknown merge method 'tie'"):
        K.get_merge("tie")
    assert K.merge_params("dare_linear", {"density": 0.5, "seed": 3, "lambda": 0.5}) == {
        "density": 0.5,
        "seed": 3,
        "lambda_": 0.5,
    }


# ------------------------------------------------------------- dense merges vs mergekit


@pytest.fixture
def dense_family(tmp_path: Path) -> Path:
    """A tiny Llama base and three fine-tunes (perturbed copies) saved as model folders."""
    tiny_llama(0).save_pretrained(tmp_path / "base")
    for i in range(3):
        m = tiny_llama(0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"ft{i}")
    return tmp_path


def _mergekit(root: Path, method: str, models: list[dict], out: Path, **global_params) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = {"merge_method": method, "base_model": str(root / "base"), "models": models, "dtype": "float32"}
    if global_params:
        cfg["parameters"] = global_params
    run_merge(
        MergeConfiguration.model_validate(cfg), str(out), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    )
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    "method,params,mk_global",
    [
        ("task_arithmetic", {"lambda": 0.7}, {"lambda": 0.7}),
        ("ties", {"density": 0.3, "flavor": "mergekit"}, {}),
    ],
)
def test_dense_merge_equals_mergekit(dense_family, method, params, mk_global):
    root, weights = dense_family, [0.5, 1.0, 0.7]
    mk_models = [
        {"model": str(root / f"ft{i}"), "parameters": {"weight": w, **({"density": 0.3} if method == "ties" else {})}}
        for i, w in enumerate(weights)
    ]
    theirs = _mergekit(root, method, mk_models, root / "mk", **mk_global)
    path = moerge.merge(root / "base", [root / f"ft{i}" for i in range(3)], method, root / "ours", weights=weights, **params)
    ours = load_file(path / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)
    report = json.loads((path / "moerge_merge.json").read_text())
    assert report["method"] == method and report["tensors"] == len(theirs)


# ---------------------------------------------------------- mergekit YAML, same file


def _yaml(root: Path, method: str, weights, densities=None, base=True, list_base=False, **top) -> str:
    import yaml

    models = [{"model": str(root / "base")}] if list_base else []
    for i, w in enumerate(weights):
        params = {"weight": w}
        if densities is not None:
            params["density"] = densities[i]
        models.append({"model": str(root / f"ft{i}"), "parameters": params})
    cfg = {"merge_method": method, "models": models, "dtype": "float32", **top}
    if base:
        cfg["base_model"] = str(root / "base")
    return yaml.safe_dump(cfg)


MERGEKIT_CONFIGS = {
    "linear": dict(method="linear", weights=[0.5, 1.0, 0.7], base=False),
    "linear-unnormalised": dict(method="linear", weights=[0.2, 0.5, 0.3], base=False, parameters={"normalize": False}),
    "task_arithmetic": dict(method="task_arithmetic", weights=[0.5, 1.0, 0.7], list_base=True, parameters={"lambda": 0.7}),
    "task_arithmetic-normalised": dict(method="task_arithmetic", weights=[0.5, 1.0, 0.7], parameters={"normalize": True}),
    "ties-per-model-density": dict(method="ties", weights=[0.5, 1.0, 0.7], densities=[0.3, 0.5, 0.8], list_base=True),
    "ties-global-params-bf16-out": dict(
        method="ties", weights=[0.5, 1.0, 0.7], parameters={"density": 0.4, "lambda": 1.3}, out_dtype="bfloat16"
    ),
    "dare_ties": dict(method="dare_ties", weights=[0.5, 1.0, 0.7], densities=[1.0, 1.0, 1.0]),
    "dare_linear": dict(method="dare_linear", weights=[0.5, 1.0, 0.7], densities=[1.0, 1.0, 1.0], parameters={"normalize": True}),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_CONFIGS))
def test_a_mergekit_yaml_gives_the_same_tensors_as_mergekit_on_the_same_file(dense_family, name):
    """The same YAML file run by mergekit (as mergekit-yaml does: safe_load, validate,
    run_merge) and by moerge.merge_from_config. DARE is compared at density 1: mergekit draws
    its masks unseeded."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = dense_family
    file = root / f"{name}.yml"
    file.write_text(_yaml(root, **MERGEKIT_CONFIGS[name]))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(file.read_text())),
        str(root / "mk"),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    theirs = load_file(root / "mk" / "model.safetensors")
    ours = load_file(moerge.merge_from_config(file, root / "ours") / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-6, rtol=0)


def test_merge_config_cli_and_its_errors(dense_family, tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main

    root = dense_family
    (root / "ties.yml").write_text(_yaml(root, "ties", [0.5, 1.0, 0.7], densities=[0.3, 0.5, 0.8]))
    r = CliRunner().invoke(main, ["merge", "--config", str(root / "ties.yml"), "--out", str(root / "cli")])
    assert r.exit_code == 0, r.output
    api = load_file(moerge.merge_from_config(root / "ties.yml", root / "api") / "model.safetensors")
    cli = load_file(root / "cli" / "model.safetensors")
    assert all(torch.equal(api[k], cli[k]) for k in api)
    r = CliRunner().invoke(main, ["merge", "--config", str(root / "ties.yml"), "--out", str(root / "x"), "--density", "0.5"])
    assert r.exit_code == 2 and "drop --density" in r.output

    def refused(text: str, match: str) -> None:
        with pytest.raises((moerge.composer.MergeConfigError, FileNotFoundError), match=match):
            moerge.merge_from_config(text)

    base = str(root / "base")
    refused(
        f"merge_method: ties\nbase_model: {base}\nmodules: {{}}\nmodels: [{{model: {base}}}]", "modules: a mapping of module name"
    )
    refused(
        f"merge_method: ties\nbase_model: {base}\nslices: []\nmodels: [{{model: {base}}}]",
        "give the models as each slice.s sources, not also as .models.",
    )
    refused(f"merge_metod: ties\nbase_model: {base}", "did you mean 'merge_method'")
    refused(f"merge_method: tie\nbase_model: {base}\nmodels: [{{model: {base}}}]", "did you mean 'ties'")
    refused(f"merge_method: ramplus\nmodels: [{{model: {base}}}]", "did you mean 'ramplus_tl'")
    refused(f"merge_method: ties\nmodels: [{{model: {root / 'ft0'}}}]", "needs base_model")
    refused(
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {root / 'ft0'}, parameters: {{density: {{filter: mlp}}}}}}]",
        "models\\[0\\].parameters.density\\[0\\]: a condition is \\{filter: NAME, value: V\\}",
    )
    refused(
        f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: [true, false]}}\nmodels: [{{model: {root / 'ft0'}}}]",
        "parameters.normalize: .* this parameter takes one value",
    )
    refused(
        f"merge_method: ties\nbase_model: {base}\nparameters: {{density: [0.1, abc]}}\nmodels: [{{model: {root / 'ft0'}}}]",
        "neither a number nor a gradient",
    )
    refused(
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {root / 'ft0'}, parameters: {{densty: 0.5}}}}]",
        "did you mean 'density'",
    )
    refused(
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: org/model+org/lora}}]",
        "'org/model' \\(before '\\+'\\) must be a model folder or a hub id",
    )
    refused(str(tmp_path / "missing.yml"), "does not exist")


def test_dense_merge_streams_into_shards_and_loads(dense_family):
    from transformers import AutoModelForCausalLM

    root = dense_family
    experts = [root / f"ft{i}" for i in range(3)]
    whole = moerge.merge(root / "base", experts, "dare_ties", root / "whole", density=0.5, seed=7)
    sharded = moerge.merge(root / "base", experts, "dare_ties", root / "sharded", density=0.5, seed=7, shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = AutoModelForCausalLM.from_pretrained(whole)
    b = AutoModelForCausalLM.from_pretrained(sharded)
    x = ids()
    torch.testing.assert_close(a(x).logits, b(x).logits)  # same seed, same masks, whatever the shards
    in_memory = moerge.merge(root / "base", experts, "dare_ties", density=0.5, seed=7)
    torch.testing.assert_close(in_memory(x).logits, a(x).logits)
    assert in_memory.merge_report.method == "dare_ties"


def test_dense_merge_of_registry_task_vectors_equals_folder_merge(dense_family, tmp_path):
    root = dense_family
    reg = moerge.Registry(tmp_path / "reg")
    for i in range(3):
        reg.register(root / f"ft{i}", f"ft{i}", base=root / "base", kind="dense")
    from_reg = moerge.merge(None, reg.select(kind="dense"), "ties", tmp_path / "a", density=0.4)
    from_folders = moerge.merge(root / "base", [root / f"ft{i}" for i in range(3)], "ties", tmp_path / "b", density=0.4)
    a, b = load_file(from_reg / "model.safetensors"), load_file(from_folders / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- LoRA merges


@pytest.fixture
def lora_family(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A tiny Llama base folder and three PEFT LoRA folders on it (different ranks and targets)."""
    from transformers import LlamaForCausalLM

    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    folders = []
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 4), (["q_proj", "down_proj"], 2), (["v_proj"], 4)]):
        model = peft_with_adapters(LlamaForCausalLM.from_pretrained(base_dir), {"default": lora_config(targets, r=r)}, seed=i)
        model.save_pretrained(tmp_path / f"lora{i}")
        folders.append(tmp_path / f"lora{i}")
    for f in folders:  # point each adapter at the base folder
        cfg = json.loads((f / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base_dir)
        (f / "adapter_config.json").write_text(json.dumps(cfg))
    return base_dir, folders


def test_lora_average_happens_in_delta_space_not_on_factors(lora_family):
    """Folding an average of two LoRAs equals base + mean(s·B·A); averaging A and B separately
    (cross terms) would not."""
    from transformers import AutoModelForCausalLM

    base_dir, folders = lora_family
    pair = [folders[0], folders[2]]  # both adapt v_proj with rank 4
    merged = moerge.merge(base_dir, pair, "average", output="model")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    e0, e2 = load_lora(pair[0]), load_lora(pair[1])
    mod = "model.layers.0.self_attn.v_proj"
    expected = base.get_submodule(mod).weight + (e0.modules[mod].delta() + e2.modules[mod].delta()) / 2
    got = merged.get_submodule(mod).weight
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    f0, f2 = e0.modules[mod], e2.modules[mod]
    factor_avg = base.get_submodule(mod).weight + f0.scaling * ((f0.B + f2.B) / 2) @ ((f0.A + f2.A) / 2)
    assert (got - factor_avg).abs().max() > 1e-3


def test_merged_lora_saved_as_peft_reloads_with_the_same_logits(lora_family, tmp_path):
    """Task arithmetic at rank Σr is exact: the PEFT folder equals base + λ·Σ ΔW folded in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, folders = lora_family
    out = moerge.merge(base_dir, folders, "task_arithmetic", tmp_path / "merged-lora", rank=10, **{"lambda": 0.5})
    report = json.loads((out / "moerge_merge.json").read_text())
    assert report["rank"] == 10 and max(report["refactor_error"].values()) < 1e-5
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    folded = moerge.merge(base_dir, folders, "task_arithmetic", output="model", **{"lambda": 0.5})
    x = ids()
    torch.testing.assert_close(peft_model(x).logits, folded(x).logits, atol=1e-5, rtol=1e-5)
    in_memory = moerge.merge(base_dir, folders, "task_arithmetic", rank=10, **{"lambda": 0.5})
    torch.testing.assert_close(in_memory(x).logits, folded(x).logits, atol=1e-5, rtol=1e-5)


def test_svd_refactoring_error_is_the_eckart_young_tail(lora_family):
    base_dir, folders = lora_family
    with pytest.warns(MoergeWarning, match="cut back to rank 2"):  # the loss is said, not just stored
        merged = moerge.merge(base_dir, folders, "ties", density=0.5, rank=2)
    report = merged.merge_report
    experts = [load_lora(f) for f in folders]
    mod = "model.layers.1.self_attn.q_proj"
    deltas = [e.modules[mod].delta() if mod in e.modules else torch.zeros(32, 32) for e in experts]
    full = K.ties(deltas, density=0.5)
    S = torch.linalg.svdvals(full)
    tail = float(S[2:].square().sum().sqrt() / S.square().sum().sqrt())
    assert report.refactor_error[mod] == pytest.approx(tail, abs=1e-5)
    f = lowrank_from_delta(full, 2)
    assert float((full - f.delta()).norm() / full.norm()) == pytest.approx(tail, abs=1e-5)


def test_merge_errors_name_the_problem(lora_family, dense_family, tmp_path):
    base_dir, folders = lora_family
    with pytest.raises(ValueError, match="cannot merge LoRA and dense"):
        moerge.merge(base_dir, [folders[0], dense_family / "ft0"], "average")
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        moerge.merge(base_dir, folders, "average", weights=[1, 2])
    with pytest.raises(ValueError, match="dense experts merge into a model"):
        moerge.merge(dense_family / "base", [dense_family / "ft0"], "average", output="lora")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        moerge.merge(base_dir, folders, "average", busy)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(FileNotFoundError, match="pass registry="):
        moerge.merge(base_dir, ["no-such-expert"], "average")


def test_cli_merge_writes_a_peft_folder(lora_family, tmp_path):
    from click.testing import CliRunner

    from moerge.cli import main

    base_dir, folders = lora_family
    out = tmp_path / "cli-out"
    res = CliRunner().invoke(
        main,
        [
            "merge",
            "--method",
            "ties",
            "--density",
            "0.5",
            "--experts",
            ",".join(map(str, folders)),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "merged 3 experts with ties" in res.output and "re-factoring" in res.output
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    res = CliRunner().invoke(main, ["merge", "--method", "ties", "--experts", str(folders[0]), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs ['density']" in res.output


def test_bench_merging_runs_both_parts_and_reports_ratios(tmp_path):
    """The benchmark's plumbing on tiny sizes (no timing is asserted): Twin batched vs per-sample
    agree, and moerge's dense TIES equals mergekit's on the models it builds."""
    from click.testing import CliRunner

    from moerge.cli import main

    js = tmp_path / "bench.json"
    args = ["bench", "merging", "--hidden", "64", "--tasks", "3", "--batches", "2,4", "--repeats", "1"]
    args += ["--models", "2", "--params-m", "1", "--json", str(js), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert [(r["mode"], r["batch"]) for r in data["twin"]] == [(m, b) for b in (2, 4) for m in ("forward", "forward", "generate")]
    assert all(r["max_abs_logit_diff"] < 1e-4 and r["same_generated_tokens"] and r["speedup"] > 0 for r in data["twin"])
    assert data["dense"]["max_abs_diff"] == 0.0
    assert data["dense"]["time_ratio"] > 0 and data["dense"]["rss_ratio"] > 0
    assert "ratio moerge / mergekit" in res.output and "speed-up" in res.output


def test_bench_merging_builds_its_dense_family_on_a_pretrained_base(tmp_path, llama_folder):
    """--base: the dense family is the base's folder and copies of the tensors it stores, each
    perturbed with its own seed (what `bench merging --base real` merges with both tools)."""
    from safetensors.torch import load_file

    from moerge.bench import merging as mb

    base, experts, n = mb.build_dense_family(tmp_path, mb.DenseBenchConfig(models=2, base=str(llama_folder)), progress=False)
    want = load_file(llama_folder / "model.safetensors")
    assert n == sum(v.numel() for v in want.values()) and (base / "config.json").exists()
    got = [load_file(e / "model.safetensors") for e in experts]
    assert all(g.keys() == want.keys() for g in got)
    moved = [max(float((g[k] - want[k]).abs().max()) for k in want) for g in got]
    assert all(0 < m < 0.1 for m in moved) and not torch.equal(got[0]["lm_head.weight"], got[1]["lm_head.weight"])
    with pytest.raises(RuntimeError, match="no .safetensors"):
        mb.build_dense_family(tmp_path / "x", mb.DenseBenchConfig(models=1, base=str(tmp_path / "x-empty")), progress=False)


def test_svd_merge_takes_merges_rank_and_equals_the_truncated_sum(lora_family):
    """``merge(..., "svd", rank=r)``: the rank argument is the kernel's; the folded result is the
    best rank-r approximation of Σ ΔW per module."""
    from transformers import AutoModelForCausalLM

    base_dir, folders = lora_family
    folded = moerge.merge(base_dir, folders, "svd", output="model", rank=2)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    experts = [load_lora(f) for f in folders]
    mod = "model.layers.0.self_attn.v_proj"
    total = sum(e.modules[mod].delta() for e in experts if mod in e.modules)
    expected = base.get_submodule(mod).weight + K.truncated_svd(total, 2)
    torch.testing.assert_close(folded.get_submodule(mod).weight, expected, atol=1e-5, rtol=1e-5)
    assert folded.merge_report.params["rank"] == 2


# --------------------------------------- mergekit's other methods, tensor for tensor (issue 28)

#: (method, moerge params, mergekit models' parameters (per model), mergekit global parameters, experts)
MERGEKIT_MORE = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {"density": 0.6, "gamma": 0.05}, {}, 3),
    "breadcrumbs-normalised-rescaled": (
        "breadcrumbs",
        {"density": 0.5, "gamma": 0.1, "normalize": True, "rescale": True, "lambda": 0.8},
        {"density": 0.5, "gamma": 0.1},
        {"normalize": True, "rescale": True, "lambda": 0.8},
        3,
    ),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.02}, {"density": 0.7, "gamma": 0.02}, {}, 3),
    "breadcrumbs_ties-normalised": (
        "breadcrumbs_ties",
        {"density": 0.4, "normalize": True},
        {"density": 0.4},
        {"normalize": True},
        3,
    ),
    "della-at-density-1": ("della", {"density": 1.0}, {"density": 1.0}, {}, 3),  # the drop is unseeded in mergekit
    "della_linear-at-density-1": ("della_linear", {"density": 1.0, "normalize": True}, {"density": 1.0}, {"normalize": True}, 3),
    "sce": ("sce", {"select_topk": 0.3}, {}, {"select_topk": 0.3}, 3),
    "sce-all-entries": ("sce", {}, {}, {}, 3),
    "slerp": ("slerp", {"t": 0.3}, {}, {"t": 0.3}, 1),
    "nearswap": ("nearswap", {"t": 0.01}, {}, {"t": 0.01}, 1),
    "model_stock": ("model_stock", {}, {}, {}, 3),
    "model_stock-filter-wise": ("model_stock", {"filter_wise": True}, {}, {"filter_wise": True}, 2),
    "nuslerp": ("nuslerp", {}, {}, {}, 2),
    "nuslerp-per-row": ("nuslerp", {"flatten": False}, {}, {"nuslerp_flatten": False}, 2),
    "nuslerp-per-column": (
        "nuslerp",
        {"flatten": False, "row_wise": True},
        {},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        2,
    ),
    "multislerp": ("multislerp", {}, {}, {}, 3),
    "multislerp-unnormalised": ("multislerp", {"normalize_weights": False}, {}, {"normalize_weights": False}, 3),
    "karcher": ("karcher", {}, {}, {}, 3),
    "arcee_fusion": ("arcee_fusion", {}, {}, {}, 1),
}
_WEIGHTED = {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp"}


@pytest.fixture
def sparse_family(tmp_path: Path) -> Path:
    """A tiny Llama base and three fine-tunes that each move a random half of the entries (so
    entries moved by one, several or no fine-tune all occur, as RAM distinguishes them)."""
    tiny_llama(0).save_pretrained(tmp_path / "base")
    for i in range(3):
        m = tiny_llama(0)
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.5))
        m.save_pretrained(tmp_path / f"ft{i}")
    return tmp_path


@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 0.8})])
def test_ram_gives_mergekits_tensors(sparse_family, method, params):
    root = sparse_family
    mk_models = [{"model": str(root / f"ft{i}")} for i in range(3)]
    theirs = _mergekit(root, method, mk_models, root / "mk", **params)
    ours = load_file(
        moerge.merge(root / "base", [root / f"ft{i}" for i in range(3)], method, root / "ours", **params) / "model.safetensors"
    )
    base = load_file(root / "base" / "model.safetensors")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    mean = load_file(
        moerge.merge(root / "base", [root / f"ft{i}" for i in range(3)], "average", root / "mean") / "model.safetensors"
    )
    assert any((ours[k] - mean[k]).abs().max() > 1e-3 for k in base)  # not the plain mean: unique entries kept whole


@pytest.mark.parametrize("name", sorted(MERGEKIT_MORE))
def test_mergekits_other_methods_give_mergekits_tensors(dense_family, name):
    method, params, per_model, mk_global, n = MERGEKIT_MORE[name]
    root = dense_family
    weights = [0.5, 1.0, 0.7][:n] if method in _WEIGHTED else None
    mk_models = [
        {"model": str(root / f"ft{i}"), "parameters": {**({"weight": weights[i]} if weights else {}), **per_model}}
        for i in range(n)
    ]
    if method in ("slerp", "nearswap", "arcee_fusion", "karcher"):  # mergekit lists the base among the models
        mk_models.insert(0, {"model": str(root / "base")})
    theirs = _mergekit(root, method, mk_models, root / "mk", **mk_global)
    path = moerge.merge(root / "base", [root / f"ft{i}" for i in range(n)], method, root / "ours", weights=weights, **params)
    ours = load_file(path / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0)
    base = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in base)  # the merge moved the weights


def _more_yaml(root: Path, name: str) -> dict:
    ft = [str(root / f"ft{i}") for i in range(3)]
    base = str(root / "base")
    if name == "breadcrumbs_ties-per-model":
        models = [{"model": m, "parameters": {"weight": w, "density": d, "gamma": g}}
                  for m, w, d, g in zip(ft, [0.5, 1.0, 0.7], [0.5, 0.7, 0.9], [0.02, 0.05, 0.0], strict=True)]  # fmt: skip
        return {"merge_method": "breadcrumbs_ties", "base_model": base, "models": models, "parameters": {"normalize": True}}
    if name == "della-at-density-1":
        models = [{"model": m, "parameters": {"weight": w, "density": 1.0}} for m, w in zip(ft, [0.5, 1.0, 0.7], strict=True)]
        return {"merge_method": "della", "base_model": base, "models": models, "parameters": {"lambda": 1.1}}
    if name == "sce":
        return {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": m} for m in ft],
            "parameters": {"select_topk": 0.5},
        }
    if name == "slerp-base-listed":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[1]}],
            "parameters": {"t": 0.6},
        }
    if name == "nearswap":
        return {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[0]}],
            "parameters": {"t": 0.02},
        }
    if name == "nuslerp-per-row":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(ft[:2], [0.3, 0.9], strict=True)]
        return {"merge_method": "nuslerp", "base_model": base, "models": models, "parameters": {"nuslerp_flatten": False}}
    if name == "multislerp":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(ft, [0.5, 1.0, 0.7], strict=True)]
        return {"merge_method": "multislerp", "base_model": base, "models": models}
    if name == "karcher-no-base":  # every model averaged alike; moerge takes the first as its base
        return {"merge_method": "karcher", "models": [{"model": m} for m in [base, *ft]], "parameters": {"max_iter": 20}}
    if name == "model_stock-filter-wise":
        return {"merge_method": "model_stock", "base_model": base, "models": [{"model": m} for m in ft],
                "parameters": {"filter_wise": True}}  # fmt: skip
    raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    [
        "breadcrumbs_ties-per-model",
        "della-at-density-1",
        "sce",
        "slerp-base-listed",
        "nearswap",
        "model_stock-filter-wise",
        "nuslerp-per-row",
        "multislerp",
        "karcher-no-base",
    ],
)
def test_a_mergekit_yaml_with_mergekits_other_methods_gives_mergekits_tensors(dense_family, name):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = dense_family
    file = root / f"{name}.yml"
    file.write_text(yaml.safe_dump({**_more_yaml(root, name), "dtype": "float32"}))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(file.read_text())),
        str(root / "mk"),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    theirs = load_file(root / "mk" / "model.safetensors")
    ours = load_file(moerge.merge_from_config(file, root / "ours") / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0)


def test_mergekits_other_methods_refuse_bad_input_by_name(dense_family, tmp_path):
    root = dense_family
    base, ft = root / "base", [root / f"ft{i}" for i in range(3)]

    def refused(match: str, **kw) -> None:
        with pytest.raises((ValueError, moerge.composer.MergeConfigError), match=match):
            moerge.merge(base, kw.pop("experts", ft), kw.pop("method"), tmp_path / "x", **kw)

    refused("exactly one expert, got 3", method="slerp", t=0.5)
    refused("t must be in \\[0, 1\\]", method="slerp", experts=ft[:1], t=1.5)
    refused("needs \\['t'\\]", method="nearswap", experts=ft[:1])
    refused("at least two experts", method="model_stock", experts=ft[:1])
    refused("takes no weights", method="model_stock", weights=[1, 1, 1])
    refused("takes no weights", method="sce", weights=[1, 1, 1])
    refused("density ± epsilon must lie in \\(0, 1\\)", method="della", density=0.1, epsilon=0.2)
    refused("does not take \\['gama'\\] \\(gama: did you mean 'gamma'", method="breadcrumbs", density=0.5, gama=0.1)

    def refused_yaml(text: str, match: str) -> None:
        with pytest.raises(moerge.composer.MergeConfigError, match=match):
            moerge.merge_from_config(text)

    refused_yaml(
        f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft[0]}}}]", "needs parameters.t"
    )
    refused_yaml(
        f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels: [{{model: {ft[0]}}}, {{model: {ft[1]}}}]",
        "needs exactly 1 model\\(s\\) besides base_model, got 2",
    )
    refused_yaml(f"merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {ft[0]}}}]", "at least 2 model")
    refused_yaml(f"merge_method: nuslerp\nmodels: [{{model: {ft[0]}}}, {{model: {ft[1]}}}]", "needs base_model .*task vectors")
    refused_yaml(
        f"merge_method: nuslerp\nbase_model: {base}\nmodels: [{{model: {ft[0]}, parameters: {{weight: 1}}}}, {{model: {ft[1]}}}]",
        "models\\[1\\].parameters.weight: nuslerp needs a weight per model",
    )
    refused_yaml(
        f"merge_method: sce\nbase_model: {base}\nmodels: [{{model: {ft[0]}, parameters: {{weight: 0.5}}}}]",
        "takes no per-model parameters",
    )
    refused_yaml(f"merge_method: slerp\nmodels: [{{model: {base}}}, {{model: {ft[0]}}}]", "needs base_model")
    refused_yaml(
        f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {ft[0]}, parameters: {{gamma: 0.1}}}}]",
        "unknown parameter 'gamma' for ties",
    )
    refused_yaml(
        f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{normalize: true}}\n"
        f"models: [{{model: {ft[0]}, parameters: {{weight: [0.2, 0.8]}}}}]",
        "normalize: true takes one weight per model",
    )


def test_della_keeps_entries_with_a_probability_rising_with_their_magnitude():
    """DELLA's MagPrune in distribution (mergekit draws it unseeded, so no tensor parity): per
    row the smallest entry is kept with probability density − ε, the largest density + ε, and
    the expected share kept is the density; a seed gives the same draw."""
    from moerge.adapters.merge import MERGE_METHODS, della_keep_probabilities, tensor_generator

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 101, generator=g)
    p = della_keep_probabilities(t, 0.4, 0.1)
    order = t.abs().argsort(dim=1)
    assert torch.allclose(p.gather(1, order[:, :1]), torch.full((64, 1), 0.3))
    assert torch.allclose(p.gather(1, order[:, -1:]), torch.full((64, 1), 0.5))
    assert (p.gather(1, order).diff(dim=1) > 0).all() and abs(p.mean().item() - 0.4) < 1e-6
    taus = [torch.randn(64, 101, generator=g) for _ in range(2)]
    kept = [(MERGE_METHODS["della_linear"](taus[:1], density=0.4, epsilon=0.1, rescale=False,
                                           generator=tensor_generator(s, "w")) != 0).float() for s in range(200)]  # fmt: skip
    share = torch.stack(kept).mean(0)  # per entry over 200 seeded draws
    big, small = taus[0].abs() > taus[0].abs().quantile(0.9), taus[0].abs() < taus[0].abs().quantile(0.1)
    assert abs(share.mean().item() - 0.4) < 0.01 and share[big].mean() > share[small].mean() + 0.1
    a = MERGE_METHODS["della"](taus, density=0.4, generator=tensor_generator(3, "w"))
    assert torch.equal(a, MERGE_METHODS["della"](taus, density=0.4, generator=tensor_generator(3, "w")))


def test_lora_experts_merge_with_the_task_vector_methods_and_slerp_is_refused_by_name(lora_family):
    """NearSwap, Model Stock, breadcrumbs and SCE are functions of ΔW, so LoRA experts merge
    with them (the folded ΔW equals the kernel on the experts' ΔW, an expert without the module
    counting as ΔW = 0); SLERP needs whole weights and is refused by name."""
    from transformers import AutoModelForCausalLM

    from moerge.adapters import load_lora
    from moerge.adapters.merge import MERGE_METHODS

    base_dir, folders = lora_family
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    loras = [load_lora(f) for f in folders]
    v = "model.layers.0.self_attn.v_proj"  # adapted by experts 0 and 2
    for method, params, experts in [
        ("model_stock", {}, [0, 2]),
        ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, [0, 1, 2]),
        ("sce", {"select_topk": 0.5}, [0, 1, 2]),
        ("nearswap", {"t": 0.001}, [2]),
        ("nuslerp", {}, [0, 2]),
        ("multislerp", {}, [0, 1, 2]),
    ]:
        merged = moerge.merge(base_dir, [folders[i] for i in experts], method, output="model", **params)
        shape = base.get_parameter(v + ".weight").shape
        deltas = [loras[i].modules[v].delta() if v in loras[i].modules else torch.zeros(shape) for i in experts]
        want = MERGE_METHODS[method](deltas, None, **params)
        got = merged.get_parameter(v + ".weight").detach() - base.get_parameter(v + ".weight").detach()
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="slerp reads whole weights"):
        moerge.merge(base_dir, folders[:1], "slerp", output="model", t=0.5)
    from moerge.adapters.merge import Setting

    with pytest.raises(ValueError, match="per-layer gradients and filters .* apply to dense experts"):
        moerge.merge(base_dir, folders, "ties", density=Setting.gradient([0.2, 0.8]))


def test_cli_merge_takes_the_other_methods_parameters_with_set(dense_family):
    from click.testing import CliRunner

    from moerge.cli import main

    root = dense_family
    args = ["merge", "--experts", f"{root / 'ft0'},{root / 'ft1'}", "--base", str(root / "base"), "--no-progress"]
    r = CliRunner().invoke(
        main, [*args, "--method", "breadcrumbs", "--density", "0.6", "--set", "gamma=0.05", "--out", str(root / "a")]
    )
    assert r.exit_code == 0, r.output
    api = moerge.merge(root / "base", [root / "ft0", root / "ft1"], "breadcrumbs", root / "b", density=0.6, gamma=0.05)
    a, b = load_file(root / "a" / "model.safetensors"), load_file(api / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = CliRunner().invoke(main, [*args, "--method", "model_stock", "--set", "filter_wise=true", "--out", str(root / "c")])
    assert r.exit_code == 0, r.output
    assert json.loads((root / "c" / "moerge_merge.json").read_text())["params"] == {"filter_wise": True}
    r = CliRunner().invoke(main, [*args, "--method", "sce", "--set", "select_topk", "--out", str(root / "d")])
    assert r.exit_code == 2 and "NAME=VALUE" in r.output
    r = CliRunner().invoke(main, [*args, "--method", "slerp", "--set", "t=0.5", "--out", str(root / "e")])
    assert r.exit_code == 2 and "exactly one expert, got 2" in r.output


def test_the_evaluator_runs_mergekits_other_merges_by_name_with_valid_grids():
    """Every merge the evaluator knows takes its grid and fixed settings (each grid point passes
    the kernel's parameter check); mergekit's other merges run by name, not by default."""
    from moerge.adapters.merge import merge_params
    from moerge.evaluation.methods import DEFAULT_METHODS, METHODS, call_params, resolve_methods

    merges = [m for m in METHODS.values() if m.family == "merge"]
    assert {"breadcrumbs", "breadcrumbs_ties", "della", "sce", "model_stock", "multislerp"} <= {m.name for m in merges}
    for spec in merges:
        for point in spec.points():
            merge_params(spec.runs, call_params(spec, point))
    assert not {"breadcrumbs", "della", "sce", "model_stock"} & set(DEFAULT_METHODS)
    assert list(resolve_methods("sce,model_stock")) == ["sce", "model_stock"]


@pytest.fixture
def deep_family(tmp_path: Path) -> Path:
    """A 4-layer tiny Llama and three fine-tunes: a gradient over 4 layers takes values between
    its points (layers at t = 0, ⅓, ⅔, 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    for i in range(3):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"ft{i}")
    return tmp_path


GRADIENT_CONFIGS = {
    # the canonical SLERP config: t per layer, one gradient for attention, another for the MLP
    "slerp-filters-and-gradients": lambda b, ft: {
        "merge_method": "slerp",
        "base_model": b,
        "models": [{"model": b}, {"model": ft[0]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },  # fmt: skip
    },
    "ties-density-gradient-per-model": lambda b, ft: {
        "merge_method": "ties",
        "base_model": b,
        "models": [
            {"model": ft[0], "parameters": {"weight": 0.6, "density": [0.2, 0.9]}},
            {"model": ft[1], "parameters": {"weight": [1.0, 0.3], "density": {"filter": "mlp", "value": 0.3}}},
            {"model": ft[2], "parameters": {"weight": 0.8}},
        ],
        "parameters": {"density": 0.5, "lambda": [{"filter": "q_proj", "value": 1.3}, {"value": [0.8, 1.0]}]},
    },
    "breadcrumbs-gamma-filter": lambda b, ft: {
        "merge_method": "breadcrumbs",
        "base_model": b,
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.6}} for m in ft],
        "parameters": {"gamma": [{"filter": "down_proj", "value": 0.1}, {"value": 0.02}]},
    },
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CONFIGS))
def test_per_layer_gradients_and_filters_give_mergekits_tensors(deep_family, name):
    """mergekit's gradients (a list spread over the layers, interpolated) and filters (the first
    condition matching the tensor's name), globally and per model, on the same YAML file."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = deep_family
    cfg = GRADIENT_CONFIGS[name](str(root / "base"), [str(root / f"ft{i}") for i in range(3)])
    file = root / f"{name}.yml"
    file.write_text(yaml.safe_dump({**cfg, "dtype": "float32"}))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(file.read_text())),
        str(root / "mk"),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    theirs = load_file(root / "mk" / "model.safetensors")
    ours = load_file(moerge.merge_from_config(file, root / "ours") / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0, msg=k)


def test_a_setting_resolves_filters_in_order_and_interpolates_over_the_layers():
    from moerge.adapters.merge import Setting

    s = Setting((("self_attn", (0.0, 0.5, 0.3, 0.7, 1.0)), ("mlp", 0.9), (None, 0.5)))
    at = {i: s.at(f"model.layers.{i}.self_attn.q_proj.weight", 4) for i in range(4)}
    assert at[0] == 0.0 and at[3] == 1.0 and abs(at[1] - (0.5 + (0.3 - 0.5) / 3)) < 1e-12  # t = ⅓: 4/3 of the way
    assert s.at("model.layers.2.mlp.up_proj.weight", 4) == 0.9 and s.at("model.norm.weight", 4) == 0.5
    assert Setting.gradient([0.2, 0.8]).at("model.embed_tokens.weight", 4) == 0.2  # outside the layers: t = 0
    assert Setting((("mlp", 1.0),), default=0.3).at("lm_head.weight", 4) == 0.3


PASSTHROUGH_CONFIGS = {
    # a frankenmerge: two layer ranges of two models, 5 layers from models of 4
    "stack": lambda ft: [
        {"sources": [{"model": ft[0], "layer_range": [0, 3]}]},
        {"sources": [{"model": ft[1], "layer_range": [2, 4]}]},
    ],  # fmt: skip
    # the same model twice, its second copy's attention output and MLP down-projection scaled
    # over the slice's layers (mergekit's way to dampen duplicated blocks)
    "self-stack-scaled": lambda ft: [
        {"sources": [{"model": ft[2], "layer_range": [0, 4]}]},
        {
            "sources": [
                {
                    "model": ft[2],
                    "layer_range": [1, 4],
                    "parameters": {
                        "scale": [
                            {"filter": "o_proj", "value": [0.0, 0.5]},
                            {"filter": "down_proj", "value": 0.25},
                            {"value": 1.0},
                        ]
                    },
                }
            ]
        },
    ],  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(PASSTHROUGH_CONFIGS))
def test_passthrough_slices_stack_layers_as_mergekit_does(deep_family, name):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    root = deep_family
    cfg = {"merge_method": "passthrough", "slices": PASSTHROUGH_CONFIGS[name]([str(root / f"ft{i}") for i in range(3)]),
           "dtype": "float32"}  # fmt: skip
    file = root / f"{name}.yml"
    file.write_text(yaml.safe_dump(cfg))
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(file.read_text())),
        str(root / "mk"),
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    theirs = load_file(root / "mk" / "model.safetensors")
    path = moerge.merge_from_config(file, root / "ours")
    ours = load_file(path / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == layers == json.loads((root / "mk" / "config.json").read_text())["num_hidden_layers"]
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    if name == "stack":  # the shell form writes the same tensors
        from click.testing import CliRunner

        from moerge.cli import main

        r = CliRunner().invoke(main, ["merge", "--config", str(file), "--out", str(root / "cli"), "--no-progress"])
        assert r.exit_code == 0 and "stacked 2 slices" in r.output, r.output
        cli = load_file(root / "cli" / "model.safetensors")
        assert all(torch.equal(cli[k], ours[k]) for k in ours)


SLICED_CONFIGS = {
    # the canonical SLERP file: two slices over the same ranges, t a gradient over each slice's layers
    "slerp-two-slices": lambda b, f: {
        "merge_method": "slerp", "base_model": f[0], "parameters": {"t": [0.0, 0.3, 1.0]},
        "slices": [{"sources": [{"model": f[0], "layer_range": [0, 2]}, {"model": f[1], "layer_range": [0, 2]}]},
                   {"sources": [{"model": f[0], "layer_range": [2, 4]}, {"model": f[1], "layer_range": [2, 4]}]}],
    },
    # layers of one model merged with other layers of another, per-source weights
    "linear-shifted": lambda b, f: {
        "merge_method": "linear",
        "slices": [{"sources": [{"model": f[0], "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                                {"model": f[1], "layer_range": [2, 4], "parameters": {"weight": 0.3}}]}],
    },
    # a slice's own parameters over the global ones; a one-layer slice; a λ gradient
    "ties-per-slice": lambda b, f: {
        "merge_method": "ties", "base_model": b, "parameters": {"density": 0.5, "weight": 1.0, "lambda": [0.5, 1.0]},
        "slices": [
            {"sources": [{"model": b, "layer_range": [0, 1]}, {"model": f[0], "layer_range": [0, 1]},
                         {"model": f[2], "layer_range": [0, 1], "parameters": {"weight": 0.5}}], "parameters": {"density": 0.3}},
            {"sources": [{"model": b, "layer_range": [1, 4]}, {"model": f[0], "layer_range": [1, 4]},
                         {"model": f[2], "layer_range": [1, 4], "parameters": {"weight": 0.5}}]},
        ],
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SLICED_CONFIGS))
def test_slices_with_a_merge_method_merge_layer_by_layer_as_mergekit_does(deep_family, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    root = deep_family
    cfg = {**SLICED_CONFIGS[name](str(root / "base"), [str(root / f"ft{i}") for i in range(3)]), "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(cfg), str(root / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))  # fmt: skip
    theirs = load_file(root / "mk" / "model.safetensors")
    path = moerge.merge_from_config(cfg, root / "ours", progress=False)
    ours = load_file(path / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == json.loads((root / "mk" / "config.json").read_text())["num_hidden_layers"]


MODULE_CONFIGS = {
    # the module's filters over the global value: attention tensors match no module filter and take the global density
    "ties-module-filters-over-global": lambda b, f: {
        "merge_method": "ties", "base_model": b, "parameters": {"density": 0.7, "weight": 1.0},
        "modules": {"default": {"models": [{"model": b}, {"model": f[0]}, {"model": f[1], "parameters": {"weight": 0.5}}],
                                "parameters": {"density": [{"filter": "mlp", "value": 0.3}], "lambda": [0.5, 1.0]}}},
    },
    # slices inside the module, the module's t under the slice's
    "slerp-module-slices": lambda b, f: {
        "merge_method": "slerp", "base_model": f[0],
        "modules": {"default": {"parameters": {"t": 0.3}, "slices": [
            {"sources": [{"model": f[0], "layer_range": [0, 2]}, {"model": f[1], "layer_range": [0, 2]}]},
            {"sources": [{"model": f[0], "layer_range": [2, 4]}, {"model": f[1], "layer_range": [2, 4]}],
             "parameters": {"t": [{"filter": "self_attn", "value": 0.8}]}}]}},
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODULE_CONFIGS))
def test_a_modules_config_of_one_module_merges_as_mergekit_does(deep_family, name):
    """``modules: {default: …}`` (mergekit's form for a model's one module): the same tensors as
    mergekit's, with the module's parameters between the global ones and a slice's or model's."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = deep_family
    cfg = {**MODULE_CONFIGS[name](str(root / "base"), [str(root / f"ft{i}") for i in range(3)]), "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(cfg), str(root / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))  # fmt: skip
    theirs = load_file(root / "mk" / "model.safetensors")
    ours = load_file(moerge.merge_from_config(cfg, root / "ours", progress=False) / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)


def test_modules_beyond_one_module_are_refused_by_field():
    from moerge.composer.mergekit import MergeConfigError, plan_merge

    one = {"models": [{"model": "a"}]}
    for cfg, why in (
        ({"modules": {"text_decoder": one, "vision_tower": one}}, r"modules: \['text_decoder', 'vision_tower'\].*not supported"),
        ({"modules": {"default": one}, "models": [{"model": "a"}]}, "one of models, slices or modules"),
        ({"modules": {"default": {**one, "slices": []}}}, r"modules\.default: give either models or slices"),
        ({"modules": {"default": {**one, "base_model": "x"}}}, r"modules\.default: a module is"),
        ({"modules": []}, "modules: a mapping"),
    ):
        with pytest.raises(MergeConfigError, match=why):
            plan_merge({"merge_method": "ties", "base_model": "b", **cfg})


def test_a_model_plus_lora_reference_is_folded_first_as_mergekit_does(deep_family, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = deep_family
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "ft0"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))  # fmt: skip
    peft.save_pretrained(root / "lora")
    cfg = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float32", "parameters": {"weight": 1.0, "density": 0.5},
           "models": [{"model": f"{root / 'ft0'}+{root / 'lora'}"}, {"model": str(root / "ft1")}]}  # fmt: skip
    run_merge(MergeConfiguration.model_validate(cfg), str(root / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, lora_merge_cache=str(tmp_path / "mkc")))  # fmt: skip
    theirs = load_file(root / "mk" / "model.safetensors")
    ours = load_file(moerge.merge_from_config(cfg, root / "ours", progress=False) / "model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)
    folded = list((tmp_path / "cache" / "lora-folded").iterdir())
    assert len([f for f in folded if f.is_dir()]) == 1  # folded once, kept for the next run
    moerge.merge_from_config(cfg, root / "again", progress=False)
    assert len([f for f in (tmp_path / "cache" / "lora-folded").iterdir() if f.is_dir()]) == 1
    with pytest.raises(moerge.composer.MergeConfigError, match=r"after '\+'.*PEFT adapter folder"):
        moerge.merge_from_config({**cfg, "models": [{"model": f"{root / 'ft0'}+{root / 'ft1'}"}]}, root / "x")


def test_passthrough_refuses_what_it_cannot_stack(deep_family):
    root = deep_family
    ft0 = root / "ft0"

    def refused(text: str, match: str) -> None:
        with pytest.raises((moerge.composer.MergeConfigError, ValueError), match=match):
            moerge.merge_from_config(text, root / "x")

    refused(f"merge_method: passthrough\nslices: [{{sources: [{{model: {ft0}, layer_range: [2, 9]}}]}}]",
            "slices\\[0\\].layer_range: \\[2, 9\\] is not a range of .* 4 layers")  # fmt: skip
    refused(f"merge_method: passthrough\nslices: [{{sources: [{{model: {ft0}, layer_range: [0, 2]}}, {{model: {ft0}, layer_range: [0, 2]}}]}}]",
            "exactly one source per slice")  # fmt: skip
    refused(f"merge_method: slerp\nbase_model: {ft0}\nslices: [{{sources: [{{model: {ft0}, layer_range: [0, 2]}}, "
            f"{{model: {root / 'ft1'}, layer_range: [0, 3]}}]}}]", "layer ranges of different lengths")  # fmt: skip
    refused(f"merge_method: ties\nbase_model: {root / 'base'}\nslices: [{{sources: [{{model: {ft0}, layer_range: [0, 2]}}, "
            f"{{model: {root / 'ft1'}, layer_range: [0, 2]}}]}}]", "base_model .* is not among this slice's sources")  # fmt: skip
    refused(
        f"merge_method: passthrough\nslices: [{{sources: [{{model: {ft0}, layer_range: [0]}}]}}]",
        "layer_range: \\[start, stop\\]",
    )
    refused(f"merge_method: passthrough\nslices: [{{sources: [{{model: {ft0}, layer_range: [0, 2], parameters: {{weight: 1}}}}]}}]",
            "takes only 'scale'")  # fmt: skip
    refused(f"merge_method: passthrough\nmodels: [{{model: {ft0}}}]", "passthrough needs 'slices'|drop models")


def test_cat_equals_peft_add_weighted_adapter_cat_factor_for_factor(lora_family, tmp_path):
    """PEFT's ``cat`` combination: the experts' factors side by side (weight and scaling in A),
    rank Σ r, zero-padded where an expert lacks the module — the same tensors, and so the exact
    weighted sum of the experts' ΔW (no re-factoring error)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base_dir, folders = lora_family
    weights = [0.5, 1.5, -0.7]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folders[0], adapter_name="e0")
    for i in (1, 2):
        peft.load_adapter(folders[i], adapter_name=f"e{i}")
    peft.add_weighted_adapter(["e0", "e1", "e2"], weights, "merged", combination_type="cat")
    theirs = get_peft_model_state_dict(peft, adapter_name="merged")
    path = moerge.merge(base_dir, folders, "cat", tmp_path / "cat", weights=weights)
    ours = load_file(path / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and json.loads((path / "adapter_config.json").read_text())["r"] == 4 + 2 + 4
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    report = json.loads((path / "moerge_merge.json").read_text())
    assert report["refactor_error"] == {} and report["rank"] == 10
    with pytest.raises(ValueError, match="its rank is the sum of theirs"):
        moerge.merge(base_dir, folders, "cat", rank=4)
