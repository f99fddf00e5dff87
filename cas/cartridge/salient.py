"""A cartridge's init text from the most salient sentences of its document (issue 26).

The `first_tokens` init is the KV of a document's first p tokens. On the real-prose collection a trained
cartridge answers facts inside that window almost like ICL and facts after it barely above chance
(RESULTS.md, "Where the misses are"): self-study distillation adds little that the init lacks. With
`cartridge.init_text="salient"` the init reads, instead of the first p tokens, the document's sentences of
highest mean IDF (the rarest words over the collection's units: a TF-IDF extractive summary) that fit in
p - num_frozen tokens, in document order, so a long document's distinctive sentences are in the cartridge
from the start wherever they stand. Self-study and training are unchanged (they see the whole document).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

INIT_TEXTS = ("document", "salient")
_WORD = re.compile(r"[^\W_]{3,}")  # words of 3+ letters or digits (any script)
_SENT = re.compile(r"(?<=[.!?;])\s+|\n+")  # after sentence punctuation, or at line breaks


def idf_table(texts: Iterable[str]) -> dict[str, float]:
  """word (lower case) -> log(number of texts / texts that hold it)."""
  texts = list(texts)
  df: dict[str, int] = {}
  for t in texts:
    for w in {w.lower() for w in _WORD.findall(t)}:
      df[w] = df.get(w, 0) + 1
  return {w: math.log(len(texts) / n) for w, n in df.items()}


def sentences(text: str) -> list[str]:
  return [s.strip() for s in _SENT.split(text) if s.strip()]


def salient_ids(text: str, budget: int, idf: Mapping[str, float], encode: Callable[[str], Sequence[int]],
                lead: float = 0.0) -> list[int]:
  """Token ids of `text` cut to at most `budget` tokens: the whole text if it fits, else its sentences of
  highest mean IDF (ties: the earlier sentence) that fit, greedily, joined in document order. `lead` in
  [0, 1): that share of the budget goes first to the text's opening sentences, in a row (the part a
  first_tokens init would hold), the rest to the most salient of the others."""
  if not 0.0 <= lead < 1.0:
    raise ValueError(f"salient lead={lead}: a share of the budget in [0, 1)")
  ids = list(encode(text))
  if len(ids) <= budget:
    return ids
  sents = sentences(text)
  cost = [len(encode(" " + s)) for s in sents]
  keep, used = [], 0
  for i, n in enumerate(cost):  # the opening sentences, while they fit in the lead's share
    if used + n > lead * budget:
      break
    keep.append(i)
    used += n
  score = [float(np.mean([idf.get(w.lower(), 0.0) for w in _WORD.findall(s)] or [0.0])) for s in sents]
  for i in sorted(range(len(keep), len(sents)), key=lambda i: (-score[i], i)):
    if used + cost[i] <= budget:
      keep.append(i)
      used += cost[i]
  if not keep:  # no sentence fits (one very long sentence): the text's first tokens
    return ids[:budget]
  return list(encode(" ".join(sents[i] for i in sorted(keep))))[:budget]
