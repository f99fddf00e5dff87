"""Host-side CAS batches: one conversation per row, each row naming the slots it sees.

A CAS row holds ONE self-study conversation (never several documents' conversations packed into
one row: every row has its own assembled prefix; with `pack=True`, for a single cartridge, a row
holds as many conversations of its one document as fit in seq_len) and `slots [k_max]`, the device slots whose
cartridges the row's prefix is built from (DESIGN §3-4). Entry -1 = empty; used entries come
first, empty entries are at the end.

Distractor mixing (DESIGN §4)
-----------------------------
With probability `p_isolated` a row sees its own cartridge only. Otherwise it sees its own plus
k ~ U{1, ..., k_max-1} distinct distractors drawn uniformly from the *other* resident slots
(fewer when fewer are resident), in a random order (the own cartridge at a random position
among the used entries). With k_max = 1 every row is isolated. Three options (off by default):
a curriculum on k (`k_limit` < k_max early in training), hard negatives (with probability
`p_hard` the distractors are the resident documents most similar to the row's own) and own-last
rows (with probability `p_own_last` the own cartridge is the last entry: in sequential positions,
next to the question).

Positions (the frozen sink is F = num_frozen tokens, P = p tokens per cartridge sink included,
so each cartridge contributes P-F trainable tokens; n = number of cartridges a row loads)
-----------------------------------------------------------------------------------------------
* "shared": the sink sits at positions 0..F-1, *every* loaded cartridge's trainable tokens at
  F..P-1 (where they were initialised), and the question starts at P whatever n is. Loading
  order does not matter.
* "sequential": the sink sits at 0..F-1 once; the j-th loaded cartridge (j = 0..n-1, in entry
  order) occupies F + j*(P-F) .. F + (j+1)*(P-F) - 1 (its stored keys are re-rotated by
  j*(P-F) positions in the step); the question starts at F + n*(P-F). With n = 1 both modes
  coincide (question at P).

`ResidentSampler` chooses which conversations to train on: only those of resident documents,
balanced over the resident documents, deterministic and resumable from a JSON-able state.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cas.synth.format import Conversation

# ----------------------------------------------------------------------------- rows

def pack_rows(convs: Sequence[Conversation], seq_len: int, position_offset: int | Sequence[int],
              top_k: int) -> dict[str, np.ndarray]:
  """Pack conversations into ONE row of length seq_len (what does not fit is cut off).

  Each conversation is its own segment (1, 2, ...; 0 = padding) and its positions start at its
  position_offset (the question offset after the cartridges). The teacher distribution for answer
  token j sits at the index that *predicts* it (one to the left), where `loss_mask` is 1.

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


def sharpen_topk(topk_logprobs: np.ndarray, temperature: float) -> np.ndarray:
  """The teacher's stored top-k log-probs [..., K] (-1e9 = absent) at another temperature: each
  position's entries divided by `temperature` and renormalised to the top-k mass they had, so a
  temperature below 1 sharpens the distribution the student is distilled toward and keeps how much
  of it the top-k hold (the loss uses that mass as stored). Absent entries stay absent; 1 returns the
  input unchanged."""
  if temperature == 1.0:
    return topk_logprobs
  lp = np.asarray(topk_logprobs, np.float64)
  present = lp > -1e8
  neg = np.where(present, lp, -np.inf)
  with np.errstate(invalid="ignore", divide="ignore"):  # a position with no entry: -inf, then masked
    top = np.max(neg, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    mass = top + np.log(np.sum(np.exp(neg - top), axis=-1, keepdims=True))
    s = neg / temperature
    stop = top / temperature
    norm = stop + np.log(np.sum(np.exp(s - stop), axis=-1, keepdims=True))
    out = np.where(present, s - norm + mass, -1e9)
  return out.astype(np.float32)


POSITION_MODES = ("shared", "sequential")
BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "topk_ids",
              "topk_logprobs", "slots", "own_slot", "n_loaded")


