"""CAS batches: distractor mixing statistics, row layout and positions, and the resident sampler
(only resident documents, balanced, resumable from its JSON state)."""
import collections
import json

import numpy as np
import pytest

from cas.synth.format import Conversation
from cas.train.batch import (ResidentSampler, build_cas_batch, draw_slots, question_offset)


def _conv(doc_id: str, tp: int, ta: int, k: int = 4, seed: int = 0) -> Conversation:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 50, (ta, k)).astype(np.int32)
  lp = np.log(np.full((ta, k), 1.0 / k, np.float32))
  return Conversation(doc_id, rng.integers(2, 50, tp).astype(np.int32),
                      rng.integers(2, 50, ta).astype(np.int32), ids, lp)


def test_distractor_mixing_statistics():
  rng = np.random.default_rng(0)
  resident = list(range(3, 13))  # 10 resident slots
  k_max, p_iso, n = 4, 0.3, 6000
  iso, ks, own_pos = 0, collections.Counter(), collections.Counter()
  for i in range(n):
    own = resident[i % len(resident)]
    s = draw_slots(own, resident, k_max=k_max, p_isolated=p_iso, rng=rng)
    assert s.shape == (k_max,) and s.dtype == np.int32
    used = s[s >= 0]
    assert (s[len(used):] == -1).all()  # empty entries only at the end
    assert own in used  # own cartridge always present
    assert len(set(used.tolist())) == len(used)  # no duplicates
    assert set(used.tolist()) <= set(resident)  # only resident slots
    if len(used) == 1:
      iso += 1
    else:
      ks[len(used) - 1] += 1
      own_pos[int(np.flatnonzero(used == own)[0])] += 1
  # isolated fraction ~ p_isolated (std ~0.006)
  assert abs(iso / n - p_iso) < 0.03
  # k ~ U{1, .., k_max-1} among mixed rows
  mixed = n - iso
  assert set(ks) == {1, 2, 3}
  for k in (1, 2, 3):
    assert abs(ks[k] / mixed - 1 / 3) < 0.03
  # own cartridge position shuffled: it is not always first
  assert own_pos[0] < 0.7 * mixed and own_pos[1] > 0.15 * mixed


def test_mixing_edge_cases():
  rng = np.random.default_rng(1)
  # k_max = 1: always isolated
  for _ in range(50):
    assert draw_slots(5, [5, 6, 7], k_max=1, p_isolated=0.0, rng=rng).tolist() == [5]
  # few resident: at most the others
  for _ in range(100):
    s = draw_slots(2, [2, 9], k_max=4, p_isolated=0.0, rng=rng)
    assert sorted(s[s >= 0].tolist()) == [2, 9] and (s[2:] == -1).all()
  # alone: isolated whatever p_isolated says
  assert draw_slots(4, [4], k_max=3, p_isolated=0.0, rng=rng).tolist() == [4, -1, -1]
  # p_isolated = 1: never distractors
  for _ in range(50):
    assert (draw_slots(1, range(8), k_max=4, p_isolated=1.0, rng=rng)[1:] == -1).all()


