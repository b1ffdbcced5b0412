"""The README's and the docs' snippets, run as written (issue 12: "the README's snippets all run
as written"; issue 26: the docs' too, and the docs build with ``mkdocs build --strict``).

Every fenced ``python`` and ``bash`` block of README.md and of every page of ``docs/`` (in the
order of ``mkdocs.yml``'s nav) runs, except those marked just above with
``<!-- readme-test: skip (reason) -->`` (a reason is required). The Python blocks run in order
as one script (later blocks use names the first defines, as a reader would), in a fresh
process whose zoo cache holds a copy of the small zoo — so artifacts the snippets prepare never
reach the shared one — in an empty working folder. ``bash`` blocks run there line by line with
``bash -e``; ``<!-- readme-test: server -->`` starts its first line in the background until
``/healthz`` answers, runs the rest, then stops it with SIGTERM; ``<!-- readme-test: in-repo -->``
runs from the repository root with this interpreter's environment.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_with_registries

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def nav_pages() -> list[Path]:
    """The docs pages in the order of mkdocs.yml's nav."""
    import yaml

    out: list[Path] = []

    def walk(item) -> None:  # noqa: ANN001
        if isinstance(item, str):
            out.append(ROOT / "docs" / item)
        elif isinstance(item, dict):
            for v in item.values():
                walk(v)
        elif isinstance(item, list):
            for v in item:
                walk(v)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    return out


def blocks() -> list[dict]:
    out = []
    for path in [README, *nav_pages()]:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            mark = m["mark"] or ""
            line = text[: m.start("body")].count("\n") + 1
            out.append(
                {"lang": m["lang"], "body": m["body"], "mark": mark, "line": line, "where": f"{path.relative_to(ROOT)}:{line}"}
            )
    return out


def commands(body: str) -> list[str]:
    """Shell lines with backslash continuations joined; comments and blanks dropped."""
    joined = body.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_every_skipped_block_says_why_and_the_runnable_ones_are_most():
    bs = [b for b in blocks() if b["lang"] in ("python", "bash")]
    skipped = [b for b in bs if b["mark"].startswith("skip")]
    assert all(re.match(r"skip \(.+\)", b["mark"]) for b in skipped), [b["where"] for b in skipped]
    assert len(skipped) <= 3 and len(bs) - len(skipped) >= 8


@pytest.fixture(scope="module")
def sandbox(small_zoo, tmp_path_factory):
    """An empty working folder and a zoo cache holding a copy of the small zoo."""
    root = tmp_path_factory.mktemp("readme")
    cache = root / "cache"
    copy_with_registries(small_zoo.root, cache / "zoo" / small_zoo.root.name, skip=("eval-cache",))
    from moerge.zoo.retrieval import load_suite

    suite = load_suite("retrieval-small", progress=False)  # the retrieval snippets' suite, copied like the zoo
    copy_with_registries(suite.root, cache / "retrieval" / suite.root.name, skip=("bench",))
    from moerge.zoo.symbolic import load_pool

    pool = load_pool(small_zoo, progress=False)  # the Symbolic-MoE snippets' pool, copied like the zoo
    copy_with_registries(pool.root, cache / "symbolic" / pool.root.name)
    work = root / "work"
    work.mkdir()
    env = {
        **os.environ,
        "MOERGE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    return work, env


def test_every_docs_page_is_in_the_nav_and_the_docs_build_strict(tmp_path):
    pages = {p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md")}
    assert pages == {p.relative_to(ROOT / "docs") for p in nav_pages()}
    r = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("doc-heading") > 50  # the API reference rendered


def _run(cmd, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_the_python_snippets_run_as_written(sandbox):
    work, env = sandbox
    code = [b for b in blocks() if b["lang"] == "python" and not b["mark"].startswith("skip")]
    script = "\n\n".join(f"# {b['where']}\n{b['body']}" for b in code)
    (work / "readme_snippets.py").write_text(script)
    r = _run([sys.executable, "readme_snippets.py"], work, env, timeout=900)
    assert "a b c" in r.stdout  # the serving block prints its answers
    assert (
        (work / "route.png").exists() and (work / "glider.json").exists() and (work / "merged-mk" / "model.safetensors").exists()
    )


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the README's server did not come up: " + log.read_text()[-3000:])


def _pages_with_shell() -> list[str]:
    return list(
        dict.fromkeys(b["where"].split(":")[0] for b in blocks() if b["lang"] == "bash" and not b["mark"].startswith("skip"))
    )


@pytest.mark.parametrize("page", _pages_with_shell())
def test_the_cli_snippets_run_as_written(sandbox, page):
    """Each page's shell blocks in order (a page's later blocks may use what its earlier ones
    made); pages apart, so pytest-xdist spreads them over its workers."""
    work, env = sandbox
    for b in blocks():
        if b["lang"] != "bash" or b["mark"].startswith("skip") or not b["where"].startswith(f"{page}:"):
            continue
        lines = commands(b["body"])
        if b["mark"].startswith("in-repo"):
            for line in lines:  # make runs its recipe with this interpreter's environment, not a new .venv
                if line.startswith("make "):
                    line = line.split(" #")[0].rstrip() + f" BIN={BIN} -o {BIN}/.installed"
                _run(["bash", "-ec", line], ROOT, env, timeout=300)
        elif b["mark"].startswith("server"):
            log = work / "server.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen(["bash", "-c", f"exec {lines[0]}"], cwd=work, env=env, stdout=fh, stderr=fh)
            try:
                port = re.search(r"--port (\d+)", lines[0])[1]
                _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
                for line in lines[1:]:
                    _run(["bash", "-ec", line], work, env, timeout=120)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        else:
            for line in lines:
                _run(["bash", "-ec", line], work, env, timeout=300)
