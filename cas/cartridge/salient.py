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

INIT_TEXTS = ("document", "salient")  # cartridge.init_text (init_ids also takes "surprisal", benchmarks only)
HEADER = "# {title}\n"  # cartridge.init_header: the line ICL shows above a document (cas.eval.methods)
_WORD = re.compile(r"[^\W_]{3,}")  # words of 3+ letters or digits (any script)
# numbers=True: a number of any length is one word too ("13.2", "4252", "2024-03-15", "7:30"), so a sentence that
# states a value in a template shared by every document ("Hemoglobin was 13.2 g/dL.") scores by its value
_WORD_NUM = re.compile(r"\d+(?:[.,:/-]\d+)*|[^\W_]{3,}")
_LINES = re.compile(r"\n+")
_STOP = re.compile(r"(?<=[.!?;])\s+")  # after sentence punctuation


def words(text: str, numbers: bool = False) -> list[str]:
  """`text`'s words (lower case) as the IDF counts them: 3+ letters or digits; with `numbers`, any number."""
  return [w.lower() for w in (_WORD_NUM if numbers else _WORD).findall(text)]


def idf_table(texts: Iterable[str], numbers: bool = False) -> dict[str, float]:
  """word (lower case, `words`) -> log(number of texts / texts that hold it)."""
  texts = list(texts)
  df: dict[str, int] = {}
  for t in texts:
    for w in set(words(t, numbers)):
      df[w] = df.get(w, 0) + 1
  return {w: math.log(len(texts) / n) for w, n in df.items()}


# split="sentence": titles and abbreviations whose period does not end a sentence ("Attending physician: Dr.
# Ravi Subramanian." stays one piece, label and name). Lost at init on patients (-5.7: the joined sentence's
# mean IDF is lower, so the summary drops it; RESULTS.md "How the salient summary cuts its pieces")
_ABBREV = frozenset("dr mr mrs ms mx prof st jr sr rev hon gen col capt lt sgt mt ft vs approx dept fig inc ltd "
                    "co corp e.g i.e cf al jan feb mar apr jun jul aug sep sept oct nov dec".split())
_ABBREV_END = re.compile(r"(?:^|[\s(\[\"'])([A-Za-z][A-Za-z.]*)\.$")
_NO_BEFORE_NUMBER = re.compile(r"(?:^|\s)(?:No|Nos|Vol|pp?|Art|Sec|Ch)\.$")


def _joins_next(piece: str, nxt: str) -> bool:
  """Does the period that ends `piece` belong to an abbreviation (so `nxt` continues the sentence)?"""
  m = _ABBREV_END.search(piece)
  if m and (m.group(1).lower() in _ABBREV or len(m.group(1)) == 1 and m.group(1).isupper()):
    return True  # a title ("Dr."), an abbreviation ("e.g."), an initial ("J. R. R. Tolkien")
  return bool(_NO_BEFORE_NUMBER.search(piece) and nxt[:1].isdigit())  # "No. 5", "pp. 12"


SPLITS = ("period", "sentence", "clause")  # salient_ids(split=...): the pieces a summary keeps or drops
_CLAUSE = re.compile(r"(?<=[,:])\s+")


