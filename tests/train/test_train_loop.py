"""Training: the distillation objective, that only the cartridge changes, checkpoint pruning, and
exact resume after SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cas.cartridge.cartridge import init_cartridge
from cas.metrics import read_metrics
from cas.synth.format import SynthDataError
from cas.testing import single_doc_dataset, tiny_model
from cas.train.checkpoint import CheckpointError
from cas.train.batch import build_cas_batch
from cas.train.loop import train_cartridge
from cas.train.step import cartridge_loss

CFG = dict(steps=40, batch_size=2, seq_len=64, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill",
           seed=0, log_every=10, ckpt_every=10, keep_checkpoints=2, top_k=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  m = tiny_model()
  d = str(tmp_path_factory.mktemp("data"))
  doc, convs = single_doc_dataset(d, m)
  return m, doc, convs, d


def _batch(convs, p):
  b = build_cas_batch([(c, 0) for c in convs[:2]], [0], k_max=1, p_isolated=1.0, rng=np.random.default_rng(0),
                      seq_len=64, top_k=8, p=p)
  return {k: jnp.asarray(v) for k, v in b.items() if k in ("tokens", "positions", "segment_ids", "loss_mask",
                                                           "topk_ids", "topk_logprobs", "targets")}


def test_cartridge_of_whole_document_reproduces_teacher(setup):
  """With p = len(doc) and first-tokens init, the student sees exactly the teacher's context, so
  the loss equals the teacher's own cross-entropy on its top-k (the optimum)."""
  m, doc, convs, _ = setup
  cart = init_cartridge(m, list(doc), len(doc))
  batch = _batch(convs, len(doc))
  loss, _ = cartridge_loss({"k": cart.k[...], "v": cart.v[...]},
                           {"k": cart.frozen_k[...], "v": cart.frozen_v[...]}, m, batch)
  lp, mask = np.asarray(batch["topk_logprobs"]), np.asarray(batch["loss_mask"])
  teacher_ce = (-(np.exp(lp) * lp).sum(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(loss), teacher_ce, rtol=1e-4)
  # and a random cartridge is clearly worse
  rand = init_cartridge(m, list(doc), len(doc), strategy="random_vectors")
  loss_r, _ = cartridge_loss({"k": rand.k[...], "v": rand.v[...]},
                             {"k": rand.frozen_k[...], "v": rand.frozen_v[...]}, m, batch)
  assert float(loss_r) > teacher_ce + 0.05


def test_training_lowers_loss_and_changes_only_the_cartridge(setup, tmp_path):
  m, doc, _, d = setup
  before = jax.tree.map(np.array, nnx.state(m, nnx.Param))
  init = lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors")
  c0 = init()
  out = train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(tmp_path),
                        init_fn=init, train_cfg=CFG)
  after = jax.tree.map(np.array, nnx.state(m, nnx.Param))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert a.tobytes() == b.tobytes()  # model weights bit-identical
  recs = read_metrics(str(tmp_path / "logs"))
  losses = [r["loss"] for r in recs]
  assert len(losses) == CFG["steps"]
  # rows are packed: 4 conversations of 16 tokens (10 answer tokens) fill each 64-token row
  assert {r["tokens"] for r in recs} == {CFG["batch_size"] * 4 * 10}
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.02
  from cas.cartridge.io import load_cartridge
  cart, meta = load_cartridge(out["cartridge_path"], model_fingerprint="tiny")
  assert meta["steps"] == CFG["steps"]
  assert not np.allclose(cart.k[...], c0.k[...])  # trained tokens moved
  np.testing.assert_array_equal(cart.frozen_k[...], c0.frozen_k[...])  # the sink never trains
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [40]  # a finished run keeps its last checkpoint only (keep_checkpoints bounds a running one)


