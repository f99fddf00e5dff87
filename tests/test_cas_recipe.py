"""Recipe levers of joint training (issue 20) through the CAS pipeline on a tiny random model with
the real SmolLM2 tokenizer: hard negatives (train.p_hard, neighbors from a BM25 document index)
and the curriculum on k (train.k_curriculum_steps) train end to end; p_hard without neighbors is
refused before training; the isolated baseline ignores both levers (same run for every variant)."""
import os

import pytest

from cas.pipeline import CasStages
from cas.testing import tiny_cas_config, tiny_smol_lm
from cas.train.loop import _fingerprint, train_cas


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(11)


def _config(**train):
  c = tiny_cas_config(num_docs=4)
  c.train.steps = 10
  c.train.num_slots, c.train.k_max = 4, 3
  c.train.rotate_every = 4
  c.train.log_every = c.train.ckpt_every = 5
  for k, v in train.items():
    c.train[k] = v
  return c


def test_hard_negatives_and_curriculum_train(tmp_path, lm):
  workdir = str(tmp_path / "w")
  st = CasStages(_config(p_hard=0.5, k_curriculum_steps=6), workdir, lm=lm)
  nb = st.neighbors()
  ids = [d.doc_id for d in st.docs]
  assert set(nb) == set(ids)
  for d, others in nb.items():
    assert d not in others and sorted(others) == sorted(set(ids) - {d})  # every other document, ranked
  st.synth()
  out = st.train()
  assert out["steps"] == 10 and set(out["counts"]) == set(ids)
  assert os.path.isfile(os.path.join(workdir, "cas", "store", "store.json"))
  # the levers are part of the run's identity; the defaults leave older runs' identity unchanged
  spec = st.spec
  base = {**dict(_config().train), "top_k": 4}
  assert _fingerprint(base, spec, ids) != _fingerprint({**base, "p_hard": 0.5}, spec, ids)
  assert _fingerprint(base, spec, ids) == _fingerprint({**base, "p_hard": 0.0, "k_curriculum_steps": 0}, spec, ids)
  with pytest.raises(ValueError, match="p_hard=0.5 .*needs every document's most similar"):
    train_cas(model=lm.model, model_fingerprint=lm.fingerprint, dataset_dir=os.path.join(workdir, "synth"),
              workdir=str(tmp_path / "x"), doc_ids=ids, spec=spec, frozen=st._sink(), init_fn=st._init_fn(),
              cfg={**base, "p_hard": 0.5})
  assert not os.path.exists(str(tmp_path / "x"))
  with pytest.raises(ValueError, match="k_curriculum_steps=-1"):
    train_cas(model=lm.model, model_fingerprint=lm.fingerprint, dataset_dir=os.path.join(workdir, "synth"),
              workdir=str(tmp_path / "x"), doc_ids=ids, spec=spec, frozen=st._sink(), init_fn=st._init_fn(),
              cfg={**base, "k_curriculum_steps": -1})


def test_late_weight_walks_from_the_end_of_the_init_window(tmp_path, lm):
  """synth.late_weight > 1 reaches self-study with late_from = p - num_frozen (the first_tokens init's
  window), and the manifest records both (a self-study made without them is another dataset)."""
  c = _config()
  c.synth.coverage, c.synth.late_weight = "walk", 3
  st = CasStages(c, str(tmp_path / "w"), lm=lm)
  m = st.synth()
  assert m["config"]["late_weight"] == 3
  assert m["config"]["late_from"] == c.cartridge.num_tokens - c.cartridge.num_frozen > 0
