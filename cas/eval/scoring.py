"""Scoring continuations under a (possibly empty) prefix KV: the shared engine of every method.

Every evaluation method reduces to "context as prefix KV" + "prompt tokens" + "continuations":
  no_context  prefix = nothing
  icl         prefix = KV of the chat-formatted system message holding the document(s)
  cartridge   prefix = the trained cartridge(s)
so the same jitted code scores multiple-choice options for all of them.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas.model.llama import KVCache, Prefix, Transformer

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CONTINUATION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)  # the scored window's length (score_continuations)


def bucket(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
  for b in buckets:
    if n <= b:
      return b
  return int(2 ** np.ceil(np.log2(n)))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _prefix_kv(model: Transformer, tokens, chunk: int):
  """tokens [1, T] -> k, v [L, T, Hkv, D] (positions 0..T-1), computed in chunks of `chunk`."""
  t = tokens.shape[1]
  cache = KVCache.empty(model.cfg, 1, t, model.dtype)
  seg = (tokens >= 0).astype(jnp.int32)
  for s in range(0, t, chunk):
    e = min(t, s + chunk)
    _, cache = model(jnp.maximum(tokens[:, s:e], 0), jnp.arange(s, e)[None], seg[:, s:e], cache=cache,
                     return_hidden=True)  # only the cache is wanted: no [1, chunk, V] logits
  return cache.k[:, 0], cache.v[:, 0]


def context_kv(model: Transformer, ids: Sequence[int], chunk: int = 512):
  """KV [L, T, Hkv, D] of a context (e.g. the document's system message), padded to a bucket
  internally; returns exactly len(ids) slots."""
  n = len(ids)
  if n == 0:
    return None
  nb = bucket(n)
  toks = np.full((1, nb), -1, np.int32)
  toks[0, :n] = ids
  k, v = _prefix_kv(model, jnp.asarray(toks), chunk=min(chunk, nb))
  return k[:, :n], v[:, :n]


def _padded_prefix(pk, pv):
  """k, v [L, P, Hkv, D] padded to a bucket of slots, with the mask of the real ones [Pb] bool: prefixes of
  any length then share compilations."""
  p = int(pk.shape[1])
  pb = bucket(p)
  pad = [(0, 0), (0, pb - p), (0, 0), (0, 0)]
  return jnp.pad(pk, pad), jnp.pad(pv, pad), jnp.arange(pb) < p


@functools.partial(jax.jit, static_argnames=("text_prefix", "span"))
def _score(model: Transformer, pk, pv, pmask, tokens, positions, segs, tmask, start, text_prefix=False, span=None):
  """Sum of log p(target tokens) per row. tokens [B, T]; tmask [B, T] marks tokens to score.
  start [] int32, span (static): every scored token lies in tokens[:, start + 1 : start + 1 + span], so only
  the hidden states at start .. start + span - 1 go through the LM head and the log-softmax (the rows share
  their prompt; the [B, T, V] logits of the prompt positions are never made). span None: every position.
  text_prefix: the prefix is text at positions 0..P-1 (ICL), which a sliding-window model
  windows like the prompt (`cas.model.llama.Prefix.positions`); else a cartridge."""
  prefix = None
  if pk is not None:
    b = tokens.shape[0]
    ppos = jnp.arange(pk.shape[1], dtype=jnp.int32)[None] if text_prefix else None  # [1, P]
    prefix = Prefix(jnp.broadcast_to(pk[:, None], (pk.shape[0], b) + pk.shape[1:]).astype(model.dtype),
                    jnp.broadcast_to(pv[:, None], (pv.shape[0], b) + pv.shape[1:]).astype(model.dtype),
                    jnp.broadcast_to(pmask[None], (b, pmask.shape[0])), ppos)
  h, _ = model(tokens, positions, segs, prefix=prefix, return_hidden=True)
  if span is None:
    h, tgt_ids, m = h[:, :-1], tokens[:, 1:], tmask[:, 1:]
  else:
    h = jax.lax.dynamic_slice_in_dim(h, start, span, axis=1)
    tgt_ids = jax.lax.dynamic_slice_in_dim(tokens, start + 1, span, axis=1)
    m = jax.lax.dynamic_slice_in_dim(tmask, start + 1, span, axis=1)
  lp = jax.nn.log_softmax(model.logits_from_hidden(h), axis=-1)
  tgt = jnp.take_along_axis(lp, tgt_ids[..., None], axis=-1)[..., 0]
  return (tgt * m).sum(-1), m.sum(-1)


def pack_rows(prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]], position_offset: int):
  """[prompt + continuation] rows padded to buckets, as `_score` reads them: a dict of tokens, positions, segs,
  tmask [B, T] (tmask marks the continuations' tokens), start [] int32 and span (static; None: every position)."""
  n = len(continuations)
  seqs = [list(prompt_ids) + list(c) for c in continuations]
  T = bucket(max(len(s) for s in seqs))
  # the scored tokens are the continuations', in tokens[len(prompt) : T]: a window tokens[start + 1 : start + 1
  # + span] that holds them all (moved left where it would pass T; the first token of a sequence has nothing
  # before it and is never scored) is all that the LM head has to see
  span = bucket(max(1, max(len(c) for c in continuations)), CONTINUATION_BUCKETS)
  start = min(max(len(prompt_ids) - 1, 0), T - 1 - span)
  B = bucket(n, (1, 2, 4, 8, 16, 32, 64))
  tokens = np.zeros((B, T), np.int32)
  segs = np.zeros((B, T), np.int32)
  tmask = np.zeros((B, T), np.float32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    segs[i, :len(s)] = 1
    tmask[i, len(prompt_ids):len(s)] = 1.0
  positions = np.broadcast_to(position_offset + np.arange(T, dtype=np.int32), (B, T))
  return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), segs=jnp.asarray(segs),
              tmask=jnp.asarray(tmask), start=jnp.asarray(max(start, 0), jnp.int32),
              span=span if start >= 0 else None)


def score_continuations(model: Transformer, prefix_kv, prompt_ids: Sequence[int],
                        continuations: Sequence[Sequence[int]], *, position_offset: int | None = None,
                        text_prefix: bool = False):
  """Log-likelihood of each continuation after [prefix KV] + prompt.

  prefix_kv: None or (k, v) [L, P, Hkv, D]. Positions start at P (or `position_offset`).
  text_prefix: prefix_kv is text (`context_kv`), not a cartridge; matters only for models with
  sliding-window layers (Gemma 3), which then window it like ordinary context.
  Returns (sum_logprob [N] f32, num_tokens [N]).
  """
  p = 0 if prefix_kv is None else int(prefix_kv[0].shape[1])
  rows = pack_rows(prompt_ids, continuations, p if position_offset is None else position_offset)
  if prefix_kv is None:
    pk = pv = pm = None
  else:
    pk, pv, pm = _padded_prefix(*prefix_kv)
  s, c = _score(model, pk, pv, pm, **rows,
                text_prefix=bool(text_prefix and pk is not None and model.cfg.has_sliding_window))
  n = len(continuations)
  return np.asarray(s)[:n], np.asarray(c)[:n]


@jax.jit
def _share(model: Transformer, pk, pv, pmask, dmask, tokens, positions, segs):
  prefix = Prefix(pk[:, None].astype(model.dtype), pv[:, None].astype(model.dtype), pmask[None], None, None,
                  dmask[None])
  _, _, share = model(tokens, positions, segs, prefix=prefix, return_hidden=True, prefix_share_stride=1)
  return share


def prefix_attention_share(model: Transformer, prefix_kv, distractor, prompt_ids: Sequence[int], *,
                           position_offset: int | None = None) -> float:
  """The share of the prompt's attention within a cartridge prefix that falls on its `distractor`
  slots ([P] bool), averaged over every prompt token, layer and head (`cas.model.llama.prefix_share`):
  how much of what the question reads from the loaded cartridges comes from the ones that are not its
  document's. prefix_kv (k, v) [L, P, Hkv, D]; positions start at P (or `position_offset`)."""
  pk, pv = prefix_kv
  p = int(pk.shape[1])
  distractor = np.asarray(distractor, bool)
  if distractor.shape != (p,):
    raise ValueError(f"prefix_attention_share: distractor mask {distractor.shape} for a {p}-slot prefix")
  off = p if position_offset is None else position_offset
  t = bucket(len(prompt_ids))
  tokens = np.zeros((1, t), np.int32)
  tokens[0, :len(prompt_ids)] = prompt_ids
  segs = (np.arange(t) < len(prompt_ids)).astype(np.int32)[None]
  positions = (off + np.arange(t, dtype=np.int32))[None]
  pk, pv, pm = _padded_prefix(pk, pv)
  dm = np.zeros(pm.shape[0], bool)
  dm[:p] = distractor
  return float(_share(model, pk, pv, pm, jnp.asarray(dm), jnp.asarray(tokens), jnp.asarray(positions),
                      jnp.asarray(segs)))
