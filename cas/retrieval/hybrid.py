"""Hybrid retrieval: BM25 and dense rankings of the same units, fused.

fusion="rrf" (default): reciprocal-rank fusion, score(u) = sum_r w_r / (rrf_k + rank_r(u)) with
ranks from 1 over all units (Cormack et al., 2009; rrf_k = 60). Scale-free, so neither
retriever's score range dominates.
fusion="score": sum_r w_r * minmax_r(score_r(u)), each retriever's scores min-max normalised
per query to [0, 1].

The index directory holds both sub-indexes' state under bm25/ and dense/ (units once, at the
top).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cas.retrieval.base import RetrievalError, Retriever, _json_safe
from cas.retrieval.bm25 import BM25Retriever
from cas.retrieval.dense import DenseRetriever, Embedder
from cas.retrieval.units import Unit


def _ranks(scores: np.ndarray) -> np.ndarray:
  """1-based ranks per row (ties by index, as in `Retriever.search`): [Q, N] float64."""
  order = np.argsort(-scores, axis=1, kind="stable")  # [Q, N]
  ranks = np.empty_like(order)
  rows = np.arange(scores.shape[0])[:, None]
  ranks[rows, order] = np.arange(1, scores.shape[1] + 1)[None, :]
  return ranks.astype(np.float64)


def _minmax(scores: np.ndarray) -> np.ndarray:
  """Per-row min-max normalisation to [0, 1] (a constant row -> 0): [Q, N] float64."""
  s = scores.astype(np.float64)
  lo = s.min(axis=1, keepdims=True)
  span = s.max(axis=1, keepdims=True) - lo
  return np.where(span > 0, (s - lo) / np.where(span > 0, span, 1.0), 0.0)


class HybridRetriever(Retriever):
  """Fusion of a `BM25Retriever` and a `DenseRetriever` over the same units."""
  kind = "hybrid"
  runtime_keys = ("embedder",)

  def __init__(self, units: Sequence[Unit], collection_fingerprint: str, config: dict,
               embedder: Embedder | None = None):
    super().__init__(units, collection_fingerprint, config)
    if config.get("fusion") not in ("rrf", "score"):
      raise RetrievalError(f"hybrid fusion must be 'rrf' or 'score', got {config.get('fusion')!r}")
    self.bm25 = BM25Retriever(self.units, collection_fingerprint, config["bm25"])
    self.dense = DenseRetriever(self.units, collection_fingerprint, config["dense"],
                                embedder=embedder)

  @classmethod
  def build(cls, units: Sequence[Unit], *, collection_fingerprint: str | None = None,
            embedder: Embedder | None = None, fusion: str = "rrf", rrf_k: float = 60.0,
            weights: tuple[float, float] = (1.0, 1.0), bm25_kwargs: dict | None = None
            ) -> "HybridRetriever":
    """Builds both sub-indexes. weights: (bm25, dense); bm25_kwargs: `BM25Retriever.build`'s."""
    if fusion not in ("rrf", "score"):
      raise ValueError(f"fusion must be 'rrf' or 'score', got {fusion!r}")
    if rrf_k < 0 or len(weights) != 2 or min(weights) < 0:
      raise ValueError(f"need rrf_k >= 0 and two weights >= 0, got rrf_k={rrf_k}, "
                       f"weights={weights}")
    bm25 = BM25Retriever.build(units, collection_fingerprint=collection_fingerprint,
                               **(bm25_kwargs or {}))
    dense = DenseRetriever.build(units, collection_fingerprint=collection_fingerprint,
                                 embedder=embedder)
    config = _json_safe({"fusion": fusion, "rrf_k": rrf_k, "weights": list(weights),
                         "bm25": bm25.config, "dense": dense.config})
    r = cls(bm25.units, bm25.collection_fingerprint, config, embedder=dense.embedder)
    r.bm25, r.dense = bm25, dense
    return r

  def _scores(self, queries: list[str]) -> np.ndarray:
    sb, sd = self.bm25.scores(queries), self.dense.scores(queries)  # [Q, N] each
    wb, wd = self.config["weights"]
    if self.config["fusion"] == "rrf":
      k = self.config["rrf_k"]
      fused = wb / (k + _ranks(sb)) + wd / (k + _ranks(sd))
    else:
      fused = wb * _minmax(sb) + wd * _minmax(sd)
    return fused.astype(np.float32)

  def _save_state(self, path: str) -> None:
    for name, r in (("bm25", self.bm25), ("dense", self.dense)):
      os.makedirs(os.path.join(path, name))
      r._save_state(os.path.join(path, name))

  def _load_state(self, path: str) -> None:
    self.bm25._load_state(os.path.join(path, "bm25"))
    self.dense._load_state(os.path.join(path, "dense"))
