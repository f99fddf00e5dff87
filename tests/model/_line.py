"""A tiny model with the real SmolLM2 tokenizer whose greedy text is known: after " yes" it
writes a newline, after anything else " yes" (so a reply is " yes\n yes\n ..."), for tests of
stopping at the end of a line."""
from __future__ import annotations

import dataclasses

import numpy as np

from cas.testing import TINY_SMOL_VOCAB, tiny_model

LINE_CFG = dataclasses.replace(TINY_SMOL_VOCAB, tie_word_embeddings=False)


def line_model(tok):
  """(model, yes_id, newline_id). Hidden dimension 0 carries the decision: every embedding has
  -100 there except " yes" (+100); the final norm keeps only that dimension and the LM head maps
  its sign to newline (+) or " yes" (-). The random layers (std 0.02) cannot flip a 100."""
  (yes,), (nl,) = tok.encode(" yes"), tok.encode("\n")
  m = tiny_model(seed=0, cfg=LINE_CFG, scale=1.0)
  emb = np.asarray(m.embed[...]).copy()  # [V, E] f32
  emb[:, 0] = -100.0
  emb[yes, 0] = 100.0
  m.embed.set_value(emb)
  norm = np.zeros(LINE_CFG.hidden_size, np.float32)  # [E]
  norm[0] = 1.0
  m.final_norm.set_value(norm)
  head = np.zeros((LINE_CFG.hidden_size, LINE_CFG.vocab_size), np.float32)  # [E, V]
  head[0, nl], head[0, yes] = 1.0, -1.0
  m.lm_head.set_value(head)
  return m, yes, nl
