"""RotationPolicy: validation errors, fill, most-trained out / least-trained in, deterministic ties."""
import hypothesis.strategies as hs
import pytest
from hypothesis import given, settings

from cas.rotation.policy import (RotationError, RotationPolicy, check_every_document_trained, tiebreak_key,
                                 validate)


def test_validate_errors():
  validate(10, 4, 4, 0.5, 1)
  validate(4, 4, 1, 1.0, 3)  # B = N is allowed (no rotation)
  with pytest.raises(RotationError, match="num_slots B=5 exceeds the number of documents N=4"):
    validate(4, 5, 1)
  with pytest.raises(RotationError, match="k_max=5 .* exceeds num_slots B=4"):
    validate(10, 4, 5)
  with pytest.raises(RotationError, match="k_max must be a positive int"):
    validate(10, 4, 0)
  for phi in (0.0, -0.1, 1.5):
    with pytest.raises(RotationError, match=f"evict_fraction phi={phi} must be in \\(0, 1\\]"):
      RotationPolicy(4, phi, 1)
  with pytest.raises(RotationError, match="every R=0"):
    RotationPolicy(4, 0.5, 0)
  with pytest.raises(RotationError, match="num_slots B must be a positive int"):
    RotationPolicy(0, 0.5, 1)
  with pytest.raises(RotationError, match="B=4 exceeds .* N=3"):
    RotationPolicy(4, 0.5, 1).validate(num_docs=3, k_max=2)


def test_num_evict_and_due():
  assert RotationPolicy(4, 0.5, 2).num_evict == 2
  assert RotationPolicy(10, 0.3, 2).num_evict == 3  # no float ceil surprise (0.3*10 = 3.0000000000000004)
  assert RotationPolicy(8, 0.01, 2).num_evict == 1
  assert RotationPolicy(8, 1.0, 2).num_evict == 8
  p = RotationPolicy(4, 0.5, 3)
  assert [s for s in range(10) if p.due(s)] == [3, 6, 9]


def test_fill_empty_slots_with_least_trained():
  p = RotationPolicy(4, 0.25, 1)
  counts = {f"d{i}": c for i, c in enumerate([5, 0, 3, 0, 9, 1])}
  plan = p.plan([None] * 4, counts)
  assert plan.slots == (0, 1, 2, 3) and plan.evict == (None,) * 4
  assert set(plan.admit) == {"d1", "d3", "d5", "d2"}
  # partly filled table: empty slots are filled first even with phi*B = 1
  plan = p.plan(["d0", None, "d4", None], counts)
  assert plan.slots == (1, 3) and plan.evict == (None, None)


def test_evicts_most_trained_admits_least_trained():
  p = RotationPolicy(4, 0.5, 1)
  table = ["a", "b", "c", "d"]
  counts = {"a": 3, "b": 7, "c": 7, "d": 1, "e": 4, "f": 0, "g": 2, "h": 9}
  plan = p.plan(table, counts)
  assert plan.slots == (1, 2)  # b and c tie at 7: lower slot first
  assert plan.evict == ("b", "c")
  assert plan.admit == ("f", "g")
  # fewer non-resident documents than phi*B: only that many swaps
  assert p.num_admit(table, 5) == 1
  assert p.num_admit(table, 4) == 0
  assert len(p.plan(table, {k: counts[k] for k in "abcde"})) == 1


def test_admission_ties_are_seeded_and_order_independent():
  docs = [f"doc{i}" for i in range(20)]
  p0, p1 = RotationPolicy(4, 1.0, 1, seed=0), RotationPolicy(4, 1.0, 1, seed=1)
  counts = {d: 0 for d in docs}
  rev = {d: 0 for d in reversed(docs)}
  a0 = p0.choose_admit([None] * 4, counts, 4)
  assert a0 == p0.choose_admit([None] * 4, rev, 4)  # dict order does not matter
  assert a0 == sorted(docs, key=lambda d: tiebreak_key(d, 0))[:4]
  assert a0 != docs[:4]  # not the collection order
  assert p1.choose_admit([None] * 4, counts, 4) != a0  # the seed changes the tie order


def test_plan_with_prechosen_admissions_and_errors():
  p = RotationPolicy(2, 0.5, 1)
  counts = {"a": 2, "b": 1, "c": 0, "d": 0}
  ahead = p.choose_admit(["a", "b"], counts, p.num_admit(["a", "b"], 4))
  assert p.plan(["a", "b"], counts, admit=ahead) == p.plan(["a", "b"], counts)
  with pytest.raises(RotationError, match="already resident"):
    p.plan(["a", "b"], counts, admit=["a"])
  with pytest.raises(RotationError, match="more than one slot"):
    p.plan(["a", "a"], counts)
  with pytest.raises(RotationError, match="slot table has 3 entries"):
    p.plan(["a", "b", None], counts)
  with pytest.raises(RotationError, match="counts lack resident documents \\['zz'\\]"):
    p.choose_evict(["zz", "b"], counts, 1)


@settings(max_examples=60, deadline=None)
@given(counts=hs.lists(hs.integers(0, 6), min_size=4, max_size=12),
       slots=hs.integers(1, 4), phi=hs.sampled_from([0.25, 0.5, 1.0]), seed=hs.integers(0, 3))
def test_plan_properties(counts, slots, phi, seed):
  docs = {f"d{i}": c for i, c in enumerate(counts)}
  p = RotationPolicy(slots, phi, 1, seed=seed)
  table = list(docs)[:slots]
  plan = p.plan(table, docs)
  assert plan == p.plan(table, docs)  # deterministic
  assert len(plan) == min(p.num_evict, len(docs) - slots)
  evicted, kept = set(plan.evict), [d for d in table if d not in plan.evict]
  others = [d for d in docs if d not in table and d not in plan.admit]
  for e in evicted:
    assert all(docs[e] >= docs[k] for k in kept)
  for a in plan.admit:
    assert a not in table and all(docs[a] <= docs[o] for o in others)


def test_steps_too_few_to_train_every_document():
  """N=4, B=2, 1 admitted every R=4 steps: the last document arrives after step 8, needs step 9.
  Simulated with the policy itself: the bound is exactly where every document gets a step."""
  with pytest.raises(RotationError, match=r"train.steps=8 is too few.*after step 8; use train.steps >= 9"):
    check_every_document_trained(4, 2, 0.5, 4, 8)
  check_every_document_trained(4, 2, 0.5, 4, 9)
  check_every_document_trained(4, 4, 0.5, 4, 1)  # all resident: no rotation needed
  for n, b, phi, r in ((4, 2, 0.5, 4), (20, 10, 0.2, 25), (7, 3, 0.34, 2)):
    pol = RotationPolicy(b, phi, r, seed=0)
    docs = [f"d{i}" for i in range(n)]
    counts = {d: 0 for d in docs}
    table = docs[:b]
    step, first = 0, None
    while first is None:
      for d in table:
        counts[d] += 1  # one training step for the resident documents
      step += 1
      if all(counts.values()):
        first = step
      elif pol.due(step):
        plan = pol.plan(table, counts)
        table = list(table)
        for slot, d in zip(plan.slots, plan.admit):
          table[slot] = d
    check_every_document_trained(n, b, phi, r, first)
    with pytest.raises(RotationError):
      check_every_document_trained(n, b, phi, r, first - 1)
