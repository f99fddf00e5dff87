"""Self-study (Cartridges §4): two bots talk about a chunk of a document; the teacher's top-k
next-token distribution over the answer is stored for context distillation.

Per conversation:
  1. pick a chunk of the document (a token range between min and max size),
  2. pick a seed-prompt family (structuring, summarization, question, use_case, creative),
  3. bot A (the chunk in its system prompt) writes the user message from the seed prompt,
  4. bot B (the chunk in its system prompt) answers; its top-k log-probs are the teacher's,
  5. store the student's view (user message + answer, no chunk) with the teacher's top-k.

Besides the paper's five families there is one *templated* family, `quote` (not in the paper;
off unless `families` names it): the user message is written from a template around a
passage of the chunk ("What does the document say about this: "<first words of a sentence>
..."? Give the exact details.") instead of by bot A. Small models (SmolLM2-135M) write poor,
ungrounded user messages from the paper's seed prompts (their answers then hold few of the
document's facts); a grounded request makes bot B restate the passage with its details, and
skips bot A's generation. `families` may repeat a name to weight it (each conversation draws
one entry uniformly).

Prompt format (the tokenizer's, `config.prompt_format`; cas.model.tokenizer): in chat format
the chunk sits in the bots' system messages (BOT_A_SYSTEM, BOT_B_SYSTEM) and the turns are the
chat template's; in completion format (base models) bot B reads
"[BOS]{chunk}\n\nQuestion: {user message}\nAnswer:" and its answer is cut at the end of its
first non-empty line (the newline token is the answer's last token), bot A the same with the seed prompt as the
question, and the student's prompt is "[BOS]Question: {user message}\nAnswer:" (no chunk, no
chat tokens). A dataset's manifest records a non-chat format; resuming in another is refused.

Conversations are generated in shards of `shard_size`; shard i's content is a pure function of
(seed, i), so a killed job resumes by generating only the shards that are missing. Documents
are handled one at a time (conversation g belongs to document g // conversations_per_doc).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from cas.data.chunking import sample_chunk
from cas.locking import DirLock
from cas.synth.format import (FORMAT_VERSION, MANIFEST, Conversation, SynthDataError, atomic_write_json,
                              read_manifest, sha256_file, shard_name, write_shard)

# Seed prompts follow the five families of the Cartridges reference (paraphrased).
SEED_PROMPTS = {
    "structuring": [
        "Please generate a single chat message instructing an LLM to structure the information in "
        "{fmt} about a specific part of the document above. Output only the chat message itself. Make "
        "it clear which section and which details (names, dates, numbers) you are asking about.",
    ],
    "summarization": [
        "Please generate a single chat message instructing an LLM to summarize a specific part of the "
        "document above. Be explicit about which part; include names, dates or numbers that identify it. "
        "Output only the chat message itself.",
    ],
    "question": [
        "Generate one question that tests knowledge of the information in the document above. Include "
        "details (names, ids, dates, values) that make clear what you are asking about. Output only the "
        "question, nothing else.",
    ],
    "use_case": [
        "Think about a practical, real-world task someone could do with the information in the document "
        "above. Then write one question or request that such a user would send to an assistant. Output "
        "only that message.",
    ],
    "creative": [
        "You are having a creative conversation inspired by the information in the document above. Write "
        "a question for your conversation partner to start the discussion. Output only the question.",
    ],
}
STRUCT_FORMATS = ("JSON", "YAML", "a table", "a bulleted list", "plain text with one fact per line")
SEED_FAMILIES = tuple(SEED_PROMPTS)  # the paper's five (the default)
# Templated families: the user message is filled in from the chunk, bot A is not asked.
# {passage}: the first words of a sentence of the chunk; {heading}: a markdown heading in it.
TEMPLATE_PROMPTS = {
    "quote": [
        'What does {doc} say about this: "{passage} ..."? Give the exact details.',
        'Find the part of {doc} that starts with "{passage}" and tell me everything it says, '
        'with all names, dates and numbers.',
        'Please repeat what {doc} says in the passage beginning "{passage}", then explain it.',
    ],
}
TEMPLATE_HEADING_PROMPTS = {
    "quote": ['What does the section "{heading}" of {doc} say? Give every detail.'],
}
ALL_FAMILIES = SEED_FAMILIES + tuple(TEMPLATE_PROMPTS)
COVERAGES = ("random", "walk")

BOT_A_SYSTEM = ("You are helping to train a language model on the information in the following "
                "document excerpt.\n\n<document>\n{chunk}\n</document>")
BOT_B_SYSTEM = ("Please use the information in the following document excerpt to answer the user's "
                "message accurately and precisely.\n\n<document>\n{chunk}\n</document>")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  conversations_per_doc: int = 64
  shard_size: int = 32
  batch_size: int = 32
  min_chunk: int = 256
  max_chunk: int = 512
  max_user_tokens: int = 96
  max_answer_tokens: int = 192
  temperature_a: float = 0.7
  temperature_b: float = 0.0
  top_k: int = 20
  seed: int = 0
  families: tuple = SEED_FAMILIES
  # "random": each conversation draws its chunk (and a templated family its passage) at random;
  # "walk": conversation j of a document is about sentence order[j] of a per-pass random
  # permutation of the document's sentences, and its chunk contains that sentence, so every
  # sentence is covered once per pass (n conversations >= n sentences quote each at least once)
  coverage: str = "random"
  # walk only: a sentence that starts at or after token `late_from` of its document is quoted `late_weight`
  # times per pass instead of once. The pipeline sets late_from = p - num_frozen when synth.late_weight > 1:
  # the first_tokens init already holds the document's first p - num_frozen tokens, and the facts after
  # them are the ones the trained cartridge misses (RESULTS.md, "No init holds the late facts")
  late_weight: int = 1
  late_from: int = 0
  # True: each shard is one call whose `batch_size` decode rows are refilled from the shard's
  # waiting conversations as they finish (`Sampler.generate(slots=...)`) instead of batches that
  # decode until their longest answer ends; needs shard_size > batch_size
  refill: bool = False

  @staticmethod
  def config_kwargs(sc) -> dict:
    """SynthConfig's arguments from the `synth` section of an ml_collections config."""
    return dict(conversations_per_doc=sc.conversations, shard_size=sc.shard_size, batch_size=sc.batch_size,
                min_chunk=sc.min_chunk, max_chunk=sc.max_chunk, max_user_tokens=sc.max_user_tokens,
                max_answer_tokens=sc.max_answer_tokens, temperature_a=sc.temperature_a,
                temperature_b=sc.temperature_b, top_k=sc.top_k, seed=sc.seed,
                families=tuple(sc.get("families", SEED_FAMILIES)), coverage=sc.get("coverage", "random"),
                refill=bool(sc.get("refill", False)), late_weight=sc.get("late_weight", 1))

  @classmethod
  def from_config(cls, sc) -> "SynthConfig":
    """From the `synth` section of an ml_collections config (configs/cartridge.py, configs/cas.py)."""
    return cls(**cls.config_kwargs(sc))

  def __post_init__(self):
    fams = tuple(self.families)
    object.__setattr__(self, "families", fams)
    problems = family_problems(fams, self.coverage)
    if problems:
      raise SynthDataError(problems[0][1])

  def manifest_fields(self) -> dict:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
    for k, default in (("coverage", "random"), ("refill", False), ("late_weight", 1), ("late_from", 0)):
      if d[k] == default:
        del d[k]  # datasets written before the field existed keep resuming
    return d


