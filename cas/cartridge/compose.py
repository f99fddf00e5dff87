"""Composing several cartridges into one prefix at inference (DESIGN §3, "Assembly"/"Positions").

The shared sink (the first `num_frozen` tokens) appears once, then every cartridge's trained
tokens in the given order. Two position modes:
  shared      every cartridge keeps its stored keys (positions F..P-1); the question starts at P,
              whatever the number of cartridges: loading order does not matter.
  sequential  the j-th cartridge is moved to positions F + j*(P-F) ... by re-rotating its
              (post-RoPE) keys by j*(P-F) positions (RoPE rotations compose); the question
              starts at F + n*(P-F), as if the cartridges had been read one after another.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from cas.cartridge.cartridge import Cartridge, CartridgeError, rerotate

POSITION_MODES = ("shared", "sequential")


def best_last(ranked: Sequence, mode: str) -> list:
  """Retrieved items, best first, in the order to load them: best last (nearest the question) in sequential
  positions, where the cartridge nearest the question is read best (RESULTS.md, "Which slot is read best");
  unchanged in shared positions, where the order changes nothing. The server and the evaluation both load so."""
  return list(ranked)[::-1] if mode == "sequential" else list(ranked)


def compose(cartridges: Sequence[Cartridge], *, mode: str = "shared", inv_freq=None):
  """Returns (k, v [L, F + n*(P-F), Hkv, D] f32, question position offset)."""
  if mode not in POSITION_MODES:
    raise CartridgeError(f"position mode {mode!r}; choose from {POSITION_MODES}")
  if not cartridges:
    raise CartridgeError("compose() needs at least one cartridge")
  spec = cartridges[0].spec
  for c in cartridges[1:]:
    if c.spec != spec:
      raise CartridgeError(f"cannot compose cartridges of different specs: {spec} vs {c.spec}")
  if mode == "sequential" and inv_freq is None:
    raise CartridgeError("sequential positions need the model's inv_freq to re-rotate keys")
  f, n, body = spec.num_frozen, len(cartridges), spec.num_tokens - spec.num_frozen
  ks, vs = [cartridges[0].frozen_k[...]], [cartridges[0].frozen_v[...]]
  for j, c in enumerate(cartridges):
    k = c.k[...]
    if mode == "sequential":
      k = rerotate(k, j * body, inv_freq)
    ks.append(k)
    vs.append(c.v[...])
  offset = spec.num_tokens if mode == "shared" else f + n * body
  return jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1), offset


def blend(trained: Cartridge, init: Cartridge, alpha: float) -> Cartridge:
  """`alpha * trained + (1 - alpha) * init` on the trainable keys and values (the sink is the trained one's; both
  share it): a point between a trained cartridge and the init it was trained from, as weight-space ensembling of a
  fine-tuned model with its start (WiSE-FT). alpha = 1 is the trained cartridge, 0 its init. The two must have one
  spec and one sink (the trained cartridge started from that init), else CartridgeError."""
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise CartridgeError(f"blend: alpha must be in [0, 1] (the trained cartridge's weight), got {alpha}")
  if trained.spec != init.spec:
    raise CartridgeError(f"blend: a trained cartridge of spec {trained.spec} and an init of spec {init.spec}")
  if not bool(jnp.array_equal(trained.frozen_k[...], init.frozen_k[...])):
    raise CartridgeError("blend: the trained cartridge and the init have different sinks (not trained from it)")
  mix = lambda a, b: alpha * a[...] + (1.0 - alpha) * b[...]  # noqa: E731
  return Cartridge(trained.frozen_k[...], trained.frozen_v[...], mix(trained.k, init.k), mix(trained.v, init.v))
