"""Which cartridges leave the accelerator and which come in (DESIGN §4, rotation).

Every `every` (R) training steps a fraction `evict_fraction` (phi) of the B slots is swapped:
the most-trained resident documents leave and the least-trained non-resident documents come
in, so that all N documents are trained about equally often. Empty slots (at start-up) are
filled first, without evicting anything.

Everything here is pure and deterministic: the same table and counts always give the same
plan. Ties are broken
  * for eviction by slot index (lower slot first),
  * for admission by a seeded hash of the doc id (a fixed pseudo-random order of the
    documents that does not depend on dict order or on the collection's order, so documents
    that are stored by topic do not enter the device by topic).

Because non-resident counts do not change while documents are off the device, the admissions
of the next rotation can be chosen (and prefetched) right after a rotation; only the eviction
needs the resident counts at rotation time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Mapping, Sequence


class RotationError(ValueError):
  """Rotation settings or inputs that cannot work."""


def rotation_problems(num_docs: int | None, num_slots: int, k_max: int, evict_fraction: float | None = None,
                      every: int | None = None) -> list[tuple[str, str]]:
  """Every problem of the rotation settings: (name, message) pairs, name one of "num_docs",
  "num_slots", "k_max", "evict_fraction", "every"; empty when 1 <= k_max <= B <= N, 0 < phi <= 1
  and R >= 1. num_docs None: the collection is not known yet (B <= N is not checked)."""
  out: list[tuple[str, str]] = []
  ok = {}
  for key, name, val in (("num_docs", "num_docs N", num_docs), ("num_slots", "num_slots B", num_slots),
                         ("k_max", "k_max", k_max)):
    if key == "num_docs" and val is None:
      continue
    ok[key] = not (isinstance(val, bool) or not isinstance(val, int) or val < 1)
    if not ok[key]:
      out.append((key, f"{name} must be a positive int, got {val!r}"))
  if ok.get("num_docs") and ok["num_slots"] and num_slots > num_docs:
    out.append(("num_slots", f"num_slots B={num_slots} exceeds the number of documents N={num_docs}: "
                             f"use B <= N (B = N keeps every cartridge resident, no rotation)"))
  if ok["num_slots"] and ok["k_max"] and k_max > num_slots:
    out.append(("k_max", f"k_max={k_max} cartridges per sample exceeds num_slots B={num_slots}: a "
                         f"sample can only see resident cartridges, so use k_max <= B"))
  if evict_fraction is not None and not (isinstance(evict_fraction, (int, float)) and not isinstance(evict_fraction, bool)
                                         and 0.0 < float(evict_fraction) <= 1.0):
    out.append(("evict_fraction", f"evict_fraction phi={evict_fraction} must be in (0, 1]"))
  if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
    out.append(("every", f"rotation every R={every!r} steps must be a positive int"))
  return out


def validate(num_docs: int, num_slots: int, k_max: int, evict_fraction: float | None = None,
             every: int | None = None) -> None:
  """Raise RotationError unless 1 <= k_max <= B <= N, 0 < phi <= 1 and R >= 1 (the first of
  `rotation_problems`)."""
  problems = rotation_problems(num_docs, num_slots, k_max, evict_fraction, every)
  if problems:
    raise RotationError(problems[0][1])


def check_every_document_trained(num_docs: int, num_slots: int, evict_fraction: float, every: int,
                                 steps: int) -> None:
  """Raise RotationError when `steps` are too few for the rotation to bring every document onto
  the device at least once (its cartridge would never be trained, and evaluation would find none):
  B slots start with B documents; each rotation (every R steps) admits ceil(phi*B) new ones, so the
  last of N documents comes in after R * ceil((N - B) / ceil(phi*B)) steps and needs one more."""
  if num_docs <= num_slots:
    return
  per = max(1, math.ceil(float(evict_fraction) * num_slots - 1e-9))
  need = every * math.ceil((num_docs - num_slots) / per) + 1
  if steps < need:
    raise RotationError(
        f"train.steps={steps} is too few to train every document: with num_slots B={num_slots} of N={num_docs} "
        f"documents and {per} admitted every rotate_every R={every} steps, the last documents come onto the device "
        f"after step {need - 1}; use train.steps >= {need}, or more slots, a larger evict_fraction or a smaller "
        f"rotate_every")


def tiebreak_key(doc_id: str, seed: int) -> int:
  """Deterministic pseudo-random rank of a document (64-bit hash of seed and doc id)."""
  h = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8"), digest_size=8)
  return int.from_bytes(h.digest(), "big")


@dataclasses.dataclass(frozen=True)
class RotationPlan:
  """A rotation: `admit[i]` goes into `slots[i]`, whose current occupant `evict[i]` (None for an
  empty slot) goes back to the store."""
  slots: tuple[int, ...]
  evict: tuple[str | None, ...]
  admit: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.slots)


@dataclasses.dataclass(frozen=True)
class RotationPolicy:
  """num_slots B, evict_fraction phi in (0, 1], every R >= 1 steps, seed for admission ties."""
  num_slots: int
  evict_fraction: float
  every: int
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.num_slots, bool) or not isinstance(self.num_slots, int) or self.num_slots < 1:
      raise RotationError(f"num_slots B must be a positive int, got {self.num_slots!r}")
    validate(self.num_slots, self.num_slots, 1, self.evict_fraction, self.every)

  def validate(self, num_docs: int, k_max: int) -> None:
    """Check this policy against a collection of `num_docs` and samples of up to `k_max` slots."""
    validate(num_docs, self.num_slots, k_max, self.evict_fraction, self.every)

  @property
  def num_evict(self) -> int:
    """Slots swapped per rotation when all are full: ceil(phi * B), at least 1."""
    return max(1, math.ceil(self.evict_fraction * self.num_slots - 1e-9))

  def due(self, step: int) -> bool:
    """True at steps R, 2R, ... (step = number of train steps done)."""
    return step > 0 and step % self.every == 0

  def _check_table(self, table: Sequence[str | None]) -> None:
    if len(table) != self.num_slots:
      raise RotationError(f"slot table has {len(table)} entries, policy has num_slots B={self.num_slots}")
    docs = [d for d in table if d is not None]
    if len(set(docs)) != len(docs):
      dup = sorted({d for d in docs if docs.count(d) > 1})
      raise RotationError(f"slot table holds documents {dup} in more than one slot")

  def num_admit(self, table: Sequence[str | None], num_docs: int) -> int:
    """How many documents the next rotation admits: fill every empty slot, and swap at least
    ceil(phi*B) slots, but never more than there are non-resident documents."""
    self._check_table(table)
    empty = sum(d is None for d in table)
    resident = self.num_slots - empty
    return max(0, min(max(self.num_evict, empty), num_docs - resident))

  def choose_admit(self, table: Sequence[str | None], counts: Mapping[str, int], n: int) -> list[str]:
    """The `n` least-trained documents of `counts` not in `table` (ties: seeded hash order)."""
    self._check_table(table)
    resident = {d for d in table if d is not None}
    cands = [d for d in counts if d not in resident]
    if n > len(cands):
      raise RotationError(f"cannot admit {n} documents: only {len(cands)} are not resident")
    cands.sort(key=lambda d: (counts[d], tiebreak_key(d, self.seed), d))
    return cands[:n]

  def choose_evict(self, table: Sequence[str | None], counts: Mapping[str, int], n: int) -> list[int]:
    """`n` slots to free: empty slots first, then the most-trained residents (ties: lower slot)."""
    self._check_table(table)
    if n > self.num_slots:
      raise RotationError(f"cannot evict {n} slots of B={self.num_slots}")
    missing = [d for d in table if d is not None and d not in counts]
    if missing:
      raise RotationError(f"counts lack resident documents {missing[:5]}")
    order = sorted(range(self.num_slots),
                   key=lambda s: (table[s] is not None, -(counts[table[s]] if table[s] is not None else 0), s))
    return order[:n]

  def plan(self, table: Sequence[str | None], counts: Mapping[str, int],
           admit: Sequence[str] | None = None) -> RotationPlan:
    """The full rotation for the current table and counts (all documents, resident ones with
    their current on-device counts). `admit`: documents already chosen (and prefetched) by
    `choose_admit` since the last rotation; chosen now when None."""
    if admit is None:
      admit = self.choose_admit(table, counts, self.num_admit(table, len(counts)))
    admit = list(admit)
    resident = {d for d in table if d is not None}
    bad = [d for d in admit if d in resident]
    if bad:
      raise RotationError(f"documents {bad} to admit are already resident")
    if len(set(admit)) != len(admit):
      raise RotationError(f"documents to admit contain duplicates: {admit}")
    slots = self.choose_evict(table, counts, len(admit))
    return RotationPlan(tuple(slots), tuple(table[s] for s in slots), tuple(admit))