def test_batch_layout_positions_and_determinism():
  P, F, T, K = 8, 1, 20, 4
  convs = [_conv("a", 5, 6, seed=1), _conv("b", 4, 30, seed=2)]  # second one is truncated
  kw = dict(k_max=3, p_isolated=0.0, seq_len=T, top_k=K, p=P, num_frozen=F)
  b1 = build_cas_batch([(convs[0], 0), (convs[1], 1)], [0, 1, 2], rng=np.random.default_rng(7),
                       position_mode="sequential", batch_size=3, **kw)
  b2 = build_cas_batch([(convs[0], 0), (convs[1], 1)], [2, 1, 0], rng=np.random.default_rng(7),
                       position_mode="sequential", batch_size=3, **kw)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])  # deterministic, resident order irrelevant
  assert b1["tokens"].shape == (3, T) and b1["topk_ids"].shape == (3, T, K)
  assert b1["slots"].shape == (3, 3) and b1["slots"].dtype == np.int32
  assert b1["own_slot"].tolist() == [0, 1, -1]
  # row 0: one conversation, positions after F + n*(P-F) in sequential mode
  n0 = int(b1["n_loaded"][0])
  assert n0 >= 2  # p_isolated = 0 and 3 resident: at least one distractor
  seq0 = np.concatenate([convs[0].prompt_ids, convs[0].answer_ids])
  np.testing.assert_array_equal(b1["tokens"][0, :len(seq0)], seq0)
  np.testing.assert_array_equal(b1["positions"][0, :len(seq0)], F + n0 * (P - F) + np.arange(len(seq0)))
  assert (b1["segment_ids"][0, :len(seq0)] == 1).all() and (b1["segment_ids"][0, len(seq0):] == 0).all()
  assert b1["loss_mask"][0].sum() == 6 and b1["loss_mask"][0, 4] == 1  # first answer predicted at Tp-1
  # row 1: truncated to T, loss only on the answer tokens that fit
  assert (b1["segment_ids"][1] == 1).all() and b1["loss_mask"][1].sum() == T - 4
  # padding row: nothing visible, nothing trained
  assert (b1["slots"][2] == -1).all() and b1["loss_mask"][2].sum() == 0 and (b1["segment_ids"][2] == 0).all()
  # shared mode: question at P whatever is loaded
  bs = build_cas_batch([(convs[0], 0)], [0, 1, 2], rng=np.random.default_rng(7), position_mode="shared", **kw)
  assert bs["positions"][0, 0] == P
  assert question_offset(3, p=P, num_frozen=F, position_mode="sequential") == 1 + 3 * 7
  assert question_offset(1, p=P, num_frozen=F, position_mode="sequential") == P
  with pytest.raises(ValueError, match="not among the resident"):
    build_cas_batch([(convs[0], 5)], [0, 1], rng=np.random.default_rng(0), **kw)
  with pytest.raises(ValueError, match="position_mode"):
    build_cas_batch([(convs[0], 0)], [0], rng=np.random.default_rng(0), position_mode="bogus", **kw)


def test_resident_sampler_only_resident_balanced_and_resumable():
  index = {f"d{i}": list(range(100 * i, 100 * i + 3 + i)) for i in range(6)}
  resident = {"d0": 0, "d2": 1, "d3": 2, "d5": 3}
  s = ResidentSampler(index, seed=3)
  draws = s.sample(resident, 40)
  docs = collections.Counter(d for d, _, _ in draws)
  assert set(docs) == set(resident)  # only resident documents
  assert set(docs.values()) == {10}  # balanced: one row per document per pass
  for d, item, slot in draws:
    assert item in index[d] and slot == resident[d]
  # each document cycles through all of its conversations before repeating
  d3 = [item for d, item, _ in draws if d == "d3"]
  assert sorted(d3[:6]) == index["d3"]

  # resume: a sampler restored from the JSON state continues identically
  a = ResidentSampler(index, seed=3)
  a.sample(resident, 7)
  st = json.loads(json.dumps(a.state_dict()))
  b = ResidentSampler(lambda d: index[d], seed=3, state=st)
  new_res = {"d1": 0, "d2": 1, "d4": 2, "d5": 3}  # rotation: d0, d3 evicted; d1, d4 admitted
  ra, rb = a.sample(new_res, 25), b.sample(new_res, 25)
  assert ra == rb
  assert {d for d, _, _ in ra} == set(new_res)  # evicted documents never drawn again

  # next_batch: deterministic end to end, rows of resident documents only
  convs = {f"d{i}": [_conv(f"d{i}", 3, 4, seed=10 * i + j) for j in range(3)] for i in range(6)}
  kw = dict(k_max=3, p_isolated=0.5, seq_len=12, top_k=4, p=6, num_frozen=1)
  x = ResidentSampler(convs, seed=0)
  y = ResidentSampler(convs, seed=0)
  bx0, by0 = x.next_batch(resident, 4, **kw), y.next_batch(resident, 4, **kw)
  y2 = ResidentSampler(convs, seed=0, state=json.loads(json.dumps(y.state_dict())))
  bx1, by1 = x.next_batch(resident, 4, **kw), y2.next_batch(resident, 4, **kw)
  for k in bx0:
    np.testing.assert_array_equal(bx0[k], by0[k])
    np.testing.assert_array_equal(bx1[k], by1[k])
  assert set(bx0["own_slot"].tolist()) == set(resident.values())
  assert set(bx1["slots"][bx1["slots"] >= 0].tolist()) <= set(resident.values())
  with pytest.raises(KeyError, match="no conversations known"):
    ResidentSampler(index, seed=0).sample({"zz": 0}, 1)