def family_problems(families: tuple, coverage: str) -> list[tuple[str, str]]:
  """Problems of synth.families / synth.coverage: (config field, message) pairs."""
  out = []
  unknown = sorted(set(families) - set(ALL_FAMILIES))
  if not families or unknown:
    out.append(("families", f"synth.families={families!r}: unknown or empty (unknown: {unknown}); known "
                            f"families: {', '.join(ALL_FAMILIES)}"))
  if coverage not in COVERAGES:
    out.append(("coverage", f"synth.coverage={coverage!r}: choose from {COVERAGES}"))
  return out


def synth_section_problems(sc) -> list[tuple[str, str]]:
  """Every problem of a config's `synth` section (what SynthConfig and `synthesize` refuse), as
  (field, message) pairs; used by cas.config_check before any stage runs."""
  kw = SynthConfig.config_kwargs(sc)
  out = family_problems(kw["families"], kw["coverage"])
  if out:  # the sizes are checked all the same
    kw.update(families=SEED_FAMILIES, coverage="random", late_weight=1)
  return out + synth_config_problems(SynthConfig(**kw))


class DocTokens:
  """Lazily tokenised documents: only the current one is kept."""

  def __init__(self, docs: Sequence, tokenizer):
    self.docs, self.tok = docs, tokenizer
    self._cache: tuple[int, list[int]] | None = None
    self._sents: list[tuple[int, int, str]] | None = None

  def __len__(self):
    return len(self.docs)

  def ids(self, i: int) -> list[int]:
    if self._cache is None or self._cache[0] != i:
      doc = self.docs[i]
      ids = self.tok.encode(doc.text)
      if not ids:
        raise SynthDataError(f"document {doc.doc_id!r} tokenizes to nothing (empty, or only characters "
                             f"the tokenizer cannot represent)")
      _check_tokenization(self.tok, doc.doc_id, doc.text, ids)
      self._cache = (i, ids)
      self._sents = None
    return self._cache[1]

  def sentences(self, i: int) -> list[tuple[int, int, str]]:
    """The document's sentences (pieces between sentence marks or line breaks, at least two
    words, not headings) as (token start, token end, text), token positions approximate (each
    piece tokenized alone, counts summed; a BPE merge across a boundary shifts them by a token)."""
    ids = self.ids(i)
    if self._sents is None:
      text = self.docs[i].text
      out, tok_pos, char_pos = [], 0, 0
      for m in list(_SENTENCE_SPLIT.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        piece = text[char_pos:end]
        n = len(self.tok.encode(piece if char_pos == 0 else " " + piece)) if piece.strip() else 0
        words = piece.split()
        if len(words) >= 2 and not words[0].startswith("#"):
          out.append((min(tok_pos, len(ids) - 1), min(tok_pos + max(n, 1), len(ids)), piece.strip()))
        tok_pos += n
        char_pos = m.end() if m else len(text)
      self._sents = out
    return self._sents


def _check_tokenization(tok, doc_id: str, text: str, ids: Sequence[int]) -> None:
  """Warn when the tokenizer cannot spell the document exactly (e.g. SmolLM2's vocabulary lacks
  the bytes of U+0004, U+0006, U+0013, U+0014, U+0016, U+001D and of U+40000-U+BFFFF: they are
  dropped) or when the text contains special-token strings (e.g. a literal "<|im_end|>"), which
  become control tokens inside the prompts."""
  back = tok.decode(ids, skip_special_tokens=False)
  if back != text:
    at = next((j for j, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    logging.warning("document %r: the tokenizer cannot represent all of its text (first difference at "
                    "character %d: %r); those characters are dropped or replaced in self-study",
                    doc_id, at, text[at:at + 8])
  hf = getattr(tok, "hf", None)
  special = set(getattr(hf, "all_special_ids", ()) or ()) | set(tok.eos_ids)
  found = sorted(set(ids) & special)
  if found:
    logging.warning("document %r contains special-token text (ids %s, e.g. %r) that the tokenizer turns "
                    "into control tokens inside the self-study prompts", doc_id, found[:5],
                    tok.decode(found[:1], skip_special_tokens=False))


def _plan(cfg: SynthConfig, g: int, doc_len: int, sentences: Sequence[tuple[int, int, str]] | None = None):
  """Deterministic choices for global conversation index g: chunk range, family, seed text
  (for a templated family: its template, filled in later from the chunk by `template_message`),
  a seed, and the sentence the conversation is about (coverage "walk" with `sentences`, else
  None).

  Walk: conversation j of its document takes sentence order[j % n] of the pass j // n (order: a
  permutation of the n sentences drawn per pass; with late_weight w > 1 a sentence from token
  late_from on counts w times among the n), and a chunk of a random allowed size that holds it (a
  few tokens of margin each side)."""
  rng = np.random.default_rng([cfg.seed, g])
  focus = None
  if cfg.coverage == "walk" and sentences:
    d, j = divmod(g, cfg.conversations_per_doc)
    slots = [i for i, (a, _, _) in enumerate(sentences)
             for _ in range(cfg.late_weight if cfg.late_weight > 1 and a >= cfg.late_from else 1)]
    n = len(slots)
    order = np.random.default_rng([cfg.seed, d, j // n, 7]).permutation(n)
    a, b, focus = sentences[slots[int(order[j % n])]]
    size = int(rng.integers(min(cfg.min_chunk, doc_len), min(cfg.max_chunk, doc_len) + 1))
    lo = max(0, min(b + 4, doc_len) - size)
    hi = max(lo, min(max(0, a - 4), doc_len - size))
    start = int(rng.integers(lo, hi + 1))
    end = start + size
  else:
    start, end = sample_chunk(list(range(doc_len)), cfg.min_chunk, cfg.max_chunk, rng)
  fam = cfg.families[int(rng.integers(len(cfg.families)))]
  prompts = SEED_PROMPTS.get(fam) or TEMPLATE_PROMPTS[fam]
  text = prompts[int(rng.integers(len(prompts)))]
  if fam == "structuring":
    text = text.format(fmt=STRUCT_FORMATS[int(rng.integers(len(STRUCT_FORMATS)))])
  return (start, end), fam, text, int(rng.integers(2**31)), focus


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;:])\s+|\n+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(\S.*?)\s*#*\s*$", re.M)


def template_message(family: str, template: str, chunk: str, seed: int, title: str = "",
                     sentence: str | None = None) -> str:
  """The user message of a templated family for one chunk (deterministic in `seed`).

  `{passage}`: the first 4-8 words of a sentence of the chunk (not its first piece, which may
  start mid-sentence, unless it is the only one); with probability 1/4, when the chunk holds a
  markdown heading, a heading template instead. A chunk without words gets a generic request.
  `sentence` (coverage "walk"): the passage is the first 4-8 words of this sentence instead.
  `{doc}`: 'the document "<title>"' when the document has a title, else "the document": the
  message names its document, so a cartridge loaded among others (CAS) learns to answer a
  question about its own document, not about whichever cartridge is loaded.
  """
  rng = np.random.default_rng(seed)
  title = " ".join(title.split())
  doc = f'the document "{title}"' if title else "the document"
  if sentence is not None and sentence.split():  # coverage "walk": the passage is this sentence's start
    words = sentence.split()
    return template.format(passage=" ".join(words[:min(len(words), int(rng.integers(4, 9)))]), doc=doc)
  headings = _HEADING.findall(chunk)
  if headings and rng.random() < 0.25:
    hp = TEMPLATE_HEADING_PROMPTS[family]
    return hp[int(rng.integers(len(hp)))].format(heading=headings[int(rng.integers(len(headings)))], doc=doc)
  pieces = [p.split() for p in _SENTENCE_SPLIT.split(chunk)]
  pieces = [p for p in pieces if p and not p[0].startswith("#")]
  good = [p for p in pieces[1:] if len(p) >= 4] or [p for p in pieces if len(p) >= 2]
  if not good:
    return f"Tell me everything this part of {doc} says, with all names, dates and numbers."
  words = good[int(rng.integers(len(good)))]
  n = min(len(words), int(rng.integers(4, 9)))
  return template.format(passage=" ".join(words[:n]), doc=doc)


def _generate_grouped(sampler, prompts: list[list[int]], keys: list, **kwargs) -> list:
  """Generations for `prompts` (in order); prompts with the same key (the same document chunk,
  hence the same system prompt) are generated together with their common tokens prefilled once
  (`Sampler.generate_shared`). Rows whose key is unique go through one plain `generate` call
  (with `seed` as given: all-unique keys give exactly `generate(prompts)`); each group gets its
  own seed, since sampling is keyed by (seed, row index within the call)."""
  groups: dict = {}
  for i, k in enumerate(keys):
    groups.setdefault(k, []).append(i)
  out: list = [None] * len(prompts)
  singles = [i for idx in groups.values() if len(idx) == 1 for i in idx]
  todo = ([(singles, sampler.generate)] if singles else []) + \
      [(idx, sampler.generate_shared) for idx in groups.values() if len(idx) > 1]
  seed = int(kwargs.pop("seed", 0))
  for n, (idx, fn) in enumerate(todo):
    for i, g in zip(idx, fn([prompts[i] for i in idx], seed=(seed + 7919 * n) % 2**31, **kwargs)):
      out[i] = g
  return out


def prompt_format_of(tokenizer) -> str:
  """The tokenizer's prompt format ("chat" for a tokenizer without one)."""
  return getattr(tokenizer, "prompt_format", "chat")


def prompt_functions(tokenizer):
  """(prompt_ids(messages), document_context(chat_text, document), stop_ids, answer_length(ids),
  line_stop) of the tokenizer's prompt format (cas.model.tokenizer): chat = the chat template, the
  instruction around the chunk, EOS, the whole generation, no line stop; completion =
  "{chunk}\\n\\nQuestion: {user}\\nAnswer:", the chunk alone, EOS, the generation cut at the end
  of its first non-empty line, where the sampler stops it (`Tokenizer.line_stop`). A tokenizer
  without prompt formats is chat."""
  if hasattr(tokenizer, "prompt_ids"):
    return (tokenizer.prompt_ids, tokenizer.document_context, tuple(tokenizer.stop_ids),
            tokenizer.answer_length, getattr(tokenizer, "line_stop", None))
  return (lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True),
          lambda chat_text, document: chat_text, tuple(tokenizer.eos_ids), len, None)


def generate_shard(shard: int, *, docs: DocTokens, doc_ids: Sequence[str], tokenizer, sampler,
                   cfg: SynthConfig, on_tokens: Callable[[int], None] | None = None) -> list[Conversation]:
  total = len(docs) * cfg.conversations_per_doc
  gs = range(shard * cfg.shard_size, min(total, (shard + 1) * cfg.shard_size))
  convs: list[Conversation] = []
  prompt_ids, document_context, stop_ids, answer_length, line_stop = prompt_functions(tokenizer)
  step = len(gs) if cfg.refill else cfg.batch_size  # refill: the shard is one call of batch_size rows
  rows = {"slots": cfg.batch_size} if cfg.refill else {}
  for b0 in range(0, len(gs), step):
    batch = list(gs[b0:b0 + step])
    plans, chunks = [], []
    for g in batch:
      d = g // cfg.conversations_per_doc
      ids = docs.ids(d)
      (s, e), fam, seed_text, sseed, focus = _plan(cfg, g, len(ids),
                                                   docs.sentences(d) if cfg.coverage == "walk" else None)
      plans.append((d, (s, e), fam, seed_text, sseed, focus))
      chunks.append(tokenizer.decode(ids[s:e]))
    seed = plans[0][4]
    # Bot A writes the user message of the seed-prompt families; templated ones are filled in.
    user_msgs: list[str] = [template_message(p[2], p[3], c, p[4], title=docs.docs[p[0]].title, sentence=p[5])
                            if p[2] in TEMPLATE_PROMPTS else "" for c, p in zip(chunks, plans)]
    ask = [j for j, p in enumerate(plans) if p[2] not in TEMPLATE_PROMPTS]
    ra = []
    if ask:
      a_prompts = [prompt_ids(
          [{"role": "system", "content": document_context(BOT_A_SYSTEM.format(chunk=chunks[j]), chunks[j])},
           {"role": "user", "content": plans[j][3]}]) for j in ask]
      ra = _generate_grouped(sampler, a_prompts, [plans[j][:2] for j in ask], max_new_tokens=cfg.max_user_tokens,
                             temperature=cfg.temperature_a, stop_ids=stop_ids, line_stop=line_stop, seed=seed,
                             **rows)
      for j, gen in zip(ask, ra):
        toks = gen.tokens.tolist()
        toks = [t for t in toks[:answer_length(toks)] if t not in stop_ids]
        user_msgs[j] = tokenizer.decode(toks).strip() or "Tell me about this part of the document."
    b_prompts = [prompt_ids(
        [{"role": "system", "content": document_context(BOT_B_SYSTEM.format(chunk=c), c)},
         {"role": "user", "content": u}]) for c, u in zip(chunks, user_msgs)]
    rb = _generate_grouped(sampler, b_prompts, [p[:2] for p in plans], max_new_tokens=cfg.max_answer_tokens,
                           temperature=cfg.temperature_b, stop_ids=stop_ids, line_stop=line_stop,
                           top_k_logprobs=cfg.top_k, seed=seed + 1, **rows)
    for p, u, gen in zip(plans, user_msgs, rb):
      student_prompt = prompt_ids([{"role": "user", "content": u}])
      n = answer_length(gen.tokens.tolist())  # completion: the first non-empty line
      convs.append(Conversation(doc_ids[p[0]], np.asarray(student_prompt, np.int32), gen.tokens[:n].astype(np.int32),
                                gen.top_ids[:n].astype(np.int32), gen.top_logprobs[:n].astype(np.float32), p[2],
                                p[1]))
    if on_tokens:
      on_tokens(sum(len(g.tokens) for g in ra) + sum(len(g.tokens) for g in rb))
  return convs


# SynthConfig field -> its name in the `synth` section of a pipeline config
CONFIG_FIELD = {"conversations_per_doc": "conversations"}


def synth_config_problems(cfg: SynthConfig) -> list[tuple[str, str]]:
  """Every problem of a SynthConfig's sizes: (config field, message) pairs ("min_chunk",
  "synth.min_chunk=64, ..."); the field is the `synth` section's name (conversations, not
  conversations_per_doc). `synthesize` raises the first; cas.config_check reports them all."""
  out: list[tuple[str, str]] = []
  ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (cfg.min_chunk, cfg.max_chunk))
  if not ints_ok or not 1 <= cfg.min_chunk <= cfg.max_chunk:
    out.append(("min_chunk", f"synth.min_chunk={cfg.min_chunk}, synth.max_chunk={cfg.max_chunk}: need "
                             f"1 <= min_chunk <= max_chunk"))
  for name in ("conversations_per_doc", "shard_size", "batch_size", "top_k", "max_user_tokens",
               "max_answer_tokens"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      out.append((CONFIG_FIELD.get(name, name), f"synth config {name}={v!r} must be a positive integer"))
  if isinstance(cfg.late_weight, bool) or not isinstance(cfg.late_weight, int) or cfg.late_weight < 1:
    out.append(("late_weight", f"synth.late_weight={cfg.late_weight!r} must be a positive integer (1 = every "
                               f"sentence once per pass)"))
  elif cfg.late_weight > 1 and cfg.coverage != "walk":
    out.append(("late_weight", f"synth.late_weight={cfg.late_weight} weighs the sentences of a walk; it needs "
                               f"synth.coverage='walk' (got {cfg.coverage!r})"))
  for name in ("temperature_a", "temperature_b"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
      out.append((name, f"synth.{name}={v!r} must be a finite number >= 0 (0 = greedy)"))
  if cfg.refill and isinstance(cfg.shard_size, int) and isinstance(cfg.batch_size, int) \
      and cfg.shard_size <= cfg.batch_size:
    out.append(("refill", f"synth.refill=True refills the batch_size={cfg.batch_size} decode rows from a "
                          f"shard's waiting conversations, so it needs synth.shard_size > batch_size (got "
                          f"shard_size={cfg.shard_size}); e.g. shard_size = 4 x batch_size"))
  return out


def synthesize(out_dir: str, *, documents: Sequence, tokenizer, sampler, cfg: SynthConfig,
               model_fingerprint: str, model_source: str, stop_after_shards: int | None = None,
               manifest_extra: dict | None = None) -> dict:
  """Generate (or finish) a self-study dataset in `out_dir`. Returns the manifest.

  manifest_extra: more top-level manifest fields (JSON values) the dataset depends on, e.g.
  {"max_doc_tokens": M} of a run whose documents are cut into parts (cas.data.parts); a dataset
  whose manifest records other values is refused, like one with other doc_ids.

  `out_dir` is locked while this runs (cas.locking: a second synthesis into it refuses to
  start); temp files of a killed shard or manifest write are removed before resuming.
  """
  if not documents:
    raise SynthDataError("no documents to synthesise from")
  seen = set()
  for d in documents:
    if d.doc_id in seen:
      raise SynthDataError(f"duplicate document id {d.doc_id!r}")
    seen.add(d.doc_id)
    if not isinstance(getattr(d, "text", None), str) or not d.text.strip():
      raise SynthDataError(f"document {d.doc_id!r} has no text (empty or whitespace only)")
  problems = synth_config_problems(cfg)
  if problems:
    raise SynthDataError(problems[0][1])
  os.makedirs(out_dir, exist_ok=True)
  with DirLock(out_dir, what="self-study dataset"):
    _remove_temp_files(out_dir)
    return _synthesize(out_dir, documents=documents, tokenizer=tokenizer, sampler=sampler, cfg=cfg,
                       model_fingerprint=model_fingerprint, model_source=model_source,
                       stop_after_shards=stop_after_shards, manifest_extra=manifest_extra or {})


def _remove_temp_files(out_dir: str) -> None:
  """Half-written shards/manifests of a killed run (only called while holding the lock)."""
  for f in os.listdir(out_dir):
    if f.startswith(".tmp-"):
      logging.info("removing %s left by an interrupted write", f)
      os.remove(os.path.join(out_dir, f))


def _synthesize(out_dir: str, *, documents, tokenizer, sampler, cfg: SynthConfig, model_fingerprint: str,
                model_source: str, stop_after_shards: int | None, manifest_extra: dict) -> dict:
  doc_ids = [d.doc_id for d in documents]
  fmt = prompt_format_of(tokenizer)
  header = {"format_version": FORMAT_VERSION, "model_fingerprint": model_fingerprint,
            "model_source": model_source, "config": cfg.manifest_fields(), "doc_ids": doc_ids,
            "top_k": cfg.top_k, "eos_ids": list(tokenizer.eos_ids), **manifest_extra}
  if fmt != "chat":  # chat datasets (all written before the field existed) keep resuming
    header["prompt_format"] = fmt
  recorded: dict[str, str] = {}  # shard name -> sha256 in the existing manifest
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    old = read_manifest(out_dir)
    for k in ("model_fingerprint", "config", "doc_ids", *manifest_extra):
      if old.get(k) != header[k]:
        was, now, hint = old.get(k), header[k], ""
        if k == "config" and isinstance(was, dict):  # name the fields that differ, not the whole config
          fields = [f for f in sorted(set(was) | set(now), key=str) if was.get(f) != now.get(f)]
          was, now = {f: was.get(f) for f in fields}, {f: now.get(f) for f in fields}
          if "late_from" in fields:
            hint = (" (synth.late_weight > 1 walks from token p - num_frozen, so its self-study belongs to one p: "
                    "keep the cartridge's num_tokens, or use another workdir)")
        raise SynthDataError(f"{out_dir}: existing dataset has a different {k} "
                             f"({was!r:.200} vs {now!r:.200}){hint}; use another directory")
    if old.get("prompt_format", "chat") != fmt:
      raise SynthDataError(f"{out_dir}: existing dataset was written in prompt format "
                           f"{old.get('prompt_format', 'chat')!r}, this run asks for {fmt!r} "
                           f"(config.prompt_format); use another directory")
    recorded = {e["name"]: e["sha256"] for e in old.get("shards", []) if isinstance(e, dict) and e.get("sha256")}
  total = len(documents) * cfg.conversations_per_doc
  num_shards = -(-total // cfg.shard_size)
  counts = [min(cfg.shard_size, total - i * cfg.shard_size) for i in range(num_shards)]
  sha: dict[int, str] = {}
  for i in range(num_shards):
    path = os.path.join(out_dir, shard_name(i))
    if not os.path.exists(path):
      continue
    digest = sha256_file(path)
    if shard_name(i) in recorded and recorded[shard_name(i)] != digest:
      # Shards are written atomically, so this is damage after the fact: regenerate it (its
      # content is a pure function of the seed and the shard index).
      logging.warning("%s: shard changed since it was written (sha256 mismatch: truncated, zeroed or "
                      "overwritten); regenerating it", path)
      os.remove(path)
      continue
    sha[i] = digest  # a shard written just before a kill, not yet in the manifest, is complete
  done = set(sha)

  def write_manifest():
    atomic_write_json(os.path.join(out_dir, MANIFEST), {
        **header, "shards": [{"name": shard_name(i), "count": counts[i], "sha256": sha[i]} for i in sorted(done)],
        "num_shards": num_shards, "complete": len(done) == num_shards})

  write_manifest()
  if done:
    logging.info("resuming self-study: %d of %d shards already written", len(done), num_shards)
  docs = DocTokens(documents, tokenizer)
  t0, ntok = time.time(), [0]
  written = 0
  with tqdm(total=total, initial=sum(counts[i] for i in done), desc="self-study", unit="conv",
            dynamic_ncols=True) as bar:
    def on_tokens(n):
      ntok[0] += n
      bar.set_postfix(tok_s=f"{ntok[0] / max(1e-9, time.time() - t0):.0f}")
    for i in range(num_shards):
      if i in done:
        continue
      convs = generate_shard(i, docs=docs, doc_ids=doc_ids, tokenizer=tokenizer, sampler=sampler,
                             cfg=cfg, on_tokens=on_tokens)
      sha[i] = sha256_file(write_shard(out_dir, i, convs))
      done.add(i)
      write_manifest()
      bar.update(len(convs))
      written += 1
      if stop_after_shards is not None and written >= stop_after_shards:
        break
  return read_manifest(out_dir)
