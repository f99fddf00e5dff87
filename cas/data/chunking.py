"""Token-range chunking of a document for self-study (tokenizer-agnostic: works on id lists).

`chunk_token_ids` covers a document with random contiguous ranges whose sizes lie in
[min_size, max_size]; `sample_chunk` draws one such range for a self-study sample. Both return
half-open (start, end) index pairs: the chunk is `ids[start:end]`.

Short documents: a document with fewer than `min_size` tokens cannot hold a chunk of the
minimum size, so it is used whole: one range (0, len(ids)). Empty documents are an error.

`rng` is a `random.Random` or a `numpy.random.Generator`.
"""
from __future__ import annotations

import random
from typing import Sequence, Union

import numpy as np

Rng = Union[random.Random, np.random.Generator]


def _randint(rng: Rng, lo: int, hi: int) -> int:
  """Uniform integer in [lo, hi] (inclusive)."""
  if isinstance(rng, np.random.Generator):
    return int(rng.integers(lo, hi + 1))
  if isinstance(rng, random.Random):
    return rng.randint(lo, hi)
  raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _check(ids: Sequence[int], min_size: int, max_size: int) -> int:
  if not 1 <= min_size <= max_size:
    raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, "
                     f"max_size={max_size}")
  n = len(ids)
  if n == 0:
    raise ValueError("cannot chunk an empty document (0 token ids)")
  return n


def _splittable(r: int, min_size: int, max_size: int) -> bool:
  """Whether r tokens split exactly into chunks with sizes in [min_size, max_size]."""
  return r == 0 or -(-r // max_size) <= r // min_size


def chunk_token_ids(ids: Sequence[int], min_size: int, max_size: int,
                    rng: Rng) -> list[tuple[int, int]]:
  """Random contiguous ranges covering `ids`, each of size in [min_size, max_size].

  Args:
    ids: the document's token ids, [N] (any sequence; only its length is used).
    min_size, max_size: chunk size bounds, 1 <= min_size <= max_size.
    rng: random.Random or numpy.random.Generator.

  Returns:
    (start, end) pairs sorted by start, with 0 <= start < end <= N, whose union is [0, N).
    Whenever N can be split exactly into sizes within the bounds, the ranges partition [0, N)
    (each size is drawn uniformly among the sizes that keep the rest splittable); when it cannot
    (e.g. N=15 with sizes in [10, 12]) the last range overlaps its predecessor. If N < min_size
    the single range (0, N) is returned (the whole short document).
  """
  n = _check(ids, min_size, max_size)
  if n <= max_size:
    return [(0, n)]  # Whole document: either it fits one chunk, or it is shorter than min_size.
  out = []
  pos = 0
  while pos < n:
    rem = n - pos
    if min_size <= rem <= max_size:
      out.append((pos, n))
      break
    if rem < min_size:
      # No exact split exists: end with a minimum-size range overlapping the previous one.
      out.append((n - min_size, n))
      break
    # rem > max_size: draw a size that leaves a splittable remainder, if there is one.
    if max_size >= 2 * min_size - 1:
      # Every remainder >= min_size is splittable: the valid sizes form one interval.
      hi = rem - min_size
      size = _randint(rng, min_size, min(max_size, hi)) if hi >= min_size else None
    else:
      sizes = [s for s in range(min_size, max_size + 1)
               if _splittable(rem - s, min_size, max_size)]
      size = sizes[_randint(rng, 0, len(sizes) - 1)] if sizes else None
    if size is None:
      size = _randint(rng, min_size, max_size)
    out.append((pos, pos + size))
    pos += size
  return out


def sample_chunk(ids: Sequence[int], min_size: int, max_size: int, rng: Rng) -> tuple[int, int]:
  """One random range of `ids` for a self-study sample: the chunk is `ids[start:end]`.

  The size is uniform in [min_size, min(max_size, N)] and the start uniform over the valid
  positions. A document shorter than min_size is returned whole: (0, N). Empty -> ValueError.
  """
  n = _check(ids, min_size, max_size)
  if n < min_size:
    return (0, n)
  size = _randint(rng, min_size, min(max_size, n))
  start = _randint(rng, 0, n - size)
  return (start, start + size)
