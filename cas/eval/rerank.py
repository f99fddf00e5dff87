"""Reranking retrieved cartridges by the model's own likelihood of the question (issue 21, item 4).

`cartridge_reranked@k`: the document index proposes the top-m documents (m =
config.eval.rerank_candidates); each candidate's cartridge is loaded alone and the model scores the
question's tokens after it (mean log-likelihood per token, the user turn of the prompt format up to
the question as the prompt); the k candidates whose cartridge makes the question most likely are
loaded, best first. A cartridge trained on a document should make questions about that document
more likely than the cartridge of a look-alike: this uses the cartridges themselves as a
reranker, at m short forward passes per question (no generation, no document text).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cas.eval.scoring import score_continuations


def question_head_ids(tok) -> list[int]:
  """Token ids of the prompt format's user turn up to (not including) the user's words: the common
  start of two one-message prompts that differ only in their content."""
  a = tok.prompt_ids([{"role": "user", "content": "alpha"}], add_generation_prompt=False)
  b = tok.prompt_ids([{"role": "user", "content": "omega"}], add_generation_prompt=False)
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return list(a[:n])


def question_logliks(model, tok, contexts: Sequence, question: str) -> np.ndarray:
  """Mean log-likelihood per token of `question` after each context (cas.eval.methods.Context with
  a cartridge prefix), [len(contexts)] float64."""
  head = question_head_ids(tok)
  q_ids = tok.encode(question)
  if not q_ids:
    raise ValueError("question_logliks: the question has no tokens")
  out = []
  for ctx in contexts:
    s, n = score_continuations(model, ctx.prefix_kv, head, [q_ids], position_offset=ctx.position_offset,
                               text_prefix=ctx.prefix_tokens > 0)
    out.append(float(s[0]) / max(int(n[0]), 1))
  return np.asarray(out, np.float64)


def rerank(candidates: Sequence[str], logliks: Sequence[float]) -> list[str]:
  """Candidates ordered by log-likelihood, best first; ties keep the retriever's order."""
  order = sorted(range(len(candidates)), key=lambda i: (-float(logliks[i]), i))
  return [candidates[i] for i in order]


def reranked_ids(candidates: Sequence[str], context_of: Callable[[str], object], model, tok, question: str,
                 cache: dict | None = None) -> tuple[list[str], list[float]]:
  """(candidates reranked best first, their log-likelihoods in that order). `context_of(doc_id)`
  builds the context of one candidate's cartridge(s); `cache` (question, doc_id) -> loglik is reused
  across k."""
  cache = {} if cache is None else cache
  todo = [d for d in candidates if (question, d) not in cache]
  if todo:
    lls = question_logliks(model, tok, [context_of(d) for d in todo], question)
    cache.update({(question, d): float(x) for d, x in zip(todo, lls)})
  lls = [cache[(question, d)] for d in candidates]
  order = rerank(candidates, lls)
  return order, [cache[(question, d)] for d in order]
