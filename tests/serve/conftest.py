"""A real serving set-up on disk: a tiny random Llama saved as a Hugging Face model directory
with the default model's real tokenizer, a CAS-style run directory whose cartridge store holds
one cartridge per document (written with the real store code) and a saved BM25 document index."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

DOCS = {
    "doc_lighthouse": ("The lighthouse of Varnholm", "Edda Lindqvist kept the Varnholm lighthouse from 1921 "
                       "to 1958 and logged every ship in the northern strait in her ledgers."),
    "doc_orchard": ("The Pellworth orchard", "The Pellworth orchard grows forty kinds of apples; its oldest "
                    "tree, the Grey Reinette, was planted by Tobias Marr in 1802."),
    "doc_comet": ("Comet Halvard", "Comet Halvard returns every 71 years; astronomer Ines Okafor first "
                  "measured its blue tail from the Kestrel Ridge observatory."),
}
P = 16  # cartridge tokens, sink included


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from cas.model import fetch
  if not fetch.default_model_path().is_file():
    pytest.skip("the default model's tokenizer (its GGUF) is not in the cas cache: "
                "run `python -m launch.fetch_model`")
  from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
  from cas.data.types import Document
  from cas.model.loader import load_model
  from cas.retrieval import build_retriever, default_index_dir
  from cas.rotation.store import CartridgeStore
  from cas.testing import real_tokenizer

  root = tmp_path_factory.mktemp("serve")
  tok = real_tokenizer()
  model_dir = str(root / "tiny-smol")
  cfg = transformers.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=512,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_ids[0], pad_token_id=tok.pad_id)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.2)  # peaked, context-dependent logits
  hf.save_pretrained(model_dir)
  tok.hf.save_pretrained(model_dir)
  lm = load_model(model_dir)

  workdir = str(root / "tinyrun")
  store_dir = os.path.join(workdir, "cas", "store")
  spec = CartridgeSpec.for_model(lm.config, P, 1)
  docs = [Document(d, t, x) for d, (t, x) in DOCS.items()]
  bos = lm.tokenizer.bos_id
  with CartridgeStore(store_dir, spec=spec, model_fingerprint=lm.fingerprint) as store:
    items = []
    for i, d in enumerate(docs):
      c = init_cartridge(lm.model, lm.tokenizer.encode(d.text), P, sink_ids=[bos])
      if i == 0:
        store.put_frozen(c.frozen_k[...], c.frozen_v[...])
      k, v = np.asarray(c.k[...]), np.asarray(c.v[...])
      items.append((d.doc_id, {"k": k, "v": v, "mu_k": np.zeros_like(k), "mu_v": np.zeros_like(v),
                               "nu_k": np.zeros_like(k), "nu_v": np.zeros_like(v)}, 3))
    store.put_many(items)
    store.register(["doc_untrained"])  # registered, never written: no cartridge to serve
  build_retriever("bm25", docs).save(default_index_dir(store_dir, "bm25-document"))
  return types.SimpleNamespace(lm=lm, model_dir=model_dir, workdir=workdir, store_dir=store_dir,
                               docs=docs, spec=spec, name="tinyrun")


@pytest.fixture(scope="session")
def engine(world):
  from cas.serve import Engine, open_collections
  colls = open_collections(model_fingerprint=world.lm.fingerprint, workdir=world.workdir)
  eng = Engine(world.lm.model, world.lm.tokenizer, colls, model_name="tiny-smol", cache_size=2,
               max_batch=4, max_context=256, default_max_tokens=12, batch_wait_s=0.005)
  eng.start()
  yield eng
  eng.close()


# A long document cut into parts (cartridge.max_doc_tokens, cas.data.parts), next to a short one.
LONG = ("doc_atlas", "The Atlas of Quill Bay", "Mara Quill drew the first atlas of the bay in 1874. Her brother "
        "Osric sailed the survey boat Heron along the eastern cliffs. The atlas names forty coves and three hidden "
        "reefs. A fire in 1901 burned the original plates, but a copy survives in the Lantern Library. Scholars "
        "still argue about the seventh reef, which no later survey could find.")
SHORT = ("doc_bell", "The bell of Orrin", "The bronze bell of Orrin was cast in 1650 and rings at dawn.")


def write_store(lm, store_dir: str, spec, units, untrained=()) -> None:
  """A cartridge store at `store_dir` with one first-tokens init cartridge per (unit id, text) of
  `units` (zero Adam state, count 3), the BOS sink, and `untrained` ids registered only."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.rotation.store import CartridgeStore
  bos = lm.tokenizer.bos_id
  with CartridgeStore(store_dir, spec=spec, model_fingerprint=lm.fingerprint) as store:
    items = []
    for i, (uid, text) in enumerate(units):
      c = init_cartridge(lm.model, lm.tokenizer.encode(text), spec.num_tokens, sink_ids=[bos])
      if i == 0:
        store.put_frozen(c.frozen_k[...], c.frozen_v[...])
      k, v = np.asarray(c.k[...]), np.asarray(c.v[...])
      items.append((uid, {"k": k, "v": v, "mu_k": np.zeros_like(k), "mu_v": np.zeros_like(v),
                          "nu_k": np.zeros_like(k), "nu_v": np.zeros_like(v)}, 3))
    store.put_many(items)
    if untrained:
      store.register(list(untrained))


