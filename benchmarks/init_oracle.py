"""What does a cartridge know before training? The oracle cartridge's accuracy at its
`first_tokens` init against ICL, per document length, on the built-in real-prose collection
(issue 26: trained p = 512 cartridges answer 81-83% of the short documents' questions where ICL
answers 93%; if the untrained init already answers them, training loses facts the init had).

For a document of n <= p - 1 tokens the init holds the document itself: with `--fill=repeat`
(the pipeline's default) the rest of the p slots repeat it, with `--fill=exact` the cartridge is
cut to the document's own length (no fill). Longer documents keep their first p - 1 tokens.
`--fill=framed`: the init is the KV of the document *as ICL shows it* (the chat-formatted system
message that holds it, `Tokenizer.system_prefix_ids`), cut to p tokens, no fill: what the model
reads in ICL, minus the rest of the documents' frame for long ones.
CPU-sized: the default model, multiple-choice questions only.

  python -m benchmarks.init_oracle --num_docs=20 --p=512 --fill=repeat,exact
  python -m benchmarks.init_oracle --icl=false --max_doc_tokens=1024 --fill=repeat,key_norm --out=/tmp/init.json
"""
from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from cas.cartridge.cartridge import init_cartridge
from cas.cartridge.salient import idf_table, init_ids, sentence_surprisal
from cas.data.prose import generate_prose_collection
from cas.eval.methods import ICL_SYSTEM, Evaluator
from cas.model.loader import load_model

_N = flags.DEFINE_integer("num_docs", 20, "prose documents (data.num_docs)")
_KIND = flags.DEFINE_string("kind", "prose", "data.kind: prose, or a built-in synthetic kind (patients, products, "
                            "minutes: cas.data.synthetic, with its default questions)")
_SEED = flags.DEFINE_integer("seed", 0, "data.seed")
_P = flags.DEFINE_integer("p", 512, "cartridge tokens")
_FILL = flags.DEFINE_list("fill", ["repeat", "exact"], "init(s): repeat | exact | framed (first_tokens, see above) "
                         "| key_norm (cartridge.init=key_norm: the lowest-norm keys of the whole document) "
                         "| salient (cartridge.init_text=salient: the most salient sentences that fit) | salient_leadNN "
                         "(the same with NN% of the budget kept for the opening sentences: cartridge.salient_lead) "
                         "| salient_num (a number of any length counts as a word in the IDF) "
                         "| salient_sentence (pieces not cut after a title or abbreviation: 'Attending physician: "
                         "Dr. Ravi Subramanian.' stays one) | salient_clause (pieces cut again at commas and colons)")
_MDT = flags.DEFINE_integer("max_doc_tokens", 0, "cartridge.max_doc_tokens: documents over it are cut into parts "
                            "(cas.data.parts), one cartridge each, and the oracle loads all of its document's parts "
                            "(shared positions, as the pipeline); 0 = one cartridge per document")
_SHORT = flags.DEFINE_integer("short_tokens", 1700, "documents under this many tokens count as short")
_OUT = flags.DEFINE_string("out", None, "write the per-question results (JSON) here")
_HEADER = flags.DEFINE_bool("header", False, "cartridge.init_header: every init starts with its unit's title line "
                            "(as ICL shows it) unless its text opens with it")
_COMPOSED = flags.DEFINE_multi_integer("composed", [], "also the init cartridges composed: the question's document + "
                                       "n - 1 others (with --max_doc_tokens all their parts, shared positions; "
                                       "without, one cartridge each in every --composed_modes)")
_CMODES = flags.DEFINE_list("composed_modes", ["shared"], "without --max_doc_tokens: position modes of --composed "
                            "(shared: every cartridge at positions 0..p-1, as CAS trains and evaluates; sequential: "
                            "one after another, as documents in a prompt)")
_MONO = flags.DEFINE_list("monolithic", [], "also the monolithic baseline's init (one cartridge of 1 + N * (p - 1) "
                          "tokens, every question): concat (cartridge.monolithic_init=concat, the documents in a row) "
                          "| units (each document's first p - 1 tokens, in a row)")
