"""A new user's trips (issue 12), each reproduced here, most harmful first:

1. a relative base path stored as given; no base= / --base way out;
2. warnings nobody saw (an unavailable base; a lossy merged LoRA);
3. the CLI's silent zoo fallback, $MOERGE_REGISTRY ignored, serve without --data failing late;
4. silence on long or lossy work (progress by default, plain lines in logs; rank="auto"),
   a typo'd registry path created;
5. errors without a way out (did-you-mean for routers, settings, experts, merge methods and
   parameters; compose's own options; --router Arrow; route --help);
6. conventions: hub ids through a local HF cache, serve --config, SIGTERM with a drain and
   worker errors on the server's console.

Elsewhere: the README's snippets run as written (tests/test_readme.py), mergekit YAML against
mergekit on the same file (tests/test_merge.py), streaming with the OpenAI client
(tests/test_serving_ray.py, tests/test_serving.py)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, lora_config, peft_with_adapters

import moerge
from moerge.cli import main
from moerge.registry import Registry
from moerge.registry.importers import MoergeWarning


@pytest.fixture
def relative_adapter(tmp_path, small_zoo, monkeypatch):
    """A copy of a zoo base and of one zoo LoRA whose adapter_config names the base by a
    relative path — what PEFT writes when the base was loaded with from_pretrained("base-llama");
    the shell is in tmp_path."""
    base = tmp_path / "base-llama"
    shutil.copytree(small_zoo.base_path, base)
    adapter = tmp_path / "adapter"
    shutil.copytree(small_zoo.root / "lora" / "sort", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base.name
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    return adapter


def test_a_relative_base_path_is_stored_absolute_and_works_from_anywhere(tmp_path, relative_adapter, monkeypatch):
    llama_folder = tmp_path / "base-llama"
    reg = moerge.Registry(tmp_path / "reg")
    rec = reg.register(relative_adapter, "x")
    assert rec.base_model == str(llama_folder)  # absolute, as seen from where it was registered
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = moerge.compose(None, reg, "arrow", device="cpu")
    assert model.spec.base == str(llama_folder)
    merged = moerge.merge(None, reg, "task_arithmetic", out=tmp_path / "merged")
    assert json.loads((merged / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_folder)


def test_a_moved_base_says_which_path_was_tried_and_base_overrides_it(tmp_path, relative_adapter):
    llama_folder = tmp_path / "base-llama"
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "x")
    spec = moerge.compose(None, reg, "arrow", device="cpu").save(tmp_path / "comp.json")
    moved = shutil.move(str(llama_folder), str(tmp_path / "moved-base"))
    with pytest.raises(FileNotFoundError, match=rf"{llama_folder}.*does not exist; pass base= \(Python\) or --base \(CLI\)"):
        moerge.compose(None, reg, "arrow", device="cpu")
    assert moerge.compose(moved, reg, "arrow", device="cpu").spec.base == moved
    assert moerge.load_composition(spec, base=moved).spec.base == moved
    r = CliRunner().invoke(main, ["route", "hello", "--registry", str(reg.root), "--router", "arrow"])
    assert r.exit_code == 2 and "--base (CLI)" in r.output
    r = CliRunner().invoke(main, ["route", "hello", "--registry", str(reg.root), "--router", "arrow", "--base", moved])
    assert r.exit_code == 0, r.output


def test_registering_against_an_unavailable_base_warns_the_user(tmp_path, lora_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = moerge.Registry(tmp_path / "reg")
    with pytest.warns(MoergeWarning, match="not available locally.*shapes are not checked"):
        reg.register(lora_folder, "x", base="someorg/not-cached-model")


def test_a_merged_lora_cut_back_hard_warns_with_the_error(tmp_path, llama_folder):
    from transformers import LlamaForCausalLM

    reg = moerge.Registry(tmp_path / "reg")
    for i, name in enumerate(["a", "b"]):
        pm = peft_with_adapters(LlamaForCausalLM.from_pretrained(llama_folder), {"default": lora_config(["q_proj"])}, seed=i)
        pm.save_pretrained(tmp_path / name)
        reg.register(tmp_path / name, name)
    with pytest.warns(MoergeWarning, match=r"cut back to rank 1.*differs from the exact merge by up to \d+%"):
        merged = moerge.merge(None, reg, "task_arithmetic", rank=1)
    assert merged.merge_report.max_refactor_error > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoergeWarning)
        moerge.merge(None, reg, "task_arithmetic", output="model")  # exact: nothing to warn about


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_rank_auto_picks_each_modules_smallest_rank_within_the_tolerance(tmp_path, llama_folder, method, params):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from moerge.adapters.lora import load_lora

    reg = moerge.Registry(tmp_path / "reg")
    for i, name in enumerate(["a", "b"]):
        pm = peft_with_adapters(
            LlamaForCausalLM.from_pretrained(llama_folder), {"default": lora_config(["q_proj", "v_proj"])}, seed=i
        )
        pm.save_pretrained(tmp_path / name)
        reg.register(tmp_path / name, name)
    exact = moerge.merge(None, reg, method, output="model", **params)
    base = LlamaForCausalLM.from_pretrained(llama_folder)
    for tol in (1e-2, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", MoergeWarning)  # within the user's own bound: no warning
            path = moerge.merge(None, reg, method, out=tmp_path / f"{method}-{tol}", rank="auto", rank_tolerance=tol, **params)
        report = json.loads((path / "moerge_merge.json").read_text())
        assert report["rank_tolerance"] == tol and report["rank"] == max(report["module_ranks"].values())
        assert max(report["refactor_error"].values()) <= tol + 1e-5
        merged = load_lora(path)
        for mod, f in merged.modules.items():
            truth = (exact.get_submodule(mod).weight - base.get_submodule(mod).weight).detach()
            err = float((f.delta() - truth).norm() / truth.norm())
            assert err <= tol + 1e-4, (mod, err)
            r = report["module_ranks"][mod]
            if r > 1:  # and it is the smallest: one rank less misses the tolerance
                from moerge.adapters.lora import lowrank_from_delta

                worse = lowrank_from_delta(truth, r - 1).delta()
                assert float((worse - truth).norm() / truth.norm()) > tol
        assert PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_folder), path) is not None
    with pytest.raises(ValueError, match="svd method needs a fixed rank"):
        moerge.merge(None, reg, "svd", rank="auto")
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        moerge.merge(None, reg, method, rank="8", **params)
    r = CliRunner().invoke(
        main,
        [
            "merge",
            "--registry",
            str(reg.root),
            "--experts",
            "a,b",
            "--method",
            method,
            "--out",
            str(tmp_path / "cli"),
            "--rank",
            "auto",
            *(["--density", "0.5"] if params else []),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "(auto: each module's smallest rank within 0.01)" in r.output


def test_the_cli_never_creates_a_registry_by_reading_and_never_falls_back_to_the_zoo(tmp_path, monkeypatch):
    run = CliRunner().invoke
    typo = tmp_path / "typo"
    r = run(main, ["registry", "list", "--registry", str(typo)])
    assert r.exit_code == 2 and "no registry at" in r.output and "moerge registry init" in r.output
    assert not typo.exists()
    monkeypatch.setenv("MOERGE_REGISTRY", str(typo))
    for cmd in (["route", "hello"], ["serve"]):
        r = run(main, cmd)
        assert r.exit_code == 2 and "no registry at" in r.output and "starting Ray" not in r.output, (cmd, r.output)
    assert not typo.exists()
    monkeypatch.delenv("MOERGE_REGISTRY")
    for cmd in (["route", "hello"], ["serve"]):
        r = run(main, cmd)
        assert r.exit_code == 2 and "--zoo small" in r.output and "MOERGE_REGISTRY" in r.output, (cmd, r.output)
    r = run(main, ["registry", "init", str(typo)])
    assert r.exit_code == 0 and (typo / "index.sqlite").exists()
    assert run(main, ["registry", "list", "--registry", str(typo)]).exit_code == 0


def test_serve_fails_on_missing_gate_data_before_starting_ray(tmp_path, relative_adapter):
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "x")
    r = CliRunner().invoke(main, ["serve", "--registry", str(reg.root), "--router", "phatgoose"])
    assert r.exit_code == 2 and "data=" in r.output and "starting Ray" not in r.output
    assert "--data" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_errors_offer_a_way_out(tmp_path, relative_adapter):
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "x")
    with pytest.raises(ValueError, match=r"unknown setting 'topk' for router 'phatgoose' \(did you mean 'top_k'\?\)"):
        moerge.compose(None, reg, "phatgoose", topk=1)
    with pytest.raises(KeyError, match=r"did you mean 'phatgoose'"):
        moerge.compose(None, reg, "phatgose")
    with pytest.raises(ValueError, match=r"top_k: .*greater than or equal to 1.*got 0"):
        moerge.compose(None, reg, "arrow", top_k=0)
    model = moerge.compose(None, reg, "Arrow", device="cpu")  # router names are case-insensitive
    assert model.spec.router == "arrow" and model.device == torch.device("cpu")
    assert "twin" in CliRunner().invoke(main, ["route", "--help"]).output


def test_misspelt_expert_names_and_merge_parameters_name_the_closest(tmp_path, relative_adapter):
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "sorting")
    with pytest.raises(moerge.registry.ExpertNotFoundError, match=r"'sortng' .*\(did you mean 'sorting'\?\)"):
        reg.select(names=["sortng"])
    with pytest.raises(ValueError, match=r"densty: did you mean 'density'\?"):
        moerge.merge(None, reg, "ties", densty=0.3)
    with pytest.raises(ValueError, match=r"rnak: did you mean 'rank'\?"):  # merge()'s own option, misspelt
        moerge.merge(None, reg, "ties", density=0.3, rnak=4)
    with pytest.raises(KeyError, match=r"did you mean 'task_arithmetic'"):
        moerge.merge(None, reg, "task_arithmetc")
    with pytest.raises(ValueError, match=r"did you mean 'sorting'"):
        moerge.merge(None, reg, "task_arithmetic", weights={"sortin": 1.0})


def test_serve_config_file_keys_are_the_cli_options_and_flags_override_them(tmp_path):
    (tmp_path / "serve.yml").write_text("registry: missing-reg\nmax-batch: 4\nset: {top_k: 2}\n")
    r = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "serve.yml")])
    assert r.exit_code == 2 and "no registry at" in r.output and "missing-reg" in r.output
    r = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "serve.yml"), "--registry", str(tmp_path / "other")])
    assert r.exit_code == 2 and str(tmp_path / "other") in r.output  # the flag wins
    (tmp_path / "bad.yml").write_text("registry: x\nmax-batchh: 4\n")
    r = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "bad.yml")])
    assert r.exit_code == 2 and "unknown key 'max-batchh' (did you mean 'max-batch'?)" in r.output


# ----------------------------------------------------------------------------- progress


def test_long_preparation_reports_progress_by_default_as_plain_lines_in_a_log(
    tmp_path, relative_adapter, small_zoo, monkeypatch, capsys
):
    """compose(progress=None) is the default: off a terminal (pytest's capture is one) gate
    training writes plain, rate-limited lines — no carriage-returned bars."""
    monkeypatch.setattr("moerge.progress.LINE_INTERVAL_S", 0.0)
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "sort")
    moerge.compose(None, reg, "phatgoose", data=small_zoo.expert_data, steps=3, batch_size=4, device="cpu")
    err = capsys.readouterr().err
    assert "gates sort: 1/3 (33%)" in err and "gates sort: 3/3 (100%)" in err and "— done" in err
    assert "\r" not in err


def test_line_progress_is_silent_for_short_work_and_a_terminal_gets_a_bar():
    import io

    from tqdm.auto import tqdm

    from moerge.progress import LineProgress, progress_bar

    buf = io.StringIO()
    bar = LineProgress(total=3, desc="x", file=buf, interval=60)
    for _ in range(3):
        bar.update()
    bar.set_postfix(loss="0.1")
    bar.close()
    assert buf.getvalue() == ""  # nothing for work that ends within the interval

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(range(2), file=Terminal()), tqdm)
    assert type(progress_bar(range(2), file=io.StringIO())) is LineProgress
    assert isinstance(progress_bar(range(2), progress=True, file=io.StringIO()), tqdm)
    silent = progress_bar(range(2), progress=False, file=buf, interval=0)
    assert list(silent) == [0, 1] and buf.getvalue() == ""


def test_merge_weights_may_name_experts_without_their_version(tmp_path, relative_adapter):
    reg = moerge.Registry(tmp_path / "reg")
    reg.register(relative_adapter, "sorting")
    path = moerge.merge(None, reg, "task_arithmetic", out=tmp_path / "m", weights={"sorting": 0.5})
    assert json.loads((path / "moerge_merge.json").read_text())["experts"] == ["sorting@1"]


# ------------------------------------------------------------------------ serving lifecycle


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm_after_answering_in_flight_streams_and_worker_errors_reach_its_log(tmp_path, small_zoo):
    """`moerge serve` as systemd/Kubernetes run it: a worker's failed batch (an expert whose
    weights vanished from the registry) is logged on the server's console; SIGTERM stops new
    requests, lets the in-flight stream finish, shuts Ray down and exits 0 with no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    reg_path = tmp_path / "reg"
    Registry(small_zoo.registry_path).snapshot(reg_path)
    reg = moerge.Registry(reg_path)
    broken = small_zoo.held_in[0]
    for f in reg.path(reg.get(broken)).glob("*.safetensors"):
        f.unlink()
    port = free_port()
    err_path = tmp_path / "server.err"
    (tmp_path / "serve.yml").write_text(  # the options as a config file (a relative registry is read beside it)
        f"registry: reg\nport: {port}\nnum-cpus: 0.5\nthreads: 4\ndrain_timeout: 20\nmax-batch: 8\n"
    )
    cmd = [sys.executable, "-c", "from moerge.cli import main; main()", "serve", "--config", str(tmp_path / "serve.yml")]
    cmd += ["--threads", "1"]  # a flag overrides the file
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, err_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up: " + err_path.read_text()[-3000:]
            time.sleep(1)
        task, prompt = small_zoo.held_in[1], small_zoo.test_split(small_zoo.held_in[1])[0].prompt
        r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "expert": broken}, timeout=60)
        assert r.status_code == 500 and "quote id" in r.json()["error"]["message"]
        error_id = r.json()["error"]["id"]
        deadline = time.monotonic() + 20
        while (
            not ("batch of 1 failed" in err_path.read_text() and error_id in err_path.read_text()) and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        log = err_path.read_text()
        assert "batch of 1 failed" in log and "IntegrityError" in log  # the worker's error, on the server's console
        assert f"internal error {error_id}" in log  # the id a client quotes is in the log, with its traceback
        events = []
        with (
            httpx.Client(timeout=60) as c,
            c.stream(
                "POST",
                f"{url}/v1/completions",
                json={"model": task, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True},
            ) as stream,
        ):
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            proc.send_signal(signal.SIGTERM)  # mid-stream
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 3
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err_path.read_text()
    assert "SIGTERM: no new requests" in log and "stopped" in log
    # no stack from the server process itself (Ray forwards, and de-duplicates late, the workers' lines: "(ExpertWorker pid=…)")
    own = [line for line in log.split("SIGTERM: no new requests")[1].splitlines() if "pid=" not in line]
    assert not any("Traceback" in line or "Error" in line for line in own), own


# ------------------------------------------------------------------------------- hub ids


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face hub cache (the layout huggingface_hub writes: models--org--name/
    refs/main → snapshots/<commit>/files), offline: ``put(repo_id, folder)`` adds a repo."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return commit

    return put


def test_experts_and_bases_by_hub_id_through_the_local_cache(tmp_path, small_zoo, hub_cache):
    hub_cache("acme/tiny-llama", small_zoo.base_path)
    lora = tmp_path / "lora"
    shutil.copytree(small_zoo.root / "lora" / "sort", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/tiny-llama"
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    commit = hub_cache("acme/sort-lora", lora)

    reg = moerge.Registry(tmp_path / "reg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoergeWarning)  # the base is found in the cache: its shapes are checked
        rec = reg.register("acme/sort-lora", "sort")
    assert rec.base_model == "acme/tiny-llama" and rec.base_fingerprint is not None
    assert rec.source == f"hf://acme/sort-lora@{commit}"
    assert reg.register(f"acme/sort-lora@{commit}", "sort").version == 2  # a pinned revision

    model = moerge.compose(None, reg.select(names=["sort@1"]), "arrow", device="cpu")  # the base by hub id
    prompt = small_zoo.test_split("sort")[0]
    assert model.generate([prompt.prompt], max_new_tokens=12)[0] == prompt.target
    merged = moerge.merge("acme/tiny-llama", ["acme/sort-lora"], "task_arithmetic", out=tmp_path / "merged")
    assert json.loads((merged / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-llama"

    with pytest.raises(
        FileNotFoundError, match=r"'acme/nothing' is not a folder .* not in the local Hugging Face cache \(HF_HUB_OFFLINE=1\)"
    ):
        reg.register("acme/nothing", "x")
    with pytest.raises(FileNotFoundError, match=r"not a folder .*nor a hub id"):
        reg.register("./no-such-folder", "x")
