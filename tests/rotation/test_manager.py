"""SlotManager: bit-identical evict/reload, a simulated CAS run, prefetch, write-behind,
sharding kept on an 8-device mesh, memory ∝ B, checkpoint/resume with store snapshots."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.rotation.manager import STATE_KEYS, SlotError, SlotManager, resident_bytes
from cas.rotation.policy import RotationPolicy
from cas.rotation.store import ARRAY_NAMES, CartridgeStore
from cas.sharding import make_mesh
from tests.rotation.conftest import FP, SPEC, assert_bit_identical, rand_arrays

SHAPE = SPEC.trainable_shape  # (2, 3, 2, 4)


def init_fn_factory(calls=None):
  """k = 1000*i, v = -1000*i for document 'd<i>' (moments left to the manager: zeros)."""
  lock = threading.Lock()

  def init_fn(doc_id):
    if calls is not None:
      with lock:
        calls.append(doc_id)
    i = int(doc_id[1:])
    return {"k": np.full(SHAPE, 1000.0 * i, np.float32), "v": jnp.full(SHAPE, -1000.0 * i, jnp.float32)}
  return init_fn


@jax.jit
def fake_train(state, occupied):
  """One 'train step' on occupied slots: the j-th array of ARRAY_NAMES += j+1, count += 1."""
  m = occupied.astype(jnp.float32)[:, None, None, None, None]
  out = {n: state[n] + (i + 1) * m for i, n in enumerate(ARRAY_NAMES)}
  out["count"] = state["count"] + occupied.astype(jnp.int32)
  return out


def occupied(mgr):
  return jnp.asarray([d is not None for d in mgr.table])


def slot_arrays(state, slot):
  return {n: np.asarray(state[n][slot]) for n in ARRAY_NAMES}, int(state["count"][slot])


@pytest.mark.parametrize("write_behind", [True, False])
def test_evict_then_reload_is_bit_identical(tmp_path, write_behind):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    arrs = rand_arrays(7, special=True)
    st.put("x", arrs, 5)
    mgr = SlotManager(st, 4, init_fn_factory(), write_behind=write_behind)
    state = mgr.init_state()
    state = mgr.rotate(state, [2], ["x"])
    got, c = slot_arrays(state, 2)
    assert c == 5 and mgr.resident() == {"x": 2}
    assert_bit_identical(got, arrs)
    state = mgr.rotate(state, [2], [None])  # evict to the store, slot left empty
    mgr.wait()
    assert mgr.resident() == {} and int(state["count"][2]) == 0
    stored, c = st.get("x")
    assert c == 5
    assert_bit_identical(stored, arrs)
    state = mgr.rotate(state, [0], ["x"])  # back into another slot
    got, c = slot_arrays(state, 0)
    assert c == 5
    assert_bit_identical(got, arrs)
    mgr.close()


def test_simulated_run_n10_b4_30_rounds(tmp_path):
  docs = [f"d{i}" for i in range(10)]
  calls = []
  policy = RotationPolicy(num_slots=4, evict_fraction=0.5, every=1, seed=0)
  policy.validate(num_docs=len(docs), k_max=3)
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    st.register(docs)
    mgr = SlotManager(st, 4, init_fn_factory(calls))
    state = mgr.init_state()
    state, plan = mgr.rotate_with_policy(state, policy)  # fill the empty slots
    assert plan.evict == (None,) * 4 and len(mgr.resident()) == 4
    rounds = 30
    for _ in range(rounds):
      state = fake_train(state, occupied(mgr))
      before = mgr.counts(state)
      table = list(mgr.table)
      state, plan = mgr.rotate_with_policy(state, policy)
      assert len(plan) == 2
      nonresident = [d for d in docs if d not in table]
      rest = [d for d in nonresident if d not in plan.admit]
      kept = [d for d in table if d not in plan.evict]
      assert all(before[a] <= before[r] for a in plan.admit for r in rest)  # least-trained in
      assert all(before[e] >= before[k] for e in plan.evict for k in kept)  # most-trained out
      assert sorted(mgr.resident()) == sorted(kept + list(plan.admit))
    mgr.flush(state)
    counts = st.counts()
    assert all(st.has(d) for d in docs)
    assert sum(counts.values()) == rounds * 4  # every slot-step is accounted for exactly once
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    assert sorted(calls) == docs  # init_fn ran once per document, only for never-seen ones
    for d in docs:
      arrs, c = st.get(d)
      i = int(d[1:])
      base = {"k": 1000.0 * i, "v": -1000.0 * i}  # no document mixed up with another
      for j, n in enumerate(ARRAY_NAMES):  # moments moved together with their params
        np.testing.assert_array_equal(arrs[n], base.get(n, 0.0) + (j + 1.0) * c, err_msg=f"{d} {n}")
    mgr.close()


def test_prefetch_matches_synchronous_get(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    for i in range(3):
      st.put(f"d{i}", rand_arrays(i, special=True), i + 1)
    mgr = SlotManager(st, 4, init_fn_factory())
    mgr.prefetch(["d0", "d1", "d5"])  # d5 was never stored: comes from init_fn
    for d in ("d0", "d1"):
      arrs, c = mgr._prefetched[d].result(timeout=30)
      ref, rc = st.get(d)
      assert c == rc
      assert_bit_identical(arrs, ref)
    arrs, c = mgr._prefetched["d5"].result(timeout=30)
    assert c == 0 and np.all(arrs["k"] == 5000.0) and np.all(arrs["mu_k"] == 0.0)
    s1 = mgr.rotate(mgr.init_state(), [0, 1, 3], ["d0", "d1", "d5"])  # uses the prefetched loads
    assert mgr._prefetched == {}
    mgr2 = SlotManager(st, 4, init_fn_factory())
    s2 = mgr2.rotate(mgr2.init_state(), [0, 1, 3], ["d0", "d1", "d5"])  # synchronous loads
    assert_bit_identical({n: np.asarray(s1[n]) for n in STATE_KEYS},
                         {n: np.asarray(s2[n]) for n in STATE_KEYS})
    with pytest.raises(SlotError, match="'d0' is already resident in slot 0"):
      mgr.prefetch(["d0"])
    mgr.close()
    mgr2.close()


def test_write_behind_serves_pending_writes(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    st.put("d1", rand_arrays(1), 1)
    mgr = SlotManager(st, 2, init_fn_factory())
    state = mgr.rotate(mgr.init_state(), [0], ["d1"])
    state = fake_train(state, occupied(mgr))
    trained, _ = slot_arrays(state, 0)
    gate = threading.Event()
    mgr._writer.submit(gate.wait)  # hold the writer thread: the eviction stays pending
    state = mgr.rotate(state, [0], [None])
    assert st.count("d1") == 1 and mgr.counts(state)["d1"] == 2  # pending count is visible
    state = mgr.rotate(state, [1], ["d1"])  # re-admitted before it reached the disk
    got, c = slot_arrays(state, 1)
    assert c == 2
    assert_bit_identical(got, trained)
    gate.set()
    mgr.wait()
    assert st.count("d1") == 2
    assert_bit_identical(st.get("d1")[0], trained)
    mgr.close()


def test_sharded_state_keeps_sharding_and_memory_scales_with_b(tmp_path):
  mesh = make_mesh({"data": -1})
  assert mesh.shape["data"] == 8
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    docs = [f"d{i}" for i in range(20)]
    st.register(docs)
    mgr = SlotManager(st, 8, init_fn_factory(), mesh=mesh)
    state = mgr.init_state()
    assert state["k"].sharding.spec[0] == "data" and state["count"].sharding.spec[0] == "data"
    want = {n: state[n].sharding for n in STATE_KEYS}
    policy = RotationPolicy(8, 0.25, 1)
    state, _ = mgr.rotate_with_policy(state, policy)
    for _ in range(2):
      state = fake_train(state, occupied(mgr))
      state = jax.device_put(state, want)
      state, plan = mgr.rotate_with_policy(state, policy)
      assert len(plan) == 2
      for n in STATE_KEYS:
        assert state[n].sharding == want[n], (n, state[n].sharding)
        assert {s.data.shape[0] for s in state[n].addressable_shards} == {1}  # one slot per device
    per_slot = 6 * int(np.prod(SHAPE)) * 4 + 4
    assert resident_bytes(state) == 8 * per_slot
    assert resident_bytes(state, per_device=True) == per_slot
    mgr.close()
  # memory is B slots whatever N is
  with CartridgeStore(str(tmp_path / "t"), spec=SPEC, model_fingerprint=FP) as st:
    st.register([f"d{i}" for i in range(500)])
    small = SlotManager(st, 4, init_fn_factory())
    assert resident_bytes(small.init_state()) == 4 * per_slot
    small.close()


def test_rotate_errors_and_table_json(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    mgr = SlotManager(st, 3, init_fn_factory())
    state = mgr.rotate(mgr.init_state(), [0, 2], ["d1", "d2"])
    with pytest.raises(SlotError, match="already resident"):
      mgr.rotate(state, [1], ["d1"])
    with pytest.raises(SlotError, match="2 slots but 1 documents"):
      mgr.rotate(state, [1, 0], ["d3"])
    with pytest.raises(SlotError, match="must be distinct and in \\[0, 3\\)"):
      mgr.rotate(state, [1, 1], ["d3", "d4"])
    with pytest.raises(SlotError, match="must be distinct and in \\[0, 3\\)"):
      mgr.rotate(state, [3], ["d3"])
    with pytest.raises(SlotError, match="slot state must have keys"):
      mgr.rotate({"k": state["k"]}, [1], ["d3"])
    saved = mgr.table_to_json()
    assert saved == {"num_slots": 3, "slots": ["d1", None, "d2"]}
    other = SlotManager(st, 3, init_fn_factory())
    other.load_table_json(saved)
    assert other.resident() == {"d1": 0, "d2": 2}
    with pytest.raises(SlotError, match="has 3 slots .* this run has num_slots B=4"):
      SlotManager(st, 4, init_fn_factory()).load_table_json(saved)
    with pytest.raises(SlotError, match="init_fn\\('d9'\\) returned k of shape"):
      bad = SlotManager(st, 3, lambda d: {"k": np.zeros((1,)), "v": np.zeros((1,))})
      bad.rotate(bad.init_state(), [0], ["d9"])
    for m in (mgr, other):
      m.close()


def _run(mgr, state, policy, rounds):
  for _ in range(rounds):
    state = fake_train(state, occupied(mgr))
    state, _ = mgr.rotate_with_policy(state, policy)
  return state


def test_resume_from_checkpoint_with_store_rollback_reproduces_run(tmp_path):
  docs = [f"d{i}" for i in range(7)]
  policy = RotationPolicy(3, 0.34, 1)

  def final_store(st):
    return {d: st.get(d) for d in docs}

  # Run A: 10 rounds without interruption.
  with CartridgeStore(str(tmp_path / "a"), spec=SPEC, model_fingerprint=FP) as st:
    st.register(docs)
    mgr = SlotManager(st, 3, init_fn_factory())
    state, _ = mgr.rotate_with_policy(mgr.init_state(), policy)
    state = _run(mgr, state, policy, 10)
    mgr.flush(state)
    mgr.close()
    ref = final_store(st)
  # Run B: checkpoint after 6 rounds, train 3 more (their evictions reach the store), get killed.
  root = str(tmp_path / "b")
  st = CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  st.register(docs)
  mgr = SlotManager(st, 3, init_fn_factory())
  state, _ = mgr.rotate_with_policy(mgr.init_state(), policy)
  state = _run(mgr, state, policy, 6)
  mgr.flush(state, tag=6)
  ckpt = (jax.device_get(state), mgr.table_to_json())
  state = _run(mgr, state, policy, 3)
  mgr.close()
  st.close()
  # Resume from the checkpoint: the store goes back to snapshot 6, then 4 more rounds.
  st = CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  st.rollback(6)
  mgr = SlotManager(st, 3, init_fn_factory())
  mgr.load_table_json(ckpt[1])
  state = jax.tree.map(jnp.asarray, ckpt[0])
  state = _run(mgr, state, policy, 4)
  mgr.flush(state)
  mgr.close()
  got = final_store(st)
  st.close()
  for d in docs:
    assert got[d][1] == ref[d][1], d
    assert_bit_identical(got[d][0], ref[d][0])