def test_resident_sampler_length_weights():
  """weights: a document gets weights[d] rows per pass (e.g. by length); unweighted draws are the
  same as before weights existed (same permutation of the same list); state resumes exactly."""
  from cas.train.loop import length_weights
  index = {f"d{i}": list(range(10 * i, 10 * i + 5)) for i in range(4)}
  resident = {"d0": 0, "d1": 1, "d2": 2, "d3": 3}
  w = length_weights({"d0": 100, "d1": 300, "d2": 90, "d3": 5000})
  assert w == {"d0": 1, "d1": 2, "d2": 1, "d3": 8}  # round(len / median 200), clipped to [1, 8]
  s = ResidentSampler(index, seed=1, weights=w)
  draws = s.sample(resident, 12 * 5)
  assert collections.Counter(d for d, _, _ in draws) == {"d0": 5, "d1": 10, "d2": 5, "d3": 40}
  plain, ones = ResidentSampler(index, seed=1), ResidentSampler(index, seed=1, weights={d: 1 for d in index})
  assert plain.sample(resident, 9) == ones.sample(resident, 9)
  a = ResidentSampler(index, seed=1, weights=w)
  a.sample(resident, 5)
  b = ResidentSampler(index, seed=1, weights=w, state=json.loads(json.dumps(a.state_dict())))
  assert a.sample(resident, 17) == b.sample(resident, 17)
  with pytest.raises(ValueError, match="weights must be >= 1"):
    ResidentSampler(index, seed=1, weights={"d0": 0})