def check_position_mode(position_mode: str) -> None:
  if position_mode not in POSITION_MODES:
    raise ValueError(f"position_mode={position_mode!r}; choose from {POSITION_MODES}")


def question_offset(n_loaded: int, *, p: int, num_frozen: int, position_mode: str) -> int:
  """Position of a row's first question token after `n_loaded` cartridges (see module doc)."""
  check_position_mode(position_mode)
  if position_mode == "shared":
    return p
  return num_frozen + n_loaded * (p - num_frozen)


def draw_slots(own_slot: int, resident_slots: Sequence[int], *, k_max: int, p_isolated: float,
               rng: np.random.Generator, k_limit: int | None = None, hard_slots: Sequence[int] = (),
               p_hard: float = 0.0, p_own_last: float = 0.0) -> np.ndarray:
  """The slots one row sees: [k_max] int32, own slot included, used entries first, -1 after.

  Always consumes rng the same way for a given (own_slot, resident set, k_max) so that a batch
  is a pure function of the rng state. Distractors are drawn from the sorted set of resident
  slots other than `own_slot` (so the result does not depend on the order of `resident_slots`).
  k_limit (curriculum on k): loads at most k_limit cartridges (k ~ U{1..k_limit-1} distractors);
    default k_max.
  hard_slots, p_hard (hard negatives): with probability p_hard a mixed row's distractors are the
    first k of `hard_slots` (resident slots of the documents most similar to its own, most similar
    first; uniform draws fill up when fewer are resident). p_hard = 0 draws exactly as before.
  p_own_last: with this probability a mixed row puts its own cartridge last among the used entries
    (in sequential positions: next to the question, the distance it has when read alone and where the
    server loads the best retrieved cartridge); the distractors keep their drawn order. p_own_last = 0
    draws exactly as before.
  """
  own_slot = int(own_slot)
  others = np.asarray(sorted(set(int(s) for s in resident_slots) - {own_slot}), np.int32)
  out = np.full(k_max, -1, np.int32)
  limit = k_max if k_limit is None else max(1, min(int(k_limit), k_max))
  u = rng.random()
  if limit == 1 or u < p_isolated or len(others) == 0:
    out[0] = own_slot
    return out
  k = min(int(rng.integers(1, limit)), len(others))  # U{1..k_limit-1}, capped by what is resident
  if p_hard > 0 and rng.random() < p_hard:
    pool = set(others.tolist())
    hard = [int(s) for s in dict.fromkeys(hard_slots) if int(s) in pool][:k]
    rest = np.asarray([s for s in others.tolist() if s not in hard], np.int32)
    fill = rng.choice(rest, size=k - len(hard), replace=False) if k > len(hard) else np.zeros(0, np.int32)
    picked = np.concatenate([np.asarray(hard, np.int32), fill.astype(np.int32)])
  else:
    picked = rng.choice(others, size=k, replace=False)
  used = np.concatenate([[own_slot], picked]).astype(np.int32)
  out[:k + 1] = used[rng.permutation(k + 1)]
  if p_own_last > 0 and rng.random() < p_own_last:
    out[:k + 1] = np.concatenate([out[:k + 1][out[:k + 1] != own_slot], [own_slot]])
  return out