_KTEMP = flags.DEFINE_list("key_temp", ["1"], "without --max_doc_tokens: attention temperatures of the composed "
                            "cartridges' keys (every key but the sink's scaled by 1/T: T < 1 sharpens the attention "
                            "over the loaded cartridges, as APE's temperature for parallel-encoded contexts); a row "
                            "per --composed x --composed_modes x T")
_ICL = flags.DEFINE_bool("icl", True, "also evaluate ICL (the slow part on a CPU: ~1 h for 78 questions)")
_PROMPT = flags.DEFINE_list("prompt", ["template"], "without --max_doc_tokens: what follows the cartridge, a row each: "
                            "template (the chat template on the question alone, as the pipeline: SmolLM2's adds its "
                            "default system turn) | bare (the template's user turn and generation prompt only, no "
                            "system turn: the pipeline's prompt_format=bare; with --fill=framed the question continues "
                            "the framed system message, as ICL's does after its prefix, exact when p holds the whole "
                            "framed prefix); rows of bare end in /bare")


def _sep(fill: str) -> str:
  """salient_nl / salient_dots: the separator between sentences the summary did not keep side by side."""
  return {"salient_nl": "\n", "salient_dots": " ... "}.get(fill, " ")


def _split(fill: str) -> str:
  """salient_sentence / salient_clause: cas.cartridge.salient.sentences(split=...) (salient: "period")."""
  return {"salient_sentence": "sentence", "salient_clause": "clause"}.get(fill, "period")


def _numbers(fill: str) -> bool:
  """salient_num: a number of any length counts as a word in the salience's IDF (cas.cartridge.salient.words)."""
  return fill == "salient_num"


def _lead(fill: str) -> float:
  """salient -> 0.0; salient_lead50 -> 0.5 (cartridge.salient_lead: the budget's share kept for the opening)."""
  return int(fill[len("salient_lead"):]) / 100 if fill.startswith("salient_lead") else 0.0


def _loaded(q, n: int, doc_ids: list[str]) -> list[str]:
  """The question's document + n - 1 others, shuffled, fixed per (question, n)."""
  import zlib
  import numpy as np
  rng = np.random.default_rng([n, zlib.crc32(q.qid.encode())])
  pool = [d for d in doc_ids if d != q.doc_id]
  ids = [str(d) for d in rng.choice(pool, size=min(n - 1, len(pool)), replace=False)] + [q.doc_id]
  return [ids[i] for i in rng.permutation(len(ids))]


def _composed(ev, carts, mode: str, temp: float):
  """The cartridges composed in `mode`, every key but the sink's scaled by 1 / temp."""
  if temp == 1.0:
    return ev.cartridges(carts, mode=mode)
  from cas.cartridge.compose import compose
  k, v, off = compose(carts, mode=mode, inv_freq=ev.model.inv_freq[...])
  f = carts[0].spec.num_frozen
  return ev.cartridge(k.at[:, f:].multiply(1.0 / temp), v, off)


