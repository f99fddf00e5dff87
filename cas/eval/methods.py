"""Evaluation methods (DESIGN §6): no_context, icl, rag_text, cartridge(s).

Each method turns (documents, question) into a *context* = prefix KV plus prompt tokens, then
  multiple choice: picks the option with the highest mean per-token log-likelihood as the
                   assistant's reply. The options are NOT listed in the question: with the
                   135M default model, listing them dropped ICL from 100% to 29% on the
                   built-in collection (the model copies the first options it sees);
  short answer:    generates greedily and counts it correct when any accepted answer appears
                   (case/punctuation-insensitive).
Prompts follow the tokenizer's prompt format (cas.model.tokenizer; config.prompt_format): chat, or
for a base model completion: "[BOS]{document}\n\nQuestion: {question}\nAnswer:" (icl; no_context and
cartridges without the document), options scored after "Answer:" with their leading space, a short
answer is the first non-empty line generated.
Reported per question: correctness, prompt tokens (what the model reads as text), KV-cache bytes
of the context (text KV or cartridge KV, bf16 serving), and for multiple choice each option's
mean per-token log-likelihood (`option_scores`).
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from cas.data.types import Document, Question
from cas.eval.scoring import context_kv, prefix_attention_share, score_continuations
from cas.eval.stats import kind_breakdown, paired_by_qid, paired_difference, row_interval

ICL_SYSTEM = ("You are a helpful assistant. Answer the user's question using the following "
              "document.\n\n{documents}")
RAG_SYSTEM = ("You are a helpful assistant. Answer the user's question using the following "
              "passages.\n\n{passages}")


def normalize(s: str) -> str:
  s = s.lower()
  s = re.sub(r"[^\w%.]+", " ", s)
  return " ".join(s.replace(" .", ".").split()).strip(". ")


def is_correct_short(output: str, answers: Sequence[str]) -> bool:
  out = normalize(output)
  return any(normalize(a) and normalize(a) in out for a in answers)


def question_text(q: Question, completion: bool = False) -> str:
  """The user message of a question; a short-answer question asks for a brief answer, except in
  completion format, whose answer is one line after "Answer:" anyway."""
  if q.kind == "mc" or completion:
    return q.question
  return f"{q.question}\nAnswer briefly."


@dataclasses.dataclass
class Context:
  """What a method puts in front of the question."""
  prefix_kv: tuple | None  # (k, v) [L, P, Hkv, D] or None
  prefix_tokens: int  # text tokens inside prefix_kv (0 for cartridges)
  cartridge_tokens: int  # cartridge tokens inside prefix_kv (0 for text)
  system: str | None  # system message text when the prompt carries one (icl)
  position_offset: int | None = None  # where the prompt's positions start (None: after the prefix)
  distractor: np.ndarray | None = None  # [P] bool: prefix slots of loaded cartridges that are not the question's


@dataclasses.dataclass
class QuestionResult:
  qid: str
  doc_id: str
  kind: str
  correct: bool
  prediction: str
  prompt_tokens: int
  kv_bytes: int
  option_scores: list[float] | None = None  # MC: mean log-likelihood per option token
  # the share of the question's attention within the prefix that its distractor cartridges take
  # (Evaluator(attention_share=True), composed cartridges only; cas.model.llama.prefix_share)
  distractor_share: float | None = None


class Evaluator:
  """Runs methods over questions with one model + tokenizer (+ sampler for short answers)."""

  def __init__(self, model, tokenizer, sampler=None, *, max_new_tokens: int = 32, kv_bytes_per_el: int = 2,
               attention_share: bool = False):
    self.model, self.tok, self.sampler = model, tokenizer, sampler
    self.max_new_tokens = max_new_tokens
    self.kv_tok_bytes = model.cfg.kv_bytes_per_token(kv_bytes_per_el)
    self.attention_share = bool(attention_share)  # measure QuestionResult.distractor_share where a context has one

  # -- contexts ---------------------------------------------------------------
  def no_context(self) -> Context:
    return Context(None, 0, 0, None)

  def _system_context(self, system: str) -> Context:
    """The chat-formatted system message `system` as prefix KV ([L, T, Hkv, D]) (for a template
    that folds it into the user turn, as Gemma's: the conversation up to the user's words)."""
    sys_ids = self.tok.system_prefix_ids(system)
    return Context(context_kv(self.model, sys_ids), len(sys_ids), 0, system)

  def icl(self, docs: Sequence[Document]) -> Context:
    body = "\n\n".join(f"# {d.title}\n{d.text}" if d.title else d.text for d in docs)
    return self._system_context(self.tok.document_context(ICL_SYSTEM.format(documents=body), body))

  def rag_text(self, chunks: Sequence[str]) -> Context:
    """Retrieved passages (best first) in the system message, as `icl` puts whole documents."""
    if not chunks:
      raise ValueError("rag_text needs at least one retrieved chunk")
    passages = "\n\n".join(chunks)
    return self._system_context(self.tok.document_context(RAG_SYSTEM.format(passages=passages), passages))

  def cartridge(self, k, v, position_offset: int | None = None) -> Context:
    """k, v: [L, P, Hkv, D] (one cartridge, or several composed by cas.cartridge.compose, whose
    question offset is then `position_offset`)."""
    return Context((k, v), 0, int(k.shape[1]), None, position_offset)

  def cartridges(self, carts, mode: str = "shared", distractor: Sequence[bool] | None = None) -> Context:
    """Several cartridges loaded together (shared sink once), in `mode` positions. distractor: per
    cartridge, whether it is not the question's (the context then marks its slots, `Context.distractor`)."""
    from cas.cartridge.compose import compose
    k, v, off = compose(carts, mode=mode, inv_freq=self.model.inv_freq[...])
    ctx = self.cartridge(k, v, off)
    if distractor is not None:
      if len(distractor) != len(carts):
        raise ValueError(f"Evaluator.cartridges: {len(distractor)} distractor flags for {len(carts)} cartridges")
      spec = carts[0].spec
      body = spec.num_tokens - spec.num_frozen
      ctx = dataclasses.replace(ctx, distractor=np.concatenate(
          [np.zeros(spec.num_frozen, bool)] + [np.full(body, bool(d)) for d in distractor]))
    return ctx

  # -- prompts ----------------------------------------------------------------
  def _prompt_ids(self, ctx: Context, q: Question) -> list[int]:
    msgs = [{"role": "user", "content": question_text(q, self.tok.prompt_format == "completion")}]
    if ctx.system is None:
      return self.tok.prompt_ids(msgs, add_generation_prompt=True)
    return self.tok.ids_after_system_prefix(ctx.system, msgs)

  def answer(self, ctx: Context, q: Question) -> QuestionResult:
    prompt = self._prompt_ids(ctx, q)
    res = self._answer(ctx, q, prompt)
    if self.attention_share and ctx.distractor is not None and ctx.distractor.any():
      res.distractor_share = prefix_attention_share(self.model, ctx.prefix_kv, ctx.distractor, prompt,
                                                    position_offset=ctx.position_offset)
    return res

  def _answer(self, ctx: Context, q: Question, prompt: list[int]) -> QuestionResult:
    text_tokens = ctx.prefix_tokens + len(prompt)
    kv = (text_tokens + ctx.cartridge_tokens) * self.kv_tok_bytes
    if q.kind == "mc":
      conts = [self.tok.encode(self.tok.answer_prefix + o) for o in q.options]
      s, n = score_continuations(self.model, ctx.prefix_kv, prompt, conts, position_offset=ctx.position_offset,
                                 text_prefix=ctx.prefix_tokens > 0)
      mean = s / np.maximum(n, 1)  # [num_options] f32
      pick = int(np.argmax(mean))
      return QuestionResult(q.qid, q.doc_id, "mc", pick == q.answer_index, q.options[pick], text_tokens, kv,
                            [float(x) for x in mean])
    if self.sampler is None:
      raise ValueError("short-answer questions need a sampler")
    from cas.model.llama import Prefix
    import jax.numpy as jnp
    prefix, off = None, 0
    if ctx.prefix_kv is not None:
      k, v = ctx.prefix_kv
      text = ctx.prefix_tokens > 0 and self.model.cfg.has_sliding_window  # Gemma 3 windows text
      prefix = Prefix(k[:, None], v[:, None], jnp.ones((1, k.shape[1]), bool),
                      jnp.arange(k.shape[1], dtype=jnp.int32)[None] if text else None)
      off = int(k.shape[1]) if ctx.position_offset is None else ctx.position_offset
    res = self.sampler.generate([prompt], max_new_tokens=self.max_new_tokens, prefix=prefix,
                                position_offset=off, stop_ids=self.tok.stop_ids,
                                line_stop=getattr(self.tok, "line_stop", None))
    toks = res.generations[0].tokens.tolist()
    out = self.tok.decode(toks[:self.tok.answer_length(toks)])  # completion: the first non-empty line
    return QuestionResult(q.qid, q.doc_id, "short", is_correct_short(out, q.correct_answers), out, text_tokens, kv)