def test_hard_negatives_and_k_curriculum():
  """p_hard = 1: a mixed row's distractors are the first k of its hard list (the most similar
  resident documents); p_hard = 0 and k_limit = k_max draw exactly as without them; k_limit
  caps the cartridges a row loads; the curriculum grows from 2 to k_max."""
  from cas.train.loop import k_limit
  resident = [0, 1, 2, 3, 4, 5, 6, 7]
  for seed in range(30):
    a = draw_slots(3, resident, k_max=5, p_isolated=0.2, rng=np.random.default_rng(seed))
    b = draw_slots(3, resident, k_max=5, p_isolated=0.2, rng=np.random.default_rng(seed), k_limit=5,
                   hard_slots=[7, 6], p_hard=0.0)
    np.testing.assert_array_equal(a, b)
    h = draw_slots(3, resident, k_max=5, p_isolated=0.0, rng=np.random.default_rng(seed), hard_slots=[7, 6, 5, 9],
                   p_hard=1.0)
    used = [int(x) for x in h if x >= 0]
    k = len(used) - 1
    assert 3 in used and 1 <= k <= 4
    want = {7, 6, 5}
    if k <= 3:
      assert set(used) - {3} == set([7, 6, 5][:k])  # the most similar first (9 is not resident)
    else:
      assert want < set(used)  # all hard ones, one uniform filler
    c = draw_slots(3, resident, k_max=5, p_isolated=0.0, rng=np.random.default_rng(seed), k_limit=2)
    assert (c >= 0).sum() == 2 and c.shape == (5,)
  assert [k_limit(s, 10, 100) for s in (1, 12, 50, 100, 500)] == [2, 3, 6, 10, 10]
  assert k_limit(1, 10, 0) == 10 and k_limit(5, 1, 100) == 1

  # through the sampler: neighbors by doc id, mapped to the resident slots of this step
  index = {f"d{i}": [i] for i in range(6)}
  convs = {d: [_conv(d, 3, 4, seed=i)] for i, d in enumerate(index)}
  s = ResidentSampler(convs, seed=0, neighbors={d: [f"d{(int(d[1:]) + j) % 6}" for j in (1, 2, 3)] for d in index})
  res = {"d0": 0, "d1": 1, "d2": 2, "d4": 3}
  kw = dict(k_max=3, p_isolated=0.0, seq_len=12, top_k=4, p=6, num_frozen=1, p_hard=1.0)
  b = s.next_batch(res, 8, **kw)
  slot_doc = {v: k for k, v in res.items()}
  for row, own in zip(b["slots"], b["own_slot"]):
    d = slot_doc[int(own)]
    hard = [n for n in s.neighbors[d] if n in res]
    got = [slot_doc[int(x)] for x in row if x >= 0 and int(x) != int(own)]
    assert got and set(got) <= set(hard[:len(got)]) | set(res), (d, got)
    assert set(got) == set(hard[:len(got)]) if len(got) <= len(hard) else True


def test_mixed_weight_scales_the_loss_mask_of_mixed_rows():
  convs = [(_conv(f"d{i}", 3, 4, seed=i), i) for i in range(6)]
  kw = dict(k_max=3, p_isolated=0.5, seq_len=12, top_k=4, p=6, num_frozen=1)
  a = build_cas_batch(convs, list(range(6)), rng=np.random.default_rng(4), **kw)
  b = build_cas_batch(convs, list(range(6)), rng=np.random.default_rng(4), mixed_weight=0.25, **kw)
  mixed = a["n_loaded"] > 1
  assert mixed.any() and (~mixed).any()
  np.testing.assert_array_equal(b["slots"], a["slots"])
  np.testing.assert_allclose(b["loss_mask"][mixed], 0.25 * a["loss_mask"][mixed])
  np.testing.assert_array_equal(b["loss_mask"][~mixed], a["loss_mask"][~mixed])


def test_packed_rows_hold_several_conversations_of_one_document_and_resume_exactly():
  """pack=True (one cartridge, k_max = 1): a row holds the document's next conversations while they
  fit in seq_len, in the document's own order, each its own segment at the question offset; the
  same draws as unpacked, only grouped; a saved state resumes the same rows."""
  from cas.synth.format import Conversation
  rng = np.random.default_rng(0)

  def conv(i, n):
    return Conversation(doc_id="d", prompt_ids=rng.integers(2, 50, 3).astype(np.int32),
                        answer_ids=rng.integers(2, 50, n - 3).astype(np.int32),
                        topk_ids=np.zeros((n - 3, 2), np.int32), topk_logprobs=np.zeros((n - 3, 2), np.float32))
  convs = [conv(i, n) for i, n in enumerate([10, 6, 12, 5, 9, 7, 8, 11])]
  kw = dict(k_max=1, p_isolated=1.0, seq_len=24, top_k=2, p=8)
  s = ResidentSampler({"d": convs}, seed=3)
  b = s.next_batch({"d": 0}, 2, pack=True, **kw)
  seg = b["segment_ids"]
  assert seg.max() >= 2  # several conversations in a row
  for r in range(2):
    used = int((seg[r] > 0).sum())
    assert used <= 24
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[r]])) > 0)
    assert (b["positions"][r, starts] == 8).all()  # every conversation starts at p
  # the same conversations, in the same order, as unpacked draws
  flat = ResidentSampler({"d": convs}, seed=3).sample({"d": 0}, int(seg.max(axis=1).sum()))
  lens = [int(x.num_tokens) for _, x, _ in flat]
  got = [int((seg[r] == k).sum()) for r in range(2) for k in range(1, int(seg[r].max()) + 1)]
  assert got == lens
  state = s.state_dict()
  nxt = s.next_batch({"d": 0}, 2, pack=True, **kw)
  s2 = ResidentSampler({"d": convs}, seed=3, state=state)
  again = s2.next_batch({"d": 0}, 2, pack=True, **kw)
  for k in nxt:
    np.testing.assert_array_equal(nxt[k], again[k])
  with pytest.raises(ValueError, match="pack=True needs k_max = 1"):
    s.next_batch({"d": 0}, 2, pack=True, **{**kw, "k_max": 2})