def build_cas_batch(samples: Sequence[tuple[Conversation | Sequence[Conversation], int]],
                    resident_slots: Sequence[int], *,
                    k_max: int, p_isolated: float, rng: np.random.Generator, seq_len: int,
                    top_k: int, p: int, num_frozen: int = 1, position_mode: str = "shared",
                    batch_size: int | None = None, k_limit: int | None = None,
                    hard_slots: Sequence[Sequence[int]] | None = None, p_hard: float = 0.0,
                    mixed_weight: float = 1.0, p_silent: float = 0.0,
                    p_own_last: float = 0.0) -> dict[str, np.ndarray]:
  """One CAS batch: row r = conversation samples[r][0] (truncated to seq_len), own slot samples[r][1].
  samples[r][0] may be a list of conversations of that document: packed into the row one after the
  other (each its own segment, all at the question offset; see `pack_rows`).

  p: cartridge length P (sink included); num_frozen: F. batch_size: pad to this many rows (padding
  rows: segment 0, loss_mask 0, slots all -1, own_slot -1); default len(samples).
  k_limit, p_hard, hard_slots[r] (row r's most similar resident slots), p_own_last: see `draw_slots`.
  mixed_weight: the loss_mask of rows that load distractors (silent rows too) is scaled by it (the loss is a
    mask-weighted mean, so this weights mixed against isolated rows); 1.0 leaves it as is.
  p_silent: with this probability a row that loads distractors drops its own cartridge (a *silent*
    row: its distractors only, and the step's teacher is the model without any prefix, so the
    distractors learn to add nothing to a conversation that is not theirs); the batch then has
    `silent` [Bt] f32 (1 = silent). 0 draws exactly as before and adds no key.
  Returns numpy arrays (Bt = batch size, T = seq_len, K = top_k):
    tokens, positions, segment_ids (1 on tokens, 0 on padding), targets: [Bt, T] int32;
    loss_mask [Bt, T] f32; topk_ids [Bt, T, K] int32; topk_logprobs [Bt, T, K] f32 (-1e9 absent);
    slots [Bt, k_max] int32 (-1 = empty, used entries first); own_slot [Bt] int32;
    n_loaded [Bt] int32 (number of used entries).
  Deterministic given the rng state; rows draw their slots in order.
  """
  check_position_mode(position_mode)
  if k_max < 1:
    raise ValueError(f"k_max={k_max} must be >= 1")
  if not 0.0 <= p_isolated <= 1.0:
    raise ValueError(f"p_isolated={p_isolated} must be in [0, 1]")
  if not 0 <= num_frozen < p:
    raise ValueError(f"num_frozen={num_frozen} must be in [0, p={p})")
  bt = len(samples) if batch_size is None else int(batch_size)
  if len(samples) > bt:
    raise ValueError(f"{len(samples)} samples do not fit batch_size={bt}")
  resident = set(int(s) for s in resident_slots)
  rows = []
  slots = np.full((bt, k_max), -1, np.int32)
  own = np.full(bt, -1, np.int32)
  silent = np.zeros(bt, np.float32)
  if not 0.0 <= p_silent <= 1.0:
    raise ValueError(f"p_silent={p_silent} must be in [0, 1]")
  if not 0.0 <= p_own_last <= 1.0:
    raise ValueError(f"p_own_last={p_own_last} must be in [0, 1]")
  for r, (conv, own_slot) in enumerate(samples):
    if int(own_slot) not in resident:
      doc = (conv[0] if isinstance(conv, (list, tuple)) else conv).doc_id
      raise ValueError(f"build_cas_batch: sample {r} (doc {doc!r}) names slot {own_slot}, "
                       f"which is not among the resident slots {sorted(resident)}")
    slots[r] = draw_slots(own_slot, resident_slots, k_max=k_max, p_isolated=p_isolated, rng=rng, k_limit=k_limit,
                          hard_slots=hard_slots[r] if hard_slots is not None else (), p_hard=p_hard,
                          p_own_last=p_own_last)
    own[r] = int(own_slot)
    if p_silent > 0 and (slots[r] >= 0).sum() > 1 and rng.random() < p_silent:  # distractors only
      rest = [int(s) for s in slots[r] if s >= 0 and s != int(own_slot)]
      slots[r] = rest + [-1] * (k_max - len(rest))
      silent[r] = 1.0
    n = int((slots[r] >= 0).sum())
    off = question_offset(n, p=p, num_frozen=num_frozen, position_mode=position_mode)
    row = pack_rows(list(conv) if isinstance(conv, (list, tuple)) else [conv], seq_len, off, top_k)
    row.pop("conv_index")
    rows.append(row)
  for _ in range(bt - len(samples)):
    row = pack_rows([], seq_len, 0, top_k)
    row.pop("conv_index")
    rows.append(row)
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  out["slots"] = slots
  out["own_slot"] = own
  out["n_loaded"] = (slots >= 0).sum(axis=1).astype(np.int32)
  if p_silent > 0:
    out["silent"] = silent
  if mixed_weight != 1.0:  # rows with distractors: more than one cartridge loaded, or distractors only (silent)
    out["loss_mask"] = (out["loss_mask"] * np.where((out["n_loaded"] > 1) | (silent > 0), np.float32(mixed_weight),
                                                    np.float32(1.0))[:, None]).astype(np.float32)
  return out


