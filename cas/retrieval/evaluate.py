"""Building an index from a collection in one call, and document-level recall@k."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from cas.data.types import Question
from cas.retrieval.base import RetrievalError, Retriever
from cas.retrieval.bm25 import BM25Retriever
from cas.retrieval.dense import DenseRetriever
from cas.retrieval.hybrid import HybridRetriever
from cas.retrieval.units import DocSource, UnitKind, units_from_collection

RETRIEVERS: dict[str, type[Retriever]] = {
    "bm25": BM25Retriever, "dense": DenseRetriever, "hybrid": HybridRetriever}


def build_retriever(kind: str, source: DocSource, *, unit: UnitKind = "document",
                    chunk_words: int = 128, overlap_words: int = 32, **kwargs) -> Retriever:
  """Builds a `kind` ('bm25' | 'dense' | 'hybrid') index over a collection's documents or chunks.

  Args:
    source: a `Collection`, an iterable of `Document`s, or a collection directory.
    unit: 'document' (unit ids are doc ids) or 'chunk' (passages, see `chunk_units`).
    kwargs: the retriever's `build` options (e.g. `embedder=`, `k1=`, `fusion=`).
  """
  if kind not in RETRIEVERS:
    raise ValueError(f"unknown retriever kind {kind!r}; choose one of {sorted(RETRIEVERS)}")
  units, fp = units_from_collection(source, unit=unit, chunk_words=chunk_words,
                                    overlap_words=overlap_words)
  return RETRIEVERS[kind].build(units, collection_fingerprint=fp, **kwargs)


def recall_at_k(retriever: Retriever, questions: Iterable[Question],
                ks: Sequence[int] = (1, 3, 5, 10), level: str = "unit") -> dict:
  """Document-level recall@k: the share of questions whose gold document is retrieved in the top
  k; for a question that needs several documents (`Question.doc_ids`), all of them must be.

  level="unit": among the documents of the top-k units (for a chunk index: the documents of
  the k passages a RAG prompt would hold). level="doc": among the top-k distinct documents
  (`search_docs`, a document scoring as its best unit: how cartridges are chosen). The two are
  the same for a document index. Queries are the questions' text only (no MC options: their
  distractors come from other documents).

  Returns:
    {"recall@k": float for each k, "num_questions": int, "level": level, "kind": retriever.kind}.
  Raises:
    ValueError if a k is not a positive int or exceeds the index (units, or documents for
    level="doc"), or no question is given; RetrievalError if a question's document is not in
    the index (another collection).
  """
  if level not in ("unit", "doc"):
    raise ValueError(f"level must be 'unit' or 'doc', got {level!r}")
  ks = list(ks)
  bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
  if bad:
    raise ValueError(f"recall_at_k: every k must be a positive int, got ks={ks!r}")
  ks = sorted(set(int(k) for k in ks))
  if not ks:
    raise ValueError("ks is empty")
  questions = list(questions)
  if not questions:
    raise ValueError("recall_at_k needs at least one question")
  known = set(retriever.doc_ids)
  for q in questions:
    for d in q.doc_ids:
      if d not in known:
        raise RetrievalError(f"question {q.qid!r} is about document {d!r}, which is not in "
                             f"the {retriever.kind} index (collection "
                             f"{retriever.collection_fingerprint})")
  queries = [q.question for q in questions]
  kmax = ks[-1]
  if level == "doc":
    results = retriever.search_docs_batch(queries, kmax)
    ranked_docs = [[d for d, _ in r] for r in results]
  else:
    results = retriever.search_batch(queries, kmax)
    ranked_docs = [[retriever.unit(u).doc_id for u, _ in r] for r in results]
  # Position (0-based) by which all of the question's documents have appeared; kmax if never.
  first = np.array([max(docs.index(d) if d in docs else kmax for d in q.doc_ids)
                    for q, docs in zip(questions, ranked_docs)])
  out: dict = {f"recall@{k}": float(np.mean(first < k)) for k in ks}
  out.update(num_questions=len(questions), level=level, kind=retriever.kind)
  return out