def test_silent_rows_drop_their_own_cartridge_and_p_silent_zero_draws_as_before():
  convs = [(_conv(f"d{i}", 5, 6, seed=i), s) for i, s in enumerate([3, 4, 5, 6] * 8)]
  kw = dict(k_max=3, p_isolated=0.25, seq_len=24, top_k=4, p=8, num_frozen=1)
  base = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), **kw)
  zero = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_silent=0.0, **kw)
  assert "silent" not in zero and all(np.array_equal(base[k], zero[k]) for k in base)
  every = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_silent=1.0, **kw)
  silent = every["silent"] > 0
  assert silent.any() and (~silent).any()  # isolated rows (p_isolated) stay as they are
  for r in range(len(convs)):
    used = [int(s) for s in every["slots"][r] if s >= 0]
    assert list(every["slots"][r][:len(used)]) == used  # used entries first
    if silent[r]:  # every mixed row: its distractors only
      assert every["own_slot"][r] not in used and len(used) >= 1 and every["n_loaded"][r] == len(used)
    else:
      assert used == [every["own_slot"][r]]
  weighted = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_silent=1.0, mixed_weight=2.0, **kw)
  np.testing.assert_array_equal(weighted["loss_mask"], every["loss_mask"] * np.where(silent, 2.0, 1.0)[:, None])
  with pytest.raises(ValueError, match="p_silent"):
    build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_silent=1.5, **kw)


def test_own_last_rows_put_the_own_cartridge_next_to_the_question_and_zero_draws_as_before():
  """p_own_last: a mixed row loads its own cartridge last (sequential positions: the slot nearest the question,
  the distance it has when read alone), its distractors as drawn; isolated rows stay as they are; 0 is the old draw."""
  convs = [(_conv(f"d{i}", 5, 6, seed=i), s) for i, s in enumerate([3, 4, 5, 6] * 8)]
  kw = dict(k_max=4, p_isolated=0.25, seq_len=24, top_k=4, p=8, num_frozen=1, position_mode="sequential")
  base = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), **kw)
  zero = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_own_last=0.0, **kw)
  assert all(np.array_equal(base[k], zero[k]) for k in base)

  def last_is_own(b):
    return [int(b["slots"][r][b["n_loaded"][r] - 1]) == int(b["own_slot"][r]) for r in range(len(convs))]
  mixed = base["n_loaded"] > 1
  assert not all(np.asarray(last_is_own(base))[mixed])  # a random slot: not always last
  every = build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_own_last=1.0, **kw)
  assert all(last_is_own(every)) and (every["n_loaded"] > 1).any() and (every["n_loaded"] == 1).any()
  for r in range(len(convs)):
    used = [int(s) for s in every["slots"][r] if s >= 0]
    assert list(every["slots"][r][:len(used)]) == used and len(set(used)) == len(used)  # used first, distinct
  with pytest.raises(ValueError, match="p_own_last"):
    build_cas_batch(convs, [3, 4, 5, 6], rng=np.random.default_rng(7), p_own_last=-0.1, **kw)
