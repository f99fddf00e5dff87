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
HEADER = "# {title}\n"  # cartridge.init_header: the line ICL shows above a document (cas.eval.methods)
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


def header_ids(title: str, text: str, encode: Callable[[str], Sequence[int]]) -> list[int]:
  """The tokens of the title line ICL shows above a document ("# <title>"), for an init that starts
  with it (cartridge.init_header): none when there is no title or the text already opens with it
  (the built-in synthetic records do; prose texts and the parts after a document's first do not)."""
  if not title or text.lstrip().startswith(HEADER.format(title=title).strip()):
    return []
  return list(encode(HEADER.format(title=title)))


def init_ids(text: str, title: str, budget: int, encode: Callable[[str], Sequence[int]], *, mode: str = "document",
             idf: Mapping[str, float] | None = None, lead: float = 0.0, header: bool = False) -> list[int]:
  """The token ids a cartridge's init reads (cartridge.init_text = `mode`, salient_lead = `lead`,
  init_header = `header`): the title line when `header`, then the text ("document": all of it, the
  init cuts it to p; "salient": its most salient sentences that fit in what the header left of `budget`;
  a text that opens with its title line keeps it first, and once, in both)."""
  head = header_ids(title, text, encode) if header else []
  if mode == "salient":
    line = HEADER.format(title=title).strip()
    if header and title and text.lstrip().startswith(line):  # the text opens with its title: keep it first, once
      head, text = list(encode(HEADER.format(title=title))), text.lstrip()[len(line):].lstrip()
    return head + salient_ids(text, max(budget - len(head), 1), idf or {}, encode, lead=lead)
  if mode != "document":
    raise ValueError(f"cartridge.init_text={mode!r}: choose from {INIT_TEXTS}")
  return head + list(encode(text))