# ----------------------------------------------------------------------------- sampling

def _doc_key(doc_id: str) -> int:
  """A stable 64-bit integer for a doc id (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "little")


class ResidentSampler:
  """Draws training conversations of resident documents only; deterministic and resumable.

  conversations: doc_id -> sequence of items (conversation indices, `Conversation`s, ...), or a
  callable doc_id -> that sequence (called on every draw of that document; cache it yourself
  if it is expensive). Only its length and the chosen item are used.

  Which documents: draws go in *passes*: a pass is a random permutation (seeded by (seed, pass))
  of the documents resident when it starts; each draw takes the next pending document of the
  pass that is still resident; documents admitted mid-pass join at the next pass. So every
  resident document gets one row per pass (balanced training; `weights[d]` rows with weights),
  and evicted documents are never drawn.
  Which conversation of a document: each document walks its own epochs; epoch e visits its items
  in the order of a permutation seeded by (seed, sha256(doc_id), e).
  Distractor mixing in `next_batch` uses an rng seeded by (seed, batch counter).
  The whole state is `state_dict()` (JSON-serialisable); `load_state_dict` resumes exactly.
  """

  def __init__(self, conversations: Mapping[str, Sequence[Any]] | Callable[[str], Sequence[Any]], *,
               seed: int, state: dict | None = None, weights: Mapping[str, int] | None = None,
               neighbors: Mapping[str, Sequence[str]] | None = None):
    """weights: doc_id -> rows per pass (default 1 each): e.g. by document length, so a long
    document's cartridge gets more training rows while resident (cas.train.loop.length_weights).
    neighbors: doc_id -> the other documents, most similar first (hard negatives: `next_batch`
    with p_hard > 0 loads the resident ones as a row's distractors)."""
    self.neighbors = {str(k): [str(d) for d in v] for k, v in (neighbors or {}).items()}
    self._get = conversations if callable(conversations) else conversations.__getitem__
    self.seed = int(seed)
    self.weights = {str(k): int(v) for k, v in (weights or {}).items()}
    bad = {k: v for k, v in self.weights.items() if v < 1}
    if bad:
      raise ValueError(f"ResidentSampler: weights must be >= 1, got {bad}")
    self._state = {"pass": 0, "pending": [], "docs": {}, "batches": 0}
    if state is not None:
      self.load_state_dict(state)

  # -- state -----------------------------------------------------------------
  def state_dict(self) -> dict:
    """{"pass": int, "pending": [doc_id], "docs": {doc_id: [epoch, cursor]}, "batches": int}."""
    return copy.deepcopy(self._state)

  def load_state_dict(self, state: Mapping) -> None:
    missing = {"pass", "pending", "docs", "batches"} - set(state)
    if missing:
      raise ValueError(f"ResidentSampler state lacks {sorted(missing)}")
    self._state = {"pass": int(state["pass"]), "pending": [str(d) for d in state["pending"]],
                   "docs": {str(k): [int(v[0]), int(v[1])] for k, v in state["docs"].items()},
                   "batches": int(state["batches"])}

  # -- drawing ---------------------------------------------------------------
  def _items(self, doc_id: str) -> Sequence[Any]:
    try:
      items = self._get(doc_id)
    except KeyError:
      raise KeyError(f"ResidentSampler: no conversations known for resident document {doc_id!r}") from None
    if len(items) == 0:
      raise ValueError(f"ResidentSampler: resident document {doc_id!r} has no conversations")
    return items

  def _next_doc(self, resident: Mapping[str, int]) -> str:
    st = self._state
    while True:
      while st["pending"]:
        d = st["pending"].pop(0)
        if d in resident:
          return d
      docs = [d for d in sorted(resident) for _ in range(self.weights.get(d, 1))]
      order = np.random.default_rng([self.seed, 0, st["pass"]]).permutation(len(docs))
      st["pending"] = [docs[i] for i in order]
      st["pass"] += 1

  def _peek_item(self, doc_id: str) -> tuple[Any, list[int]]:
    """The document's next item and the [epoch, cursor] after taking it (nothing is consumed)."""
    items = self._items(doc_id)
    epoch, cursor = self._state["docs"].get(doc_id, [0, 0])
    if cursor >= len(items):
      epoch, cursor = epoch + 1, 0
    perm = np.random.default_rng([self.seed, 1, _doc_key(doc_id), epoch]).permutation(len(items))
    return items[int(perm[cursor])], [epoch, cursor + 1]

  def _next_item(self, doc_id: str) -> Any:
    item, after = self._peek_item(doc_id)
    self._state["docs"][doc_id] = after
    return item

  def _next_packed(self, doc_id: str, seq_len: int) -> list[Any]:
    """Items of one document for one row: the next one, then the following ones while their tokens
    (`num_tokens`) fit in seq_len in all (greedy, in the document's own order, as one packed row)."""
    out = [self._next_item(doc_id)]
    used = int(out[0].num_tokens)
    while used < seq_len:
      item, after = self._peek_item(doc_id)
      if used + int(item.num_tokens) > seq_len:
        break
      self._state["docs"][doc_id] = after
      out.append(item)
      used += int(item.num_tokens)
    return out

  def sample(self, resident: Mapping[str, int], n: int, *, pack_len: int = 0) -> list[tuple[str, Any, int]]:
    """n draws among the resident documents: [(doc_id, item, slot)]. resident: doc_id -> slot.
    pack_len > 0: each draw is a list of that document's items whose `num_tokens` fit in pack_len
    together (`_next_packed`; items must be Conversations)."""
    if not resident:
      raise ValueError("ResidentSampler.sample: no resident documents")
    out = []
    for _ in range(n):
      d = self._next_doc(resident)
      out.append((d, self._next_packed(d, pack_len) if pack_len > 0 else self._next_item(d), int(resident[d])))
    return out

  def next_batch(self, resident: Mapping[str, int], batch_size: int, *,
                 to_conversation: Callable[[Any], Conversation] | None = None, pack: bool = False,
                 **build_kwargs) -> dict[str, np.ndarray]:
    """Draw `batch_size` rows and build them with `build_cas_batch` (its keyword arguments other
    than rng and resident_slots go in build_kwargs). to_conversation maps an item to a
    Conversation (default: items are Conversations). pack: a row holds as many conversations of
    its document as fit in build_kwargs["seq_len"] (for k_max = 1: every row sees its own
    cartridge only, so conversations of one document may share a row; items must be Conversations)."""
    if pack and build_kwargs.get("k_max", 1) != 1:
      raise ValueError("ResidentSampler.next_batch: pack=True needs k_max = 1 (a row with distractors holds one "
                       "conversation)")
    draws = self.sample(resident, batch_size, pack_len=int(build_kwargs["seq_len"]) if pack else 0)
    conv = to_conversation or (lambda x: x)
    if pack:
      conv = lambda items, one=conv: [one(x) for x in items]
    rng = np.random.default_rng([self.seed, 2, self._state["batches"]])
    self._state["batches"] += 1
    samples = [(conv(item), slot) for _, item, slot in draws]
    if build_kwargs.get("p_hard", 0.0) > 0:
      build_kwargs["hard_slots"] = [[int(resident[n]) for n in self.neighbors.get(d, ()) if n in resident]
                                    for d, _, _ in draws]
    return build_cas_batch(samples, sorted(resident.values()), rng=rng, **build_kwargs)
