"""BM25 over units with the `bm25s` library (numpy backend; sparse precomputed scores).

Tokenisation (ours, recorded in the index config): lower-case, Unicode word characters
(`\\w+`, so "O'Sullivan" -> "o", "sullivan"; "7.9%" -> "7", "9"), English stop words removed
(bm25s's list), no stemming. Query words missing from the vocabulary are dropped; a query with
no known word scores every unit 0.
"""
from __future__ import annotations

import logging as std_logging
import os
import re
from typing import Sequence

import numpy as np

from cas.retrieval.base import RetrievalError, Retriever, _json_safe
from cas.retrieval.units import Unit

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_STATE_DIR = "bm25s"


def _bm25s():
  try:
    import bm25s  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("BM25 retrieval needs the bm25s package: pip install 'bm25s>=0.3.16'") from e
  # bm25s sets its logger to DEBUG on import ("Building index from tokens" on every build).
  logger = std_logging.getLogger("bm25s")
  if logger.level == std_logging.DEBUG:
    logger.setLevel(std_logging.INFO)
  return bm25s


def _stopwords(name: str | None) -> frozenset[str]:
  if name in (None, "none"):
    return frozenset()
  if name == "en":
    from bm25s.stopwords import STOPWORDS_EN  # noqa: PLC0415
    return frozenset(STOPWORDS_EN)
  raise ValueError(f"stopwords must be 'en' or None, got {name!r}")


class BM25Retriever(Retriever):
  """Okapi BM25 (bm25s, Lucene variant by default) over the units' texts."""
  kind = "bm25"

  def __init__(self, units: Sequence[Unit], collection_fingerprint: str, config: dict):
    super().__init__(units, collection_fingerprint, config)
    self._stop = _stopwords(self.config.get("stopwords"))
    self._bm25 = None

  @classmethod
  def build(cls, units: Sequence[Unit], *, collection_fingerprint: str | None = None,
            k1: float = 1.5, b: float = 0.75, method: str = "lucene",
            stopwords: str | None = "en") -> "BM25Retriever":
    """Indexes `units`. k1, b, method: bm25s parameters; stopwords: 'en' or None."""
    bm25s = _bm25s()
    config = _json_safe({"k1": k1, "b": b, "method": method, "stopwords": stopwords,
                         "tokenizer": "lower-\\w+", "bm25s_version": bm25s.__version__})
    return cls._create(units, collection_fingerprint, config)

  def tokenize(self, text: str) -> list[str]:
    """Lower-cased word tokens of `text` without stop words."""
    return [t for t in _WORD_RE.findall(text.lower()) if t not in self._stop]

  def _fit(self) -> None:
    bm25s = _bm25s()
    c = self.config
    self._bm25 = bm25s.BM25(k1=c["k1"], b=c["b"], method=c["method"])
    tokens = [self.tokenize(u.text) for u in self.units]
    if not any(tokens):
      raise RetrievalError("cannot build a BM25 index: no unit has a word that is not a stop word")
    self._bm25.index(tokens, show_progress=False)

  def _scores(self, queries: list[str]) -> np.ndarray:
    vocab = self._bm25.vocab_dict
    out = np.zeros((len(queries), self.num_units), np.float32)  # [Q, N] float32
    for i, q in enumerate(queries):
      toks = [t for t in self.tokenize(q) if t in vocab and t != ""]
      if toks:
        out[i] = self._bm25.get_scores(toks)
    return out

  def _save_state(self, path: str) -> None:
    self._bm25.save(os.path.join(path, _STATE_DIR), show_progress=False)

  def _load_state(self, path: str) -> None:
    bm25s = _bm25s()
    state = os.path.join(path, _STATE_DIR)
    if not os.path.isdir(state):
      raise RetrievalError(f"{path}: BM25 index without its {_STATE_DIR}/ directory")
    self._bm25 = bm25s.BM25.load(state, show_progress=False)
    n = int(self._bm25.scores["num_docs"])
    if n != self.num_units:
      raise RetrievalError(f"{state}: holds {n} documents but the index has {self.num_units} units")
