"""Scale (issue 5, item 4): a 2,000-document collection of over 1M tokens trains with B = 4 device
slots; the device-resident cartridge bytes are those of B slots, not N, and only the documents
that were admitted were ever initialised or read."""
import numpy as np

from cas.cartridge.cartridge import CartridgeSpec
from cas.data import synthetic
from cas.data.types import approx_num_tokens
from cas.synth.format import Conversation
from cas.testing import TINY, tiny_model, write_dataset
from cas.train.loop import train_cas

N, B, P, K = 2000, 4, 4, 4


def test_two_thousand_documents_with_four_slots(tmp_path):
  # the built-in generator streams a >1M-token collection; cartridges are trained per document id
  docs = list(synthetic.iter_collection(N, seed=0))
  assert sum(approx_num_tokens(d.text) for d, _ in docs) > 1_000_000
  doc_ids = [d.doc_id for d, _ in docs]
  rng = np.random.default_rng(0)
  convs = []
  for d in doc_ids:  # one short self-study record per document (random teacher: memory test)
    lp = np.log(np.full((6, K), 1.0 / K, np.float32))
    convs.append(Conversation(d, rng.integers(2, 128, 4).astype(np.int32), rng.integers(2, 128, 6).astype(np.int32),
                              rng.integers(2, 128, (6, K)).astype(np.int32), lp))
  data = str(tmp_path / "data")
  write_dataset(data, convs, model_fingerprint="tiny", shard_size=100, top_k=K, doc_ids=doc_ids, per_doc=1)
  spec = CartridgeSpec.for_model(TINY, P, 1)
  inits = []

  def init_fn(doc_id):
    inits.append(doc_id)
    return {"k": np.zeros(spec.trainable_shape, np.float32), "v": np.zeros(spec.trainable_shape, np.float32)}

  frozen = (np.zeros(spec.frozen_shape, np.float32), np.zeros(spec.frozen_shape, np.float32))
  cfg = dict(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, clip_norm=1.0, loss="distill", seed=0,
             num_slots=B, k_max=2, p_isolated=0.5, rotate_every=2, evict_fraction=0.5, position_mode="shared",
             top_k=K, log_every=100, ckpt_every=6, keep_checkpoints=1)
  out = train_cas(model=tiny_model(), model_fingerprint="tiny", dataset_dir=data, workdir=str(tmp_path / "run"),
                  doc_ids=doc_ids, spec=spec, frozen=frozen, init_fn=init_fn, cfg=cfg)
  slot_bytes = int(np.prod(spec.trainable_shape)) * 4 * 6 + 4  # k, v, 4 moments (f32) + count
  assert out["device_slot_bytes"] == B * slot_bytes  # measured from the device arrays
  assert len(out["counts"]) == N
  trained = [d for d, c in out["counts"].items() if c > 0]
  assert 0 < len(trained) <= B + 2 * B  # initial fill + 2 rotations of B/2 each (the last step skips rotating)
  # only admitted documents (plus the next rotation's prefetched ones) were ever initialised
  assert len(set(inits)) == len(inits) and set(trained) <= set(inits)
  assert len(inits) <= len(trained) + B // 2
