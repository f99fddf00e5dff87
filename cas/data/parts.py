"""Several cartridges per long document (config.cartridge.max_doc_tokens, issue 26).

A fixed p per document is too little KV for a long one: with `max_doc_tokens` = M > 0, every
document of more than M tokens (the model tokenizer's count, the one the pipeline uses) becomes
n = ceil(tokens / M) near-equal *parts*, cut on sentence or paragraph boundaries (never inside a
word; the parts joined are exactly the document's text). Each part is a cartridge *unit* with
its own self-study and cartridge:

  unit id     f"{doc_id}#{i}"                       i = 1..n
  unit title  f"{title} (part {i} of {n})"

A document of at most M tokens stays one unit with its own id and title. Questions, ICL, RAG and
retrieval stay on the whole documents; loading a document's cartridge loads all of its parts, in
order (cas.pipeline.CasStages.evaluate).

Runs with parts keep their self-study and training apart from the whole-document ones:
`units_root(workdir, M)` is <workdir>/parts<M> (its synth/ and run directories), the workdir itself
when M = 0. The self-study manifest records max_doc_tokens (MANIFEST_KEY).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

from cas.data.types import Document

MANIFEST_KEY = "max_doc_tokens"  # recorded in the self-study manifest of a run with parts

# A cut goes after the whitespace that follows a sentence end (. ! ? with closing quotes or
# brackets) or a paragraph break, so every part but the first starts with a word.
_SENTENCE_OR_PARAGRAPH = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\n[ \t]*\n\s*")
_WHITESPACE = re.compile(r"\s+")


def unit_id(doc_id: str, i: int) -> str:
  """The id of part `i` (from 1) of document `doc_id`."""
  return f"{doc_id}#{i}"


def units_root(workdir: str, max_doc_tokens: int) -> str:
  """The directory whose synth/ and run directories hold a run with `max_doc_tokens` (0: the
  workdir itself; M > 0: <workdir>/parts<M>, so runs with other M never share self-study)."""
  m = int(max_doc_tokens or 0)
  return workdir if m <= 0 else os.path.join(workdir, f"parts{m}")


def boundaries(text: str) -> list[int]:
  """Character offsets (0 < b < len(text), ascending) where `text` may be cut: after the
  whitespace that follows a sentence end or a paragraph break; a text without any falls back to
  every run of whitespace (still never inside a word)."""
  body = text.strip()
  if not body:
    return []
  first, last = text.index(body[0]), len(text.rstrip())  # words lie in text[first:last]
  ok = lambda b: first < b < last  # something other than whitespace on both sides
  cuts = [m.end() for m in _SENTENCE_OR_PARAGRAPH.finditer(text) if ok(m.end())]
  if not cuts:
    cuts = [m.end() for m in _WHITESPACE.finditer(text) if ok(m.end())]
  return sorted(set(cuts))


def split_text(text: str, num_parts: int, count_tokens: Callable[[str], int]) -> list[str]:
  """`text` cut into `num_parts` pieces of near-equal token counts on `boundaries(text)`; fewer
  when the text has fewer possible cuts. "".join(result) == text, every piece non-empty.

  The token count of each stretch between two possible cuts is measured with `count_tokens`; the
  k-th cut is the possible cut whose running count is closest to k/num_parts of the total (cuts
  strictly increasing, room left for the cuts after it)."""
  cuts = boundaries(text)
  n = max(1, min(int(num_parts), len(cuts) + 1))
  if n == 1:
    return [text]
  edges = [0] + cuts + [len(text)]
  running = [0]  # running[j]: tokens of text[:edges[j]] (stretch by stretch)
  for a, b in zip(edges[:-1], edges[1:]):
    running.append(running[-1] + count_tokens(text[a:b]))
  total = running[-1]
  chosen, lo = [], 1  # indexes into edges (1..len(cuts)) of the cuts made
  for k in range(1, n):
    hi = len(cuts) - (n - 1 - k)  # leave a possible cut for each later part
    target = total * k / n
    j = min(range(lo, hi + 1), key=lambda j: (abs(running[j] - target), j))
    chosen.append(j)
    lo = j + 1
  pos = [0] + [edges[j] for j in chosen] + [len(text)]
  return [text[a:b] for a, b in zip(pos[:-1], pos[1:])]


def num_parts(num_tokens: int, max_doc_tokens: int) -> int:
  """ceil(num_tokens / max_doc_tokens), or 1 when max_doc_tokens is 0 (off)."""
  if max_doc_tokens <= 0 or num_tokens <= max_doc_tokens:
    return 1
  return -(-int(num_tokens) // int(max_doc_tokens))


def document_units(documents: Sequence[Document], max_doc_tokens: int, encode: Callable[[str], list[int]],
                   lengths: dict[str, int] | None = None) -> tuple[list[Document], dict[str, list[str]]]:
  """The cartridge units of `documents` (see the module doc) and doc_id -> its unit ids, in order.

  encode: the model tokenizer's encode (text -> token ids); lengths: doc_id -> token count when
  known already (else encode(text)). A part's meta is its document's meta plus "parent" (the
  doc_id), "part" (i) and "num_parts" (n)."""
  units: list[Document] = []
  parts_of: dict[str, list[str]] = {}
  count = lambda s: len(encode(s))
  for d in documents:
    n_tok = lengths[d.doc_id] if lengths is not None and d.doc_id in lengths else count(d.text)
    n = num_parts(n_tok, max_doc_tokens)
    pieces = split_text(d.text, n, count) if n > 1 else [d.text]
    if len(pieces) == 1:
      units.append(d)
      parts_of[d.doc_id] = [d.doc_id]
      continue
    ids = []
    for i, piece in enumerate(pieces, 1):
      meta = {**d.meta, "parent": d.doc_id, "part": i, "num_parts": len(pieces)}
      units.append(dataclasses.replace(d, doc_id=unit_id(d.doc_id, i), title=f"{d.title} (part {i} of {len(pieces)})",
                                       text=piece, meta=meta))
      ids.append(unit_id(d.doc_id, i))
    parts_of[d.doc_id] = ids
  seen: set[str] = set()
  for u in units:
    if u.doc_id in seen:  # e.g. a document named "a#1" next to a split document "a"
      raise ValueError(f"cartridge.max_doc_tokens={max_doc_tokens}: the unit id {u.doc_id!r} is used twice (a "
                       "document's id equals a part id '<doc_id>#<i>'); rename that document")
    seen.add(u.doc_id)
  return units, parts_of