def run_method(name: str, questions: Sequence[Question], context_for: Callable[[Question], Context],
               evaluator: Evaluator, *, progress: bool = True) -> dict:
  """Evaluate one method. `context_for(q)` builds (and may cache) the context of a question."""
  t0 = time.time()
  results = []
  for q in tqdm(questions, desc=name, disable=not progress, dynamic_ncols=True):
    results.append(evaluator.answer(context_for(q), q))
  def acc(kind=None):
    rs = [r for r in results if kind is None or r.kind == kind]
    return float(np.mean([r.correct for r in rs])) if rs else float("nan")
  row = {
      "method": name, "accuracy": acc(), "accuracy_mc": acc("mc"), "accuracy_short": acc("short"),
      "num_questions": len(results),
      "prompt_tokens": float(np.mean([r.prompt_tokens for r in results])) if results else 0.0,
      "kv_bytes": float(np.mean([r.kv_bytes for r in results])) if results else 0.0,
      "seconds": time.time() - t0,
      **({"distractor_share": float(np.mean(shares))}
         if (shares := [r.distractor_share for r in results if r.distractor_share is not None]) else {}),
      "questions": [dataclasses.asdict(r) for r in results],
  }
  row["accuracy_ci95"] = list(row_interval(row) or (float("nan"), float("nan")))
  by_kind = kind_breakdown(row["questions"])
  if by_kind:  # content or two-document questions: accuracy per question kind
    row["by_question_kind"] = by_kind
  return row


