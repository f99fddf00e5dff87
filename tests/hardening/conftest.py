"""Tiny real fixtures of the hardening tests: a single-cartridge dataset and a 6-document CAS
dataset, both labelled by a tiny random model (cas.testing)."""
import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
from cas.testing import TINY, cas_dataset, single_doc_dataset, tiny_model

CAS_N, CAS_PER_DOC, CAS_P = 6, 4, 6


@pytest.fixture(scope="package")
def single_data(tmp_path_factory):
  """(model, dataset dir, init_fn) for train_cartridge on one 24-token document."""
  m = tiny_model()
  d = str(tmp_path_factory.mktemp("single_data"))
  doc, _ = single_doc_dataset(d, m)
  return m, d, lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors")


@pytest.fixture(scope="package")
def cas_data(tmp_path_factory):
  """dict(model, docs, path, spec, frozen, init_fn) for train_cas on 6 documents."""
  m = tiny_model()
  path = str(tmp_path_factory.mktemp("cas_data"))
  docs = cas_dataset(path, m, num_docs=CAS_N, per_doc=CAS_PER_DOC)
  sink = init_cartridge(m, [1] + list(docs["doc0"]), CAS_P)

  def init_fn(doc_id):
    c = init_cartridge(m, list(docs[doc_id]), CAS_P, sink_ids=[1])
    return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}

  return dict(model=m, docs=docs, path=path, spec=CartridgeSpec.for_model(TINY, CAS_P, 1),
              frozen=(sink.frozen_k[...], sink.frozen_v[...]), init_fn=init_fn)


def run_cas(data: dict, workdir: str, cfg: dict, **kw):
  from cas.train.loop import train_cas
  kw.setdefault("init_fn", data["init_fn"])
  return train_cas(model=data["model"], model_fingerprint=kw.pop("model_fingerprint", "tiny"),
                   dataset_dir=kw.pop("dataset_dir", data["path"]), workdir=workdir,
                   doc_ids=kw.pop("doc_ids", list(data["docs"])), spec=kw.pop("spec", data["spec"]),
                   frozen=kw.pop("frozen", data["frozen"]), cfg=cfg, **kw)
