"""Tests for cas/data/chunking.py (including hypothesis property tests)."""
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas.data.chunking import chunk_token_ids, sample_chunk


@st.composite
def _case(draw):
  n = draw(st.integers(1, 3000))
  lo = draw(st.integers(1, 300))
  hi = draw(st.integers(lo, 600))
  seed = draw(st.integers(0, 2**31))
  use_numpy = draw(st.booleans())
  return n, lo, hi, (np.random.default_rng(seed) if use_numpy else random.Random(seed))


def _partition_possible(n, lo, hi):
  return any(k * lo <= n <= k * hi for k in range(1, n // lo + 1))


@settings(max_examples=300, deadline=None)
@given(_case())
def test_chunks_within_bounds_inside_and_covering(case):
  n, lo, hi, rng = case
  chunks = chunk_token_ids(list(range(n)), lo, hi, rng)
  if n < lo:
    assert chunks == [(0, n)]  # Short document: used whole.
    return
  assert chunks[0][0] == 0 and chunks[-1][1] == n
  for (s, e) in chunks:
    assert 0 <= s < e <= n
    assert lo <= e - s <= hi
  for (s0, e0), (s1, e1) in zip(chunks, chunks[1:]):
    assert s0 < s1 <= e0  # Sorted, no gap.
  overlaps = [i for i, (a, b) in enumerate(zip(chunks, chunks[1:])) if b[0] < a[1]]
  if overlaps:
    assert overlaps == [len(chunks) - 2]  # Only the last range may overlap.
  if _partition_possible(n, lo, hi):
    assert not overlaps  # When sizes allow it, the chunks partition the document.
  else:
    assert overlaps


@settings(max_examples=300, deadline=None)
@given(_case())
def test_sample_chunk_within_bounds(case):
  n, lo, hi, rng = case
  s, e = sample_chunk(np.arange(n), lo, hi, rng)
  assert 0 <= s < e <= n
  if n >= lo:
    assert lo <= e - s <= min(hi, n)
  else:
    assert (s, e) == (0, n)


def test_deterministic_and_varied():
  ids = list(range(1000))
  a = chunk_token_ids(ids, 50, 200, random.Random(0))
  b = chunk_token_ids(ids, 50, 200, random.Random(0))
  c = chunk_token_ids(ids, 50, 200, random.Random(1))
  assert a == b and a != c
  assert len({e - s for s, e in a}) > 1  # Random sizes, not a fixed stride.
  rng = np.random.default_rng(0)
  starts = [sample_chunk(ids, 100, 100, rng)[0] for _ in range(500)]
  assert min(starts) < 50 and max(starts) > 850  # The whole document gets sampled.


def test_infeasible_partition_overlaps_last():
  chunks = chunk_token_ids(list(range(15)), 10, 12, random.Random(0))
  assert chunks[0][0] == 0 and chunks[-1] == (5, 15)


@pytest.mark.parametrize("seed", range(20))
def test_narrow_bounds_still_partition(seed):
  # 42 = 10 + 10 + 11 + 11: a greedy draw could strand a 9-token remainder; ours never does.
  chunks = chunk_token_ids(list(range(42)), 10, 11, random.Random(seed))
  assert sum(e - s for s, e in chunks) == 42 and len(chunks) == 4


def test_errors():
  with pytest.raises(ValueError, match="empty document"):
    chunk_token_ids([], 1, 2, random.Random(0))
  with pytest.raises(ValueError, match="empty document"):
    sample_chunk([], 1, 2, random.Random(0))
  with pytest.raises(ValueError, match="min_size <= max_size"):
    chunk_token_ids([1, 2], 3, 2, random.Random(0))
  with pytest.raises(ValueError, match="min_size <= max_size"):
    sample_chunk([1, 2], 0, 2, random.Random(0))
  with pytest.raises(TypeError, match="rng must be"):
    sample_chunk(list(range(10)), 2, 3, rng=0)
