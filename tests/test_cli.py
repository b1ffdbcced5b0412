"""The moerge command: --help everywhere, registry round trip, and the demo on the small zoo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moerge.cli import main

COMMANDS = [
    [],
    ["demo"],
    ["zoo"],
    ["zoo", "build"],
    ["zoo", "tasks"],
    ["registry"],
    ["registry", "add"],
    ["registry", "list"],
    ["registry", "show"],
    ["registry", "rm"],
    ["registry", "export"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "moerge")
def test_every_command_has_help(cmd):
    result = CliRunner().invoke(main, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_registry_commands_round_trip(tmp_path, lora_folder, llama_folder):
    run = CliRunner().invoke
    reg = ["--registry", str(tmp_path / "reg")]
    r = run(
        main,
        [
            "registry",
            "add",
            *reg,
            str(lora_folder),
            "--name",
            "qa",
            "--skill",
            "qa",
            "--tag",
            "t",
            "--example",
            "q?",
            "--metric",
            "em=0.5",
            "--base",
            str(llama_folder),
            "--description",
            "answers",
        ],
    )
    assert r.exit_code == 0 and "registered qa@1 (lora, peft)" in r.output, r.output
    r = run(main, ["registry", "list", *reg, "--json"])
    listed = json.loads(r.output)
    assert [e["name"] for e in listed] == ["qa"] and listed[0]["metrics"] == {"em": 0.5}
    assert "qa@1" in run(main, ["registry", "list", *reg]).output
    shown = json.loads(run(main, ["registry", "show", *reg, "qa"]).output)
    assert shown["skills"] == ["qa"] and shown["path"].endswith("qa/1")
    r = run(main, ["registry", "export", *reg, "qa", str(tmp_path / "out")])
    assert r.exit_code == 0 and (tmp_path / "out" / "adapter_config.json").exists()
    r = run(main, ["registry", "add", *reg, str(lora_folder), "--name", "../bad"])
    assert r.exit_code == 2 and "path separator" in r.output
    r = run(main, ["registry", "add", *reg, str(lora_folder), "--name", "x", "--metric", "oops"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = run(main, ["registry", "show", *reg, "missing"])
    assert r.exit_code == 2 and "'missing' is not in the registry" in r.output
    assert run(main, ["registry", "rm", *reg, "qa", "--yes"]).output.strip() == "removed qa@1"
    assert json.loads(run(main, ["registry", "list", *reg, "--json"]).output) == []


def test_zoo_tasks_lists_every_task():
    from moerge.zoo import TASKS

    out = CliRunner().invoke(main, ["zoo", "tasks"]).output
    assert all(name in out for name in TASKS)


@pytest.mark.slow
def test_demo_writes_table_json_and_heatmap(tmp_path, small_zoo):
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        main, ["demo", "--preset", "small", "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "| base |" in r.output and "| oracle |" in r.output and "best single expert" in r.output
    data = json.loads((tmp_path / "r.json").read_text())
    for name in ("base", "oracle", "best single expert"):
        m = data["methods"][name]
        assert {"held_in_normalized", "held_out_accuracy", "per_task"} <= set(m)
        assert set(m["per_task"]) == set(data["held_in"] + data["held_out"])
    assert (out / "report.md").read_text().startswith("# moerge demo")
    assert (out / "cross_task.png").read_bytes()[:4] == b"\x89PNG"