def _intervals(row: dict, ref: dict | None) -> tuple[str, str]:
  """The accuracy's Wilson 95% interval and the paired difference to `ref` (bootstrap 95%), as
  table cells in points; "n/a" where the row has no per-question results (or is `ref`)."""
  qs = row.get("questions") or []
  if not qs:
    return "n/a", "n/a"
  lo, hi = row_interval(row)
  ci = f"{100 * lo:.1f}-{100 * hi:.1f}"
  if ref is None or ref is row or not ref.get("questions"):
    return ci, "n/a"
  a, b = paired_by_qid(qs, ref["questions"])
  if not a:
    return ci, "n/a"
  d, dlo, dhi = paired_difference(a, b)
  return ci, f"{100 * d:+.1f} ({100 * dlo:+.1f} to {100 * dhi:+.1f})"


def markdown_table(rows: Sequence[dict], reference: str = "icl") -> str:
  """One row per method. The last two columns: the accuracy's 95% interval (Wilson) and its
  paired difference to the `reference` method on the same questions (bootstrap 95% interval);
  with 120 questions one question is 0.83 points. When the questions hold content or two-document
  questions, a second table follows with the accuracy per question kind (`report.kinds_markdown`)."""
  head = (f"| method | accuracy | MC acc | short acc | questions | prompt tokens | KV bytes | 95% CI | "
          f"vs {reference} (95% CI) |\n|---|---|---|---|---|---|---|---|---|\n")
  f = lambda x: "n/a" if x != x else f"{100 * x:.1f}"
  ref = next((r for r in rows if r["method"] == reference), None)
  out = []
  for r in rows:
    ci, diff = _intervals(r, ref)
    out.append(f"| {r['method']} | {f(r['accuracy'])} | {f(r['accuracy_mc'])} | {f(r['accuracy_short'])} | "
               f"{r['num_questions']} | {r['prompt_tokens']:.0f} | {r['kv_bytes'] / 2**20:.2f} MiB | {ci} | {diff} |\n")
  from cas.eval.report import kinds_markdown  # noqa: PLC0415 (report imports matplotlib lazily)
  kinds = kinds_markdown(rows)
  return head + "".join(out) + (f"\n{kinds}" if kinds else "")
