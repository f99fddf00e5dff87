"""CAS loop: B < N slots rotating through the store; every document trained and stored; memory
proportional to B; exact resume after an interruption."""
import json
import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
from cas.metrics import read_metrics
from cas.rotation.policy import RotationError
from cas.testing import TINY, cas_dataset, tiny_model
from cas.train.loop import train_cas

N, PER_DOC, P = 6, 4, 6
CFG = dict(steps=12, batch_size=3, seq_len=32, lr=5e-2, warmup_steps=2, clip_norm=1.0, loss="distill", seed=0,
           num_slots=3, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.34, position_mode="shared",
           top_k=8, log_every=4, ckpt_every=4, keep_checkpoints=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  m = tiny_model()
  path = str(tmp_path_factory.mktemp("cas_data"))
  docs = cas_dataset(path, m, num_docs=N, per_doc=PER_DOC)
  sink = init_cartridge(m, [1] + list(docs["doc0"]), P)
  frozen = (sink.frozen_k[...], sink.frozen_v[...])

  def init_fn(doc_id):
    c = init_cartridge(m, list(docs[doc_id]), P, sink_ids=[1])
    return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}

  return m, docs, path, frozen, init_fn


def _train(setup, workdir, **kw):
  m, docs, path, frozen, init_fn = setup
  spec = CartridgeSpec.for_model(TINY, P, 1)
  return train_cas(model=m, model_fingerprint="tiny", dataset_dir=path, workdir=workdir, doc_ids=list(docs),
                   spec=spec, frozen=frozen, init_fn=init_fn, cfg={**CFG, **kw.pop("cfg", {})}, **kw)


def test_rotation_trains_every_document_and_memory_follows_b(setup, tmp_path):
  out = _train(setup, str(tmp_path))
  counts = out["counts"]
  assert set(counts) == {f"doc{i}" for i in range(N)} and min(counts.values()) > 0
  from cas.rotation.store import CartridgeStore
  store = CartridgeStore(str(tmp_path / "store"), spec=CartridgeSpec.for_model(TINY, P, 1),
                         model_fingerprint="tiny", read_only=True)
  assert all(store.has(f"doc{i}") for i in range(N))
  assert store.counts() == counts
  per_slot = 6 * TINY.num_layers * (P - 1) * TINY.num_kv_heads * TINY.head_dim * 4 + 4
  assert out["device_slot_bytes"] == CFG["num_slots"] * per_slot  # B slots, not N
  losses = [r["loss"] for r in read_metrics(str(tmp_path / "logs"))]
  assert len(losses) == CFG["steps"] and np.isfinite(losses).all()


def test_interrupted_run_resumes_exactly(setup, tmp_path):
  _train(setup, str(tmp_path / "ref"))
  _train(setup, str(tmp_path / "cut"), stop_after=6)  # "killed" after step 6 (last checkpoint: 4)
  _train(setup, str(tmp_path / "cut"))
  a = [r["loss"] for r in read_metrics(str(tmp_path / "ref" / "logs"))]
  b = [r["loss"] for r in read_metrics(str(tmp_path / "cut" / "logs"))]
  assert a == b


def test_bad_configs(setup, tmp_path):
  with pytest.raises(RotationError):
    _train(setup, str(tmp_path), cfg={"num_slots": N + 1})
  with pytest.raises(RotationError):
    _train(setup, str(tmp_path), cfg={"k_max": 4})


def test_train_distractors_false_updates_only_own_cartridges(setup, tmp_path):
  """train.train_distractors=False reaches the step: with every sample carrying a distractor
  (p_isolated=0), a cartridge's update count only grows when it is a row's own cartridge, so the
  run counts fewer updates than the default run on the same samples; bad values are refused."""
  cfg = {"p_isolated": 0.0, "steps": 6, "batch_size": 1}  # one own cartridge + one distractor per step
  both = _train(setup, str(tmp_path / "both"), cfg=cfg)["counts"]
  own = _train(setup, str(tmp_path / "own"), cfg={**cfg, "train_distractors": False})["counts"]
  assert set(own) == set(both) and all(own[d] <= both[d] for d in both)
  assert sum(own.values()) < sum(both.values())
  with pytest.raises(ValueError, match="train_distractors"):
    _train(setup, str(tmp_path / "bad"), cfg={"train_distractors": "no"})


