"""Shared fixtures: tiny models built in-process (no network), PEFT adapters saved on disk, and
the `small` zoo (built once per machine into the moerge cache)."""

from __future__ import annotations

import json
import os
import re
import time
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


def copy_with_registries(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a built suite's folder (a zoo, a pool): its files as files, each registry in it (a
    folder holding ``index.sqlite``) as a :meth:`~moerge.Registry.snapshot` — another test may be
    writing artifacts into it meanwhile, and a plain copy of a live index can catch it half-written."""
    import shutil

    from moerge.registry import Registry

    registries = [p.parent for p in src.rglob("index.sqlite")]

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n in skip or Path(folder) / n in registries]

    shutil.copytree(src, dst, ignore=ignore)
    for reg in registries:
        Registry(reg).snapshot(dst / reg.relative_to(src))


def ids(batch: int = 3, length: int = 7, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the order tests are handed out in (issue 26: `make test` within 10 minutes on 2 cores) -----------
# pytest-xdist (`--dist loadgroup --no-loadscope-reorder`, see the Makefile) hands each worker the
# next unit of work — one test, or every test of one xdist_group — in collection order. Two workers
# idle when both wait for the small zoo's build (its lock), so the order is: the costliest unit that
# needs the small zoo first (its worker builds the zoo), then every unit that does not need it,
# costliest first (the other worker runs them meanwhile: the control and retrieval suites build
# there), then the rest, costliest first (longest-processing-time-first keeps the tail short).
# Costs are the seconds measured in the last run written to tests/durations.json
# (MOERGE_TEST_DURATIONS=tests/durations.json make test); a test not in it counts one second.
DURATIONS = Path(__file__).with_name("durations.json")


def _plain(nodeid: str) -> str:
    """A node id without the "@group" suffix pytest-xdist's loadgroup gives grouped tests."""
    return re.sub(r"@[\w-]+$", "", nodeid)


def _needs_small_zoo(item) -> bool:  # noqa: ANN001
    return "small_zoo" in getattr(item, "fixturenames", ())


#: modules whose tests are spread over the workers on purpose: their module fixture is a cheap copy
#: and their tests are heavy (one per docs page)
SPREAD_MODULES = ("test_readme",)


def _module_scoped(item) -> bool:  # noqa: ANN001
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(d.scope in ("module", "class") for seq in defs.values() for d in seq)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    # A module fixture is set up again whenever the test before came from another module: handed
    # out test by test, a module's tests land between others' (and on both workers) and rebuild it
    # (measured: the user pool's four trained LoRAs twice, the real LM's two experts three times,
    # the Twin fixture ten times). So a module that uses one, and is not grouped already, is one
    # unit: its tests in a row, on one worker.
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
        if module not in SPREAD_MODULES and _module_scoped(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"module-{module}"))
    costs = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    units: dict[str, list] = {}
    for item in items:
        group = item.get_closest_marker("xdist_group")
        units.setdefault(f"group:{group.args[0]}" if group else item.nodeid, []).append(item)

    def cost(unit: list) -> float:  # node ids without pytest-xdist's "@group" suffix, as written below
        return sum(costs.get(_plain(i.nodeid), 1.0) for i in unit)

    zoo = sorted((u for u in units.values() if any(map(_needs_small_zoo, u))), key=cost, reverse=True)
    free = sorted((u for u in units.values() if not any(map(_needs_small_zoo, u))), key=cost, reverse=True)
    ordered = zoo[:1] + free + zoo[1:]
    items[:] = [i for u in ordered for i in u]


_timeline: dict[str, dict] = {}
_cpu_mark: list[float] = []


def _cpu_now() -> tuple[float, float]:
    """This process's CPU seconds (every thread) and its reaped children's."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), kids.ru_utime + kids.ru_stime


def pytest_sessionstart(session) -> None:  # noqa: ANN001
    _cpu_mark[:] = _cpu_now()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001, ANN201
    """With $MOERGE_TEST_DURATIONS set, the CPU seconds each phase of a test took in the worker
    and in the subprocesses it waited for (Ray's processes are counted by neither)."""
    outcome = yield
    if not os.environ.get("MOERGE_TEST_DURATIONS"):
        return
    own, kids = _cpu_now()  # since the last phase's report (the session's start, for the first)
    outcome.get_result().user_properties.append(("cpu", (own - _cpu_mark[0], kids - _cpu_mark[1])))
    _cpu_mark[:] = [own, kids]


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001
    """With $MOERGE_TEST_DURATIONS set, each test's seconds (setup + call + teardown), its worker
    and when it started, written at the end of the run (the file above orders the next run)."""
    if not os.environ.get("MOERGE_TEST_DURATIONS"):
        return
    row = _timeline.setdefault(_plain(report.nodeid), {"seconds": 0.0, "start": report.start})
    row["seconds"] += report.duration
    for own, kids in (value for key, value in report.user_properties if key == "cpu"):
        row["cpu"] = row.get("cpu", 0.0) + own
        row["cpu_children"] = row.get("cpu_children", 0.0) + kids
    node = getattr(report, "node", None)  # the pytest-xdist worker that ran it; none without xdist
    row["worker"] = node.gateway.id if node is not None else "main"
    row["stop"] = report.stop


def pytest_sessionfinish(session) -> None:  # noqa: ANN001
    path = os.environ.get("MOERGE_TEST_DURATIONS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or not _timeline:
        return
    t0 = min(r["start"] for r in _timeline.values())
    Path(path).write_text(json.dumps({k: round(v["seconds"], 1) for k, v in sorted(_timeline.items())}, indent=0) + "\n")
    rows = sorted(_timeline.items(), key=lambda kv: kv[1]["start"])
    Path(path).with_suffix(".timeline.tsv").write_text(
        "".join(
            f"{v['worker']}\t{v['start'] - t0:.1f}\t{v['stop'] - t0:.1f}\t{v['seconds']:.1f}\t"
            f"{v.get('cpu', 0):.1f}\t{v.get('cpu_children', 0):.1f}\t{k}\n"
            for k, v in rows
        )
    )