def test_refuses_data_from_another_model_and_checkpoint_from_another_config(setup, tmp_path):
  m, doc, _, d = setup
  init = lambda: init_cartridge(m, list(doc), 8)
  with pytest.raises(SynthDataError, match="fingerprint"):
    train_cartridge(model=m, model_fingerprint="other-model", dataset_dir=d, workdir=str(tmp_path),
                    init_fn=init, train_cfg=CFG)
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(tmp_path),
                  init_fn=init, train_cfg={**CFG, "steps": 10})
  with pytest.raises(CheckpointError, match="config_fingerprint") as e:
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(tmp_path),
                    init_fn=init, train_cfg={**CFG, "steps": 10, "lr": 1e-3})
  assert f"train.lr: {CFG['lr']!r} -> 0.001" in str(e.value)  # the field that changed, named


def test_config_changes_names_fields_and_says_when_none_differs():
  from cas.train.checkpoint import config_changes
  assert config_changes({"position_mode": "shared", "lr": 0.01}, {"position_mode": "sequential", "lr": 0.01}) == \
      " (train.position_mode: 'shared' -> 'sequential')"
  assert config_changes({"k_max": 4}, {}) == " (train.k_max: 4 -> '(default)')"
  assert "documents, the cartridge spec" in config_changes({"lr": 0.01}, {"lr": 0.01})
  assert config_changes(None, {"lr": 0.01}) == ""  # a checkpoint from before the record: no detail


SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    from cas.cartridge.cartridge import init_cartridge
    from cas.testing import tiny_model
    from cas.train.loop import train_cartridge
    import cas.train.loop as loop
    cfg = {cfg}
    m = tiny_model()
    doc = np.random.default_rng(1).integers(2, 128, 24).astype(np.int32)
    slow = sys.argv[3] == "slow"
    if slow:  # give the parent time to kill us mid-run
      orig = loop.MetricWriter.write
      def write(self, step, s):
        orig(self, step, s); time.sleep(0.15)
      loop.MetricWriter.write = write
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=sys.argv[1], workdir=sys.argv[2],
                    init_fn=lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors"), train_cfg=cfg)
""")


def _run(args, **kw):
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  return subprocess.Popen([sys.executable, "-c", SCRIPT.format(cfg=repr({**CFG, "ckpt_every": 5}))] + args,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_sigkill_then_resume_reproduces_losses(setup, tmp_path):
  _, _, _, d = setup
  ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
  p = _run([d, ref, "fast"])
  assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
  p = _run([d, run, "slow"])
  deadline = time.time() + 240
  while time.time() < deadline:  # kill once a checkpoint exists and training went past it
    recs = read_metrics(os.path.join(run, "logs"))
    if len(recs) >= 17:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = len(read_metrics(os.path.join(run, "logs")))
  assert 10 <= killed_at < CFG["steps"]
  p = _run([d, run, "fast"])
  assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
  a = [r["loss"] for r in read_metrics(os.path.join(ref, "logs"))]
  b = [r["loss"] for r in read_metrics(os.path.join(run, "logs"))]
  assert len(a) == len(b) == CFG["steps"]
  assert a == b  # bit-exact losses after resume


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
def test_model_on_a_mesh_trains_and_resumes_like_one_device(setup, tmp_path):
  """The monolithic baseline runs after CAS training has put the model on a mesh: the cartridge
  state then lives on that mesh, and restoring a checkpoint puts it back there (it used to come
  back on device 0: 'incompatible devices'). Losses equal the one-device run's."""
  from cas.sharding import make_mesh, shard_model
  _, doc, _, d = setup
  # Weights std 0.04 (scale 2, as in test_cas_mesh): sharded sums in another order then agree to
  # ~1e-7; the default scale-10 model amplifies that reordering noise to ~1e-4 in 12 Adam steps.
  m = tiny_model(scale=2.0)
  cfg = {**CFG, "steps": 12, "ckpt_every": 4}
  init = lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors")
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(tmp_path / "one"),
                  init_fn=init, train_cfg=cfg)
  ref = [r["loss"] for r in read_metrics(str(tmp_path / "one" / "logs"))]
  m2 = tiny_model(scale=2.0)  # same seed, same weights
  shard_model(m2, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  init2 = lambda: init_cartridge(m2, list(doc), 8, strategy="random_vectors")
  w = str(tmp_path / "mesh")
  first = train_cartridge(model=m2, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init2,
                          train_cfg=cfg, stop_after=6)
  assert first["steps"] == 6 and first["cartridge_path"] is None
  out = train_cartridge(model=m2, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init2, train_cfg=cfg)
  assert out["steps"] == 12 and out["cartridge_path"]
  got = [r["loss"] for r in read_metrics(os.path.join(w, "logs"))]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_loss_chunk_setting_reaches_the_step(setup, tmp_path):
  """train.loss_chunk = 16 (fused head + loss over 16-token chunks of a 2 x 64 batch) trains like
  loss_chunk = 0 (full logits): the same losses up to float rounding, the same cartridge."""
  m, doc, _, d = setup
  init = lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors")
  cfg = {**CFG, "steps": 4, "log_every": 1, "ckpt_every": 4}
  runs = {}
  for lc in (0, 16):
    w = tmp_path / f"lc{lc}"
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(w), init_fn=init,
                    train_cfg={**cfg, "loss_chunk": lc})
    runs[lc] = [r["loss"] for r in read_metrics(str(w / "logs"))]
  assert len(runs[0]) == len(runs[16]) == 4
  np.testing.assert_allclose(runs[16], runs[0], rtol=1e-4)


