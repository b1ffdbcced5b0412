"""Dense retrieval data, search and evaluation, in BEIR's shapes (issue 14, first part).

* :func:`load_beir` reads any folder in the BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv``) into ``corpus = {doc_id: {"title", "text"}}``, ``queries =
  {query_id: text}`` and ``qrels = {query_id: {doc_id: relevance}}``, refusing broken lines,
  duplicate ids and judgments that name unknown queries or documents, by file and line.
* :class:`Index` is a faiss index over an encoder's unit-norm document embeddings (inner product
  = cosine), built once and saved beside the corpus; :meth:`Index.search` returns the BEIR /
  pytrec_eval run format ``{query_id: {doc_id: score}}``.
* :func:`evaluate` scores a run with trec_eval's measures through ``pytrec_eval`` (not by hand).
"""

from moerge.retrieval.beir import BeirFormatError, load_beir, load_corpus, write_beir
from moerge.retrieval.evaluate import evaluate
from moerge.retrieval.index import Index, index_folder

__all__ = ["BeirFormatError", "Index", "evaluate", "index_folder", "load_beir", "load_corpus", "write_beir"]
