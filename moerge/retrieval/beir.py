"""The BEIR folder layout: reading it with every broken line named, and writing it."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

Corpus = dict[str, dict[str, str]]
Queries = dict[str, str]
Qrels = dict[str, dict[str, int]]


class BeirFormatError(ValueError):
    """A BEIR folder that cannot be read as it is; the message names the file, line and fix."""


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a line that is not JSON raises
    ``error`` naming the file and line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not a JSON object ({exc.msg})") from None


def _jsonl(path: Path, what: str, fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise BeirFormatError(f"{path} is missing: a BEIR folder has corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    out: dict[str, dict[str, Any]] = {}
    for n, row in iter_jsonl(path, BeirFormatError):
        if not isinstance(row, dict):
            raise BeirFormatError(f"{path}:{n}: a {what} line must be a JSON object, got {type(row).__name__}")
        key = row.get("_id")
        if not isinstance(key, str | int) or isinstance(key, bool) or str(key) == "":
            raise BeirFormatError(f'{path}:{n}: the {what} has no "_id" (a non-empty string)')
        key = str(key)
        if key in out:
            raise BeirFormatError(f"{path}:{n}: {what} id {key!r} appears twice")
        for f in fields:
            if f in row and not isinstance(row[f], str):
                raise BeirFormatError(f"{path}:{n}: {what} {key!r}: {f!r} must be a string")
        if not any(row.get(f) for f in fields):
            raise BeirFormatError(f"{path}:{n}: {what} {key!r} has no text (fields {', '.join(fields)})")
        out[key] = row
    if not out:
        raise BeirFormatError(f"{path} holds no {what}")
    return out


def _qrels(path: Path, corpus: Mapping[str, Any], queries: Mapping[str, Any]) -> Qrels:
    if not path.is_file():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise BeirFormatError(f"{path} is missing; this folder has qrels for {splits or 'no split'}")
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or not "".join(row).strip():
                continue
            if n == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # BEIR's header
            if len(row) != 3:
                raise BeirFormatError(f"{path}:{n}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(row)}")
            qid, did, score = (x.strip() for x in row)
            try:
                rel = int(score)
            except ValueError:
                raise BeirFormatError(f"{path}:{n}: score {score!r} is not an integer") from None
            if qid not in queries:
                raise BeirFormatError(f"{path}:{n}: query {qid!r} is not in queries.jsonl; add it there or drop the line")
            if did not in corpus:
                raise BeirFormatError(f"{path}:{n}: document {did!r} is not in corpus.jsonl; add it there or drop the line")
            if did in qrels.get(qid, {}):
                raise BeirFormatError(f"{path}:{n}: ({qid!r}, {did!r}) is judged twice")
            qrels.setdefault(qid, {})[did] = rel
    if not qrels:
        raise BeirFormatError(f"{path} holds no judgments")
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> tuple[Corpus, Queries, Qrels]:
    """``(corpus, queries, qrels)`` of one split of a BEIR folder. ``queries`` holds the split's
    judged queries only (as BEIR's loader does); every qrel must name a known query and document."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BeirFormatError(f"{root} is not a folder")
    raw_corpus = _jsonl(root / "corpus.jsonl", "document", ("title", "text"))
    raw_queries = _jsonl(root / "queries.jsonl", "query", ("text",))
    corpus = {k: {"title": str(v.get("title") or ""), "text": str(v.get("text") or "")} for k, v in raw_corpus.items()}
    all_queries = {k: str(v.get("text") or "") for k, v in raw_queries.items()}
    qrels = _qrels(root / "qrels" / f"{split}.tsv", corpus, all_queries)
    queries = {q: all_queries[q] for q in qrels}
    return corpus, queries, qrels


def load_corpus(folder: str | Path) -> Corpus:
    """The corpus of a BEIR folder alone (what a search index needs; no queries or qrels)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BeirFormatError(f"{root} is not a folder")
    raw = _jsonl(root / "corpus.jsonl", "document", ("title", "text"))
    return {k: {"title": str(v.get("title") or ""), "text": str(v.get("text") or "")} for k, v in raw.items()}


def write_beir(folder: str | Path, corpus: Corpus, queries: Queries, qrels: Mapping[str, Qrels]) -> Path:
    """Write ``corpus``, ``queries`` and ``qrels`` (split name → judgments) in the BEIR layout."""
    root = Path(folder).expanduser()
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for k, d in corpus.items():
            fh.write(json.dumps({"_id": k, "title": d.get("title", ""), "text": d["text"]}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for k, t in queries.items():
            fh.write(json.dumps({"_id": k, "text": t}) + "\n")
    for split, judged in qrels.items():
        with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for q, docs in judged.items():
                for d, r in docs.items():
                    fh.write(f"{q}\t{d}\t{int(r)}\n")
    return root