def sentences(text: str, split: str = "period") -> list[str]:
  """`text`'s pieces for the salient summary. "period": cut after every . ! ? ; and at line breaks (the
  init of every run so far); "sentence": the same without cutting after a title, an abbreviation or an
  initial ("Attending physician: Dr. Ravi Subramanian." stays one piece); "clause": "period"'s pieces cut
  again after each comma and colon (more, shorter pieces for the same budget)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: choose from {SPLITS}")
  out: list[str] = []
  for line in _LINES.split(text):  # never across a line break
    kept: list[str] = []
    for s in (s.strip() for s in _STOP.split(line)):
      if not s:
        continue
      if split == "sentence" and kept and _joins_next(kept[-1], s):
        kept[-1] += " " + s
      elif split == "clause":
        kept += [c.strip() for c in _CLAUSE.split(s) if c.strip()]
      else:
        kept.append(s)
    out += kept
  return out


def salient_ids(text: str, budget: int, idf: Mapping[str, float], encode: Callable[[str], Sequence[int]],
                lead: float = 0.0, scores: Callable[[list[list[int]]], Sequence[float]] | None = None,
                sep: str = " ", split: str = "period", numbers: bool = False) -> list[int]:
  """Token ids of `text` cut to at most `budget` tokens: the whole text if it fits, else its sentences of
  highest mean IDF (ties: the earlier sentence) that fit, greedily, joined in document order. `lead` in
  [0, 1): that share of the budget goes first to the text's opening sentences, in a row (the part a
  first_tokens init would hold), the rest to the most salient of the others. `scores`: another salience
  (one value per sentence's tokens, higher first) instead of mean IDF; `sep`: what joins two kept sentences
  that were not next to each other in the text; `split`: the pieces (`sentences`); `numbers`: a number of any
  length counts as a word (`words`; `idf` must be built the same way)."""
  if not 0.0 <= lead < 1.0:
    raise ValueError(f"salient lead={lead}: a share of the budget in [0, 1)")
  ids = list(encode(text))
  if len(ids) <= budget:
    return ids
  sents = sentences(text, split)
  pieces = [list(encode(" " + s)) for s in sents]  # each sentence's tokens as it follows another
  cost = [len(x) if sep == " " else max(len(x), len(encode(sep + s))) for x, s in zip(pieces, sents)]
  keep, used = [], 0
  for i, n in enumerate(cost):  # the opening sentences, while they fit in the lead's share
    if used + n > lead * budget:
      break
    keep.append(i)
    used += n
  if scores is not None:  # another salience: e.g. the model's surprisal per sentence (sentence_surprisal)
    score = [float(x) for x in scores(pieces)]
  else:
    score = [float(np.mean([idf.get(w, 0.0) for w in words(s, numbers)] or [0.0])) for s in sents]
  for i in sorted(range(len(keep), len(sents)), key=lambda i: (-score[i], i)):
    if used + cost[i] <= budget:
      keep.append(i)
      used += cost[i]
  if not keep:  # no sentence fits (one very long sentence): the text's first tokens
    return ids[:budget]
  keep = sorted(keep)  # `sep` between sentences that were not next to each other in the text
  out = sents[keep[0]]
  for a, b in zip(keep, keep[1:]):
    out += (" " if b == a + 1 else sep) + sents[b]
  return list(encode(out))[:budget]


def header_ids(title: str, text: str, encode: Callable[[str], Sequence[int]]) -> list[int]:
  """The tokens of the title line ICL shows above a document ("# <title>"), for an init that starts
  with it (cartridge.init_header): none when there is no title or the text already opens with it
  (the built-in synthetic records do; prose texts and the parts after a document's first do not)."""
  if not title or text.lstrip().startswith(HEADER.format(title=title).strip()):
    return []
  return list(encode(HEADER.format(title=title)))


def init_ids(text: str, title: str, budget: int, encode: Callable[[str], Sequence[int]], *, mode: str = "document",
             idf: Mapping[str, float] | None = None, lead: float = 0.0, header: bool = False,
             scores: Callable[[list[list[int]]], Sequence[float]] | None = None, sep: str = " ",
             split: str = "period", numbers: bool = False) -> list[int]:
  """The token ids a cartridge's init reads (cartridge.init_text = `mode`, salient_lead = `lead`,
  init_header = `header`): the title line when `header`, then the text ("document": all of it, the
  init cuts it to p; "salient": its most salient sentences that fit in what the header left of `budget`;
  a text that opens with its title line keeps it first, and once, in both)."""
  head = header_ids(title, text, encode) if header else []
  if mode in ("salient", "surprisal"):
    line = HEADER.format(title=title).strip()
    if header and title and text.lstrip().startswith(line):  # the text opens with its title: keep it first, once
      head, text = list(encode(HEADER.format(title=title))), text.lstrip()[len(line):].lstrip()
    if mode == "surprisal" and scores is None:
      raise ValueError("cartridge.init_text='surprisal' needs the model's sentence scores (sentence_surprisal)")
    return head + salient_ids(text, max(budget - len(head), 1), idf or {}, encode, lead=lead,
                              scores=scores if mode == "surprisal" else None, sep=sep, split=split,
                              numbers=numbers)
  if mode != "document":
    raise ValueError(f"cartridge.init_text={mode!r}: choose from {INIT_TEXTS}")
  return head + list(encode(text))


def unit_init_ids(units, budget: int, encode: Callable[[str], Sequence[int]], *, mode: str = "document",
                  lead: float = 0.0, header: bool = False) -> Callable[[object], list[int]]:
  """unit -> the token ids its cartridge's init reads (`init_ids`), with the IDF of `units` (the collection's
  documents or parts) for a salient summary: the one rule of the pipeline and of the benchmarks that rebuild it."""
  idf = idf_table(u.text for u in units) if mode == "salient" else None
  return lambda u: init_ids(u.text, u.title, budget, encode, mode=mode, idf=idf, lead=lead, header=header)


def sentence_surprisal(model, bos_id: int, window: int = 1024) -> Callable[[list[list[int]]], list[float]]:
  """A `scores` function for salient_ids (init_ids(mode="surprisal"); benchmarks/init_oracle.py only: it
  lost to mean IDF on products, RESULTS.md): each sentence's mean
  negative log-likelihood per token under `model`, reading the sentences in order (windows of
  `window` tokens, each after a BOS). High = what the model could not guess: names, numbers, facts."""
  import jax.numpy as jnp

  def scores(pieces: list[list[int]]) -> list[float]:
    flat = [t for p in pieces for t in p]
    nll = np.zeros(len(flat), np.float32)
    for s in range(0, len(flat), window):
      chunk = flat[s:s + window]
      toks = np.zeros((1, window + 1), np.int32)  # one shape for every window (one compilation)
      toks[0, 0], toks[0, 1:len(chunk) + 1] = bos_id, chunk
      nll[s:s + len(chunk)] = np.asarray(_token_nll(model, jnp.asarray(toks)))[:len(chunk)]
    out, i = [], 0
    for p in pieces:
      out.append(float(nll[i:i + len(p)].mean()) if p else 0.0)
      i += len(p)
    return out
  return scores


def _token_nll(model, toks):
  """toks [1, T] -> the negative log-likelihood of tokens 1..T-1 [T - 1] (jitted once per model and shape)."""
  global _TOKEN_NLL
  if _TOKEN_NLL is None:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(model, toks):
      logits, _ = model(toks, jnp.arange(toks.shape[1])[None])
      lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
      return -jnp.take_along_axis(lp, toks[0, 1:, None], axis=-1)[:, 0]
    _TOKEN_NLL = f
  return _TOKEN_NLL(model, toks)


_TOKEN_NLL = None
