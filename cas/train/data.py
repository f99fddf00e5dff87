"""Packing self-study conversations into fixed-shape training batches, resumably.

A packed row holds several conversations one after another, each its own segment (1, 2, ...;
0 = padding). Positions restart at `position_offset` (= p, the cartridge length, in `shared`
mode) for every conversation. The teacher distribution for answer token j sits at the index that
*predicts* it (one to the left), where `loss_mask` is 1.

The iterator is deterministic: epoch e visits the conversations in the order of a permutation
seeded by (seed, e) and packs greedily. Its whole state is (epoch, cursor), saved in checkpoints.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cas.synth.format import Conversation


@dataclasses.dataclass
class LoaderState:
  epoch: int = 0
  cursor: int = 0  # index into this epoch's permutation


def pack_rows(convs: Sequence[Conversation], seq_len: int, position_offset: int | Sequence[int],
              top_k: int) -> dict[str, np.ndarray]:
  """Pack conversations (assumed to fit, see `fits`) into ONE row of length seq_len.

  position_offset: one int for all, or one per conversation. Returns arrays (no batch dim):
    tokens, positions, segment_ids, targets: [T] int32; loss_mask [T] f32;
    topk_ids [T, K] int32; topk_logprobs [T, K] f32; conv_index [T] int32 (which of `convs`).
  """
  T, K = seq_len, top_k
  out = {
      "tokens": np.zeros(T, np.int32), "positions": np.zeros(T, np.int32),
      "segment_ids": np.zeros(T, np.int32), "targets": np.zeros(T, np.int32),
      "loss_mask": np.zeros(T, np.float32), "topk_ids": np.zeros((T, K), np.int32),
      "topk_logprobs": np.full((T, K), -1e9, np.float32), "conv_index": np.full(T, -1, np.int32),
  }
  offsets = [position_offset] * len(convs) if np.isscalar(position_offset) else list(position_offset)
  at = 0
  for i, c in enumerate(convs):
    seq = np.concatenate([c.prompt_ids, c.answer_ids]).astype(np.int32)
    n = min(len(seq), T - at)
    if n <= 0:
      break
    tp = len(c.prompt_ids)
    sl = slice(at, at + n)
    out["tokens"][sl] = seq[:n]
    out["positions"][sl] = offsets[i] + np.arange(n)
    out["segment_ids"][sl] = i + 1
    out["conv_index"][sl] = i
    out["targets"][at:at + n - 1] = seq[1:n]
    # answer token j (seq index tp + j) is predicted at seq index tp + j - 1
    na = min(len(c.answer_ids), n - tp)
    if na > 0:
      idx = at + tp - 1 + np.arange(na)
      out["loss_mask"][idx] = 1.0
      k = min(K, c.topk_ids.shape[1])
      out["topk_ids"][idx, :k] = c.topk_ids[:na, :k]
      out["topk_logprobs"][idx, :k] = c.topk_logprobs[:na, :k]
    at += n
  return out


class PackedLoader:
  """Yields batches {name: [B, T, ...]} of packed conversations, forever, resumably."""

  def __init__(self, convs: Sequence[Conversation], *, batch_size: int, seq_len: int,
               position_offset: int, top_k: int, seed: int, state: LoaderState | None = None):
    if not convs:
      raise ValueError("no self-study conversations to train on")
    self.convs = list(convs)
    self.batch_size, self.seq_len = batch_size, seq_len
    self.position_offset, self.top_k, self.seed = position_offset, top_k, seed
    self.state = dataclasses.replace(state) if state else LoaderState()
    too_long = sum(c.num_tokens > seq_len for c in self.convs)
    self.num_truncated = too_long

  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.convs))

  def _next_row(self) -> dict[str, np.ndarray]:
    perm = self._perm(self.state.epoch)
    chosen, used = [], 0
    while True:
      if self.state.cursor >= len(perm):
        if chosen:
          break
        self.state = LoaderState(self.state.epoch + 1, 0)
        perm = self._perm(self.state.epoch)
      c = self.convs[perm[self.state.cursor]]
      if chosen and used + c.num_tokens > self.seq_len:
        break
      chosen.append(c)
      used += c.num_tokens
      self.state.cursor += 1
      if used >= self.seq_len:
        break
    return pack_rows(chosen, self.seq_len, self.position_offset, self.top_k)

  def next_batch(self) -> dict[str, np.ndarray]:
    rows = [self._next_row() for _ in range(self.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