def test_frozen_head_reaches_the_loop_and_the_store_keeps_each_documents_head(setup, tmp_path):
  """train.frozen_head = 2 through train_cas: every stored cartridge's first 2 trainable tokens are
  its init (the document's opening tokens), the rest trained; a head covering every token is refused."""
  from cas.rotation.store import CartridgeStore
  m, docs, path, frozen, init_fn = setup
  out = _train(setup, str(tmp_path / "head"), cfg={"frozen_head": 2})
  assert min(out["counts"].values()) > 0
  with CartridgeStore(str(tmp_path / "head" / "store"), spec=CartridgeSpec.for_model(TINY, P, 1),
                      model_fingerprint="tiny", read_only=True) as st:
    for d in docs:
      got, init = st.get(d)[0], init_fn(d)
      for n in ("k", "v"):
        assert np.asarray(got[n])[:, :2].tobytes() == init[n][:, :2].tobytes(), (d, n)
        assert not np.allclose(np.asarray(got[n])[:, 2:], init[n][:, 2:]), (d, n)
  with pytest.raises(ValueError, match="frozen_head=5 keeps every trainable token"):
    _train(setup, str(tmp_path / "bad"), cfg={"frozen_head": P - 1})


def _files(root) -> dict:
  """relative path -> (bytes, mtime_ns) of every file under root but the lock files (taken and
  emptied by every run, not cartridge data)."""
  import os
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      if n != ".lock":
        with open(p, "rb") as f:
          out[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
  return out


def _digest(workdir) -> str:
  """What the evaluation's per-method resume keys on (cas.pipeline: store_state)."""
  from cas.rotation.store import CartridgeStore
  with CartridgeStore(str(workdir / "store"), spec=CartridgeSpec.for_model(TINY, P, 1), model_fingerprint="tiny",
                      read_only=True) as st:
    return st.state_digest()


def _same_result(a: dict, b: dict) -> None:
  assert {k: v for k, v in a.items() if k != "state_shardings"} == {k: v for k, v in b.items() if k != "state_shardings"}
  assert set(a["state_shardings"]) == set(b["state_shardings"])
  for n, sh in a["state_shardings"].items():
    assert sh.is_equivalent_to(b["state_shardings"][n], 5), n


def test_rerun_of_a_finished_run_rewrites_nothing(setup, tmp_path, caplog):
  """Running a finished job again restores its last checkpoint and stops there: the store is not
  rolled back or flushed again, so no file of the workdir changes (bytes and mtimes), the store's
  state digest (what evaluation resumes on) stays, and the result equals the finished run's."""
  import logging
  from cas.train.loop import TRAIN_DONE
  first = _train(setup, str(tmp_path))
  assert (tmp_path / TRAIN_DONE).exists()
  # the marker says how the cartridges were trained to be read beside others and the question's prompt
  # format (the server's defaults); this self-study recorded none: chat
  done = json.loads((tmp_path / TRAIN_DONE).read_text())
  assert done["position_mode"] == CFG["position_mode"] and done["prompt_format"] == "chat"
  files, digest = _files(tmp_path), _digest(tmp_path)
  assert any(p.startswith("store/packs/") for p in files)
  with caplog.at_level(logging.INFO):
    again = _train(setup, str(tmp_path))
  assert "training already finished at step 12; nothing to do" in caplog.text
  assert "rolled back" not in caplog.text
  after = _files(tmp_path)
  assert sorted(after) == sorted(files)
  assert [p for p in files if after[p] != files[p]] == []
  assert _digest(tmp_path) == digest
  _same_result(again, first)
  assert np.isfinite(again["final_loss"]) and again["steps"] == CFG["steps"]


def test_run_killed_before_the_end_of_its_final_flush_still_flushes(setup, tmp_path, caplog):
  """A job killed between its last checkpoint and the end of the final flush leaves no done-marker
  (and the store at the last checkpoint's snapshot): a re-run rolls back and flushes as before,
  writes the marker, and the run after that has nothing to do. A marker whose store digest no
  longer matches the store (the store changed since) is not trusted either."""
  import logging
  from cas.rotation.store import CartridgeStore
  from cas.train.loop import TRAIN_DONE
  spec = CartridgeSpec.for_model(TINY, P, 1)
  w = tmp_path / "run"
  ref = _train(setup, str(w))
  with CartridgeStore(str(w / "store"), spec=spec, model_fingerprint="tiny", read_only=True) as st:
    want = {d: st.get(d)[0] for d in st.doc_ids()}

  def kill_before_final_flush(keep_marker: bool):
    """The store as the kill leaves it: as snapshot 12 (the flush of the last checkpoint)."""
    if not keep_marker:
      (w / TRAIN_DONE).unlink()
    with CartridgeStore(str(w / "store"), spec=spec, model_fingerprint="tiny") as st:
      st.rollback(CFG["steps"])
    (w / f".{TRAIN_DONE}.tmp-999").write_text("{")  # a half-written marker of the killed run

  for keep_marker in (False, True):
    kill_before_final_flush(keep_marker)
    killed = _digest(w)
    caplog.clear()
    with caplog.at_level(logging.INFO):
      out = _train(setup, str(w))
    assert "nothing to do" not in caplog.text and "rolled back to snapshot 12" in caplog.text
    assert (w / TRAIN_DONE).exists() and not (w / f".{TRAIN_DONE}.tmp-999").exists()
    assert _digest(w) != killed  # the final flush wrote every resident cartridge again
    _same_result(out, ref)
    with CartridgeStore(str(w / "store"), spec=spec, model_fingerprint="tiny", read_only=True) as st:
      assert st.counts() == ref["counts"]
      for d, arrays in want.items():
        got = st.get(d)[0]
        assert all(np.array_equal(got[n], arrays[n]) for n in arrays), d
  files = _files(w)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    _same_result(_train(setup, str(w)), ref)
  assert "nothing to do" in caplog.text and _files(w) == files


def test_lr_decay_reaches_the_step_and_bad_values_are_refused(setup, tmp_path):
  """train.lr_decay='cosine' with lr_min_ratio=0 over one update: every cartridge's first update has
  lr 0 and every later one too, so the stored cartridges are their init although they were trained
  (counts > 0); the constant-lr run on the same data moves them. A schedule name that does not exist,
  or a ratio above 1, is refused naming the field. decay_horizon's auto value is the even-rotation share."""
  from cas.rotation.store import CartridgeStore
  from cas.train.loop import DEFAULTS, decay_horizon
  m, docs, path, frozen, init_fn = setup
  cfg = {"lr_decay": "cosine", "lr_min_ratio": 0.0, "lr_decay_updates": 1}
  out = _train(setup, str(tmp_path / "flat"), cfg=cfg)
  moved = _train(setup, str(tmp_path / "const"), cfg={})
  assert min(out["counts"].values()) > 0
  spec = CartridgeSpec.for_model(TINY, P, 1)
  for name, same in (("flat", True), ("const", False)):
    with CartridgeStore(str(tmp_path / name / "store"), spec=spec, model_fingerprint="tiny", read_only=True) as st:
      eq = [np.asarray(st.get(d)[0]["k"]).tobytes() == init_fn(d)["k"].tobytes() for d in docs]
    assert all(eq) if same else not any(eq), name
  assert out["final_loss"] > 0 and moved["final_loss"] > 0
  with pytest.raises(ValueError, match="lr_decay='linear' must be one of"):
    _train(setup, str(tmp_path / "bad"), cfg={"lr_decay": "linear"})
  with pytest.raises(ValueError, match="lr_min_ratio=1.5 must be <= 1.0"):
    _train(setup, str(tmp_path / "bad2"), cfg={"lr_min_ratio": 1.5})
  c = {**DEFAULTS, "steps": 1000, "num_slots": 10, "lr_decay": "cosine"}
  assert decay_horizon(c, 35) == 286 and decay_horizon(c, 5) == 1000
  assert decay_horizon({**c, "lr_decay_updates": 40}, 35) == 40 and decay_horizon({**c, "lr_decay": "constant"}, 35) == 0


def test_silent_rows_reach_the_loop(setup, tmp_path):
  """train.p_silent: the loop builds silent rows (their teacher is the prefix-free model, so the same
  data trains differently) and the run stays finite; p_silent=0 is the run as before."""
  k = _stored_keys_of_runs(setup, tmp_path, {"off": {}, "off0": {"p_silent": 0.0},
                                              "silent": {"p_silent": 1.0, "p_isolated": 0.0}, "mixed": {"p_isolated": 0.0}})
  assert k["off"].tobytes() == k["off0"].tobytes()
  assert not np.array_equal(k["silent"], k["mixed"])


def test_own_last_rows_reach_the_loop(setup, tmp_path):
  """train.p_own_last in sequential positions: every mixed row loads its own cartridge last, so the same data
  trains the cartridges differently than with the own cartridge in a random slot."""
  seq = {"position_mode": "sequential", "p_isolated": 0.0}
  k = _stored_keys_of_runs(setup, tmp_path, {"random": seq, "last": {**seq, "p_own_last": 1.0}})
  assert not np.array_equal(k["random"], k["last"])


def _stored_keys_of_runs(setup, tmp_path, configs: dict) -> dict:
  """Trains one run per named config (each finite) and returns each one's stored keys, all documents raveled."""
  from cas.rotation.store import CartridgeStore
  docs = setup[1]
  runs = {name: _train(setup, str(tmp_path / name), cfg=cfg) for name, cfg in configs.items()}
  assert all(np.isfinite(r["final_loss"]) for r in runs.values())
  spec = CartridgeSpec.for_model(TINY, P, 1)
  k = {}
  for name in runs:
    with CartridgeStore(str(tmp_path / name / "store"), spec=spec, model_fingerprint="tiny", read_only=True) as st:
      k[name] = np.concatenate([np.asarray(st.get(d)[0]["k"]).ravel() for d in docs])
  return k


def test_quiet_distractors_reach_the_loop_and_log_their_share(setup, tmp_path):
  """train.share_weight: the loop's step adds the distractors' attention share to the loss (the stored
  cartridges differ from the run without it), logs it per step, and share_weight=0 is the run as before."""
  k = _stored_keys_of_runs(setup, tmp_path, {"off": {}, "off0": {"share_weight": 0.0},
                                              "quiet": {"share_weight": 2.0, "share_stride": 2}})
  assert k["off"].tobytes() == k["off0"].tobytes()
  assert not np.array_equal(k["quiet"], k["off"])
  logged = read_metrics(str(tmp_path / "quiet" / "logs"))
  shares = [r["distractor_share"] for r in logged if "distractor_share" in r]
  assert shares and all(0.0 <= s <= 1.0 for s in shares)
  assert not any("distractor_share" in r for r in read_metrics(str(tmp_path / "off" / "logs")))


def test_teacher_temperature_reaches_the_loop_and_one_is_the_run_as_before(setup, tmp_path):
  """train.teacher_temperature: the loop distils toward the sharpened top-k (the stored cartridges differ);
  1.0 is the run as before, and a temperature <= 0 is refused naming the field."""
  k = _stored_keys_of_runs(setup, tmp_path, {"off": {}, "one": {"teacher_temperature": 1.0},
                                              "sharp": {"teacher_temperature": 0.5}})
  assert k["off"].tobytes() == k["one"].tobytes()
  assert not np.array_equal(k["sharp"], k["off"])
  with pytest.raises(ValueError, match="teacher_temperature"):
    _train(setup, str(tmp_path / "bad"), cfg={"teacher_temperature": 0.0})


def test_sharpen_topk_keeps_the_top_k_mass_and_the_absent_entries():
  from cas.train.batch import sharpen_topk
  lp = np.log(np.asarray([[0.5, 0.3, 0.1, 1e-30], [0.2, 0.2, 0.1, 0.05]], np.float64))
  lp[0, 3] = -1e9  # absent
  out = sharpen_topk(lp.astype(np.float32), 0.5)
  assert out[0, 3] == -1e9
  for row_in, row_out in zip(lp, out):
    present = row_in > -1e8
    assert np.isclose(np.exp(row_out[present]).sum(), np.exp(row_in[present]).sum(), rtol=1e-5)
  p = np.exp(out[0, :3]) / np.exp(out[0, :3]).sum()  # squares, renormalised: 0.25 / 0.09 / 0.01 over 0.35
  np.testing.assert_allclose(p, np.asarray([0.25, 0.09, 0.01]) / 0.35, rtol=1e-5)
  np.testing.assert_allclose(out[1, :2], out[1, 0])  # ties stay tied
  assert sharpen_topk(lp, 1.0) is lp
  assert np.all(sharpen_topk(np.full((2, 3), -1e9, np.float32), 0.5) == -1e9)  # a position with no target


def test_anchor_keeps_every_cartridge_nearer_its_init_and_resumes_exactly(setup, tmp_path):
  """train.anchor_weight: each update pulls the cartridge toward init_fn's cartridge (recomputed for the documents
  each rotation admits), so every stored cartridge ends nearer its init than without the anchor; a run cut and
  resumed (the anchors rebuilt from the restored slot table) logs the same losses as one run straight through."""
  from cas.rotation.store import CartridgeStore
  m, docs, path, frozen, init_fn = setup
  spec = CartridgeSpec.for_model(TINY, P, 1)

  def distances(workdir):
    with CartridgeStore(str(workdir / "store"), spec=spec, model_fingerprint="tiny", read_only=True) as store:
      return {d: float(np.abs(np.asarray(store.get(d)[0]["k"]) - init_fn(d)["k"]).sum()) for d in docs}

  _train(setup, str(tmp_path / "free"))
  _train(setup, str(tmp_path / "anchored"), cfg={"anchor_weight": 20.0})
  free, anchored = distances(tmp_path / "free"), distances(tmp_path / "anchored")
  assert all(anchored[d] < free[d] for d in docs), (anchored, free)
  _train(setup, str(tmp_path / "cut"), cfg={"anchor_weight": 20.0}, stop_after=6)
  _train(setup, str(tmp_path / "cut"), cfg={"anchor_weight": 20.0})
  a = [r["loss"] for r in read_metrics(str(tmp_path / "anchored" / "logs"))]
  b = [r["loss"] for r in read_metrics(str(tmp_path / "cut" / "logs"))]
  np.testing.assert_allclose(b, a, rtol=1e-5)
  with pytest.raises(Exception, match="anchor_weight"):
    _train(setup, str(tmp_path / "bad"), cfg={"anchor_weight": -1.0})