@pytest.fixture(scope="session")
def parts_world(world, tmp_path_factory):
  """A CAS workdir with two runs: <workdir>/cas/store (whole documents) and
  <workdir>/parts<M>/cas/store (LONG cut into 3 parts by cas.data.parts.document_units with the
  model's tokenizer, SHORT whole, "doc_half" with part 2 registered but untrained), and a BM25
  index over the whole documents next to the parts store (as cas.pipeline builds it)."""
  from cas.data.parts import document_units, units_root
  from cas.data.types import Document
  from cas.retrieval import build_retriever, default_index_dir
  lm = world.lm
  docs = [Document(*LONG), Document(*SHORT)]
  m = -(-len(lm.tokenizer.encode(LONG[2])) // 3)  # max_doc_tokens: LONG in 3 parts, SHORT whole
  units, parts_of = document_units(docs, m, lm.tokenizer.encode)
  assert len(parts_of[LONG[0]]) == 3 and parts_of[SHORT[0]] == [SHORT[0]], parts_of
  workdir = str(tmp_path_factory.mktemp("serve_parts") / "partsrun")
  whole_store = os.path.join(workdir, "cas", "store")
  write_store(lm, whole_store, world.spec, [(d.doc_id, d.text) for d in docs])
  parts_store = os.path.join(units_root(workdir, m), "cas", "store")
  write_store(lm, parts_store, world.spec, [(u.doc_id, u.text) for u in units] + [("doc_half#1", "Half a text.")],
              untrained=["doc_half#2"])
  build_retriever("bm25", docs).save(default_index_dir(parts_store, "bm25-document"))
  return types.SimpleNamespace(lm=lm, workdir=workdir, max_doc_tokens=m, whole_store=whole_store,
                               parts_store=parts_store, parts_of=parts_of, units=units, docs=docs, spec=world.spec)


@pytest.fixture(scope="session")
def base_tokenizer(world, tmp_path_factory):
  """The tiny model's tokenizer saved without a chat template (a base model's HF directory, as
  SmolLM2's base model ships it): `prompt_format="auto"` resolves to completion."""
  import copy

  from cas.model.tokenizer import Tokenizer
  hf = copy.deepcopy(world.lm.tokenizer.hf)
  hf.chat_template = None
  path = str(tmp_path_factory.mktemp("base_tok"))
  hf.save_pretrained(path)
  tok = Tokenizer.from_path(path)
  assert not tok.chat_template and tok.resolve_prompt_format("auto") == "completion"
  return tok
