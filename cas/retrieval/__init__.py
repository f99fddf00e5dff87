"""Retrieval over a document collection (DESIGN §1, §6): BM25 (bm25s), dense (all-MiniLM-L6-v2
in JAX), and their hybrid; indexes over documents (choose cartridges) or chunks (text RAG),
saved next to the cartridge store and tied to their collection by a fingerprint.

  units, fp = units_from_collection(collection, unit="document")
  r = BM25Retriever.build(units, collection_fingerprint=fp)
  r.search(question.question, k=3)          # [(unit_id, score)]
  r.save(default_index_dir(store_dir, "bm25-document"))
  r = Retriever.load(path, expect_collection_fingerprint=collection_fingerprint(collection))
  recall_at_k(r, collection.questions)      # {"recall@1": ..., ...}
"""
from cas.retrieval.base import (RetrievalError, Retriever, default_index_dir, load_retriever,
                                read_index_manifest)
from cas.retrieval.bm25 import BM25Retriever
from cas.retrieval.dense import DenseRetriever, Embedder, default_embedder, default_model_dir
from cas.retrieval.evaluate import RETRIEVERS, build_retriever, recall_at_k
from cas.retrieval.hybrid import HybridRetriever
from cas.retrieval.units import (Unit, chunk_units, collection_fingerprint, document_units,
                                 units_fingerprint, units_from_collection)

__all__ = [
    "BM25Retriever", "DenseRetriever", "Embedder", "HybridRetriever", "RETRIEVERS",
    "RetrievalError", "Retriever", "Unit", "build_retriever", "chunk_units",
    "collection_fingerprint", "default_embedder", "default_index_dir", "default_model_dir",
    "document_units", "load_retriever", "read_index_manifest", "recall_at_k",
    "units_fingerprint", "units_from_collection",
]