def main(argv):
  del argv
  from cas.config_check import MONOLITHIC_INITS
  bad = sorted(set(_MONO.value) - set(MONOLITHIC_INITS))
  if bad:  # before any model or evaluation work (the monolithic rows come last: an hour on a CPU)
    raise app.UsageError(f"--monolithic={','.join(bad)}: use {' or '.join(MONOLITHIC_INITS)}")
  from cas.cartridge.compose import POSITION_MODES
  bad = sorted(set(_CMODES.value) - set(POSITION_MODES))
  if bad:
    raise app.UsageError(f"--composed_modes={','.join(bad)}: use {' or '.join(POSITION_MODES)}")
  try:
    temps = [float(t) for t in _KTEMP.value]
  except ValueError:
    raise app.UsageError(f"--key_temp={','.join(_KTEMP.value)}: give numbers > 0") from None
  if not temps or min(temps) <= 0:
    raise app.UsageError(f"--key_temp={','.join(_KTEMP.value)}: give numbers > 0")
  bad = sorted(set(_PROMPT.value) - {"template", "bare"})
  if bad or not _PROMPT.value or ("bare" in _PROMPT.value and _MDT.value > 0):
    raise app.UsageError(f"--prompt={','.join(_PROMPT.value)}: use template and/or bare "
                         "(bare without --max_doc_tokens)")
  lm = load_model()
  model, tok = lm.model, lm.tokenizer
  ev = Evaluator(model, tok)
  try:  # --prompt=bare: the question without the template's default system turn (prompt_format "bare")
    evs = {"template": ev,
           "bare": Evaluator(model, tok.with_prompt_format("bare")) if "bare" in _PROMPT.value else None}
  except ValueError as e:
    raise app.UsageError(f"--prompt=bare: {e}") from None
  if _KIND.value == "prose":
    coll = generate_prose_collection(_N.value, _SEED.value)
  else:
    from cas.data.synthetic import generate_collection
    coll = generate_collection(_N.value, _SEED.value, kind=_KIND.value)
  docs = {d.doc_id: d for d in coll.documents}
  ids = {d: tok.encode(doc.text) for d, doc in docs.items()}
  qs = [q for q in coll.questions if q.kind == "mc" and not q.is_multi_doc]
  rows: dict[str, list] = {}
  t0 = time.time()
  if _ICL.value:
    rows["icl"] = [ev.answer(ev.icl([docs[q.doc_id]]), q) for q in qs]
    print(f"icl done ({time.time() - t0:.0f}s)", flush=True)
  suffix = "+header" if _HEADER.value else ""
  surprisal = sentence_surprisal(model, tok.bos_id) if "surprisal" in _FILL.value else None
  if _MDT.value > 0:  # one cartridge per part, the oracle composes its document's parts
    from cas.data.parts import document_units
    units, _ = document_units(coll.documents, _MDT.value, tok.encode)
    parts_of: dict[str, list] = {}
    for u in units:
      parts_of.setdefault(u.meta.get("parent", u.doc_id), []).append(u)
    for fill in _FILL.value:
      if fill not in ("repeat", "key_norm", "surprisal") and not fill.startswith("salient"):
        raise app.UsageError(f"--fill={fill} with --max_doc_tokens: use repeat, key_norm, surprisal or salient[_leadNN]")
      mode = "salient" if fill.startswith("salient") else fill if fill == "surprisal" else "document"
      idf = idf_table((u.text for u in units), numbers=_numbers(fill))  # the salience's IDF, words as `fill` counts them
      ucarts = {u.doc_id: init_cartridge(model, init_ids(u.text, u.title, _P.value - 1, tok.encode, mode=mode,
                                                         idf=idf, lead=_lead(fill),
                                                         header=_HEADER.value, scores=surprisal, sep=_sep(fill),
                                                         split=_split(fill), numbers=_numbers(fill)),
                                         _P.value, num_frozen=1, sink_ids=[tok.bos_id], short_fill="repeat",
                                         strategy="key_norm" if fill == "key_norm" else "first_tokens") for u in units}
      carts = {d: ev.cartridges([ucarts[u.doc_id] for u in us], mode="shared") for d, us in parts_of.items()}
      rows[f"init_{fill}{suffix}"] = [ev.answer(carts[q.doc_id], q) for q in qs]
      print(f"init_{fill}{suffix} done ({time.time() - t0:.0f}s)", flush=True)
      for n in _COMPOSED.value:  # the question's document + n - 1 others, all their parts, shared positions
        rows[f"init_{fill}{suffix}@{n}"] = [
            ev.answer(ev.cartridges([ucarts[u.doc_id] for d in _loaded(q, n, list(parts_of)) for u in parts_of[d]],
                                    mode="shared"), q) for q in qs]
        print(f"init_{fill}{suffix}@{n} done ({time.time() - t0:.0f}s)", flush=True)
  for fill in _FILL.value if _MDT.value == 0 else ():
    carts, inits = {}, {}
    whole_idf = idf_table((doc.text for doc in docs.values()), numbers=_numbers(fill))
    framed_system = {}
    for d, t in ids.items():
      if fill == "framed":  # the ICL system message holding the document (sink = its first token)
        doc = docs[d]
        body = f"# {doc.title}\n{doc.text}" if doc.title else doc.text
        framed_system[d] = tok.document_context(ICL_SYSTEM.format(documents=body), body)
        f_ids = tok.system_prefix_ids(framed_system[d])[:_P.value]
        c = init_cartridge(model, f_ids, len(f_ids), num_frozen=1)
      else:
        if fill.startswith("salient") or fill == "surprisal" or _HEADER.value:  # cas.cartridge.salient
          t = init_ids(docs[d].text, docs[d].title, _P.value - 1, tok.encode,
                       mode="salient" if fill.startswith("salient") else fill if fill == "surprisal" else "document",
                       idf=whole_idf, lead=_lead(fill), header=_HEADER.value,
                       scores=surprisal, sep=_sep(fill), split=_split(fill), numbers=_numbers(fill))
        p = _P.value if fill in ("repeat", "key_norm", "surprisal") or fill.startswith("salient") or len(t) + 1 >= _P.value \
            else len(t) + 1  # + BOS sink
        c = init_cartridge(model, t, p, num_frozen=1, sink_ids=[tok.bos_id], short_fill="repeat",
                           strategy="key_norm" if fill == "key_norm" else "first_tokens")
      inits[d] = c
      carts[d] = ev.cartridge(*c.full_kv())
    for pmode in _PROMPT.value:
      bare = pmode == "bare"
      tag = "/bare" if bare else ""
      ctx = {d: dataclasses.replace(c, system=framed_system[d]) if bare and d in framed_system else c
             for d, c in carts.items()}  # framed + bare: the question continues the framed system message
      rows[f"init_{fill}{suffix}{tag}"] = [evs[pmode].answer(ctx[q.doc_id], q) for q in qs]
      print(f"init_{fill}{suffix}{tag} done ({time.time() - t0:.0f}s)", flush=True)
    for n in _COMPOSED.value:  # the question's document + n - 1 others (the same per question in every mode)
      for mode in _CMODES.value:
        for temp in temps:
          name = f"init_{fill}{suffix}@{n}/{mode}" + (f"/T{temp:g}" if temp != 1.0 else "")
          rows[name] = [ev.answer(_composed(ev, [inits[d] for d in _loaded(q, n, list(inits))], mode, temp), q)
                        for q in qs]
          print(f"{name} done ({time.time() - t0:.0f}s)", flush=True)
  for mono in _MONO.value:  # cartridge.monolithic_init at its init (no parts: a unit is a document)
    per = _P.value - 1
    m_ids = [t for d in docs for t in (ids[d] if mono == "concat" else ids[d][:per])]
    c = init_cartridge(model, m_ids, 1 + len(docs) * per, num_frozen=1, sink_ids=[tok.bos_id], short_fill="repeat")
    cart = ev.cartridge(*c.full_kv())
    rows[f"monolithic_{mono}"] = [ev.answer(cart, q) for q in qs]
    print(f"monolithic_{mono} done ({time.time() - t0:.0f}s)", flush=True)
  short = {d for d, t in ids.items() if len(t) < _SHORT.value}
  print(f"\n| method | all ({len(qs)}) | short documents (< {_SHORT.value} tokens) | long documents |")
  print("|---|---|---|---|")
  for name, res in rows.items():
    def acc(sel):
      r = [x for x in res if sel(x.doc_id)]
      return f"{100 * sum(x.correct for x in r) / max(len(r), 1):.1f} (n={len(r)})"
    print(f"| {name} | {acc(lambda d: True)} | {acc(lambda d: d in short)} | {acc(lambda d: d not in short)} |")
  if _OUT.value:
    json.dump({name: [{"qid": x.qid, "doc_id": x.doc_id, "correct": bool(x.correct), "prediction": x.prediction}
                      for x in res] for name, res in rows.items()}, open(_OUT.value, "w"), indent=1)


if __name__ == "__main__":
  app.run(main)