def test_workdir_of_the_former_single_loop_keeps_its_cartridge_or_is_refused(setup, tmp_path):
  """Checkpoints without the one loop's store were written by the former single-cartridge loop:
  with its exported cartridge the workdir is done (kept, not retrained); without, it is refused
  with what to remove, and nothing in it is deleted."""
  from cas.cartridge.io import save_cartridge
  m, doc, _, d = setup
  init = lambda: init_cartridge(m, list(doc), 8)
  old = tmp_path / "old"
  os.makedirs(old / "checkpoints" / "7")
  with pytest.raises(CheckpointError, match=r"former single-cartridge training loop.*Remove .*checkpoints"):
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(old), init_fn=init, train_cfg=CFG)
  assert os.path.isdir(old / "checkpoints" / "7") and not os.path.exists(old / "store")
  save_cartridge(str(old / "cartridge"), init(), model_fingerprint="tiny", info={"steps": 7, "final_loss": 1.5})
  out = train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=str(old), init_fn=init,
                        train_cfg=CFG)
  assert out == {"steps": 7, "final_loss": 1.5, "cartridge_path": str(old / "cartridge")}
  assert not os.path.exists(old / "store") and not os.path.exists(old / "logs")  # nothing was trained


def test_rerun_of_a_finished_run_keeps_the_exported_cartridge(setup, tmp_path):
  """A finished one-cartridge run run again neither trains, flushes nor exports: the exported
  cartridge keeps its files and mtime (the monolithic evaluation resumes on them) and the result
  is the same. A kill during the export (the old directory moved aside, the new one not yet in
  place) is completed by the next run."""
  from cas.cartridge.io import load_cartridge
  m, doc, _, d = setup
  init = lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors")
  cfg = {**CFG, "steps": 4, "ckpt_every": 4, "log_every": 2}
  w = str(tmp_path / "run")
  first = train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=cfg)
  path = first["cartridge_path"]

  def files():
    out = {"": os.stat(path).st_mtime_ns}
    for dirpath, _, names in os.walk(w):
      for n in names:
        p = os.path.join(dirpath, n)
        if n != ".lock":
          out[os.path.relpath(p, w)] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out

  before = files()
  assert train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                         train_cfg=cfg) == first
  assert files() == before
  ref, _ = load_cartridge(path)
  os.rename(path, f"{path}.old-999")  # killed inside replace_dir, between its two renames
  assert train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                         train_cfg=cfg) == first
  assert not os.path.exists(f"{path}.old-999")
  cart, meta = load_cartridge(path)
  assert meta["steps"] == 4 and np.array_equal(np.asarray(cart.k[...]), np.asarray(ref.k[...]))
  again = files()
  assert train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                         train_cfg=cfg) == first
  assert files() == again  # the completed export is kept from then on
