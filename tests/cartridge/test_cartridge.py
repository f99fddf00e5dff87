"""The Cartridge: trainable-variable split, inits, Orbax save/load and its errors."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cas.cartridge.cartridge import (CartridgeError, CartridgeKV, CartridgeSpec, init_cartridge,
                                     short_documents)
from cas.cartridge.io import load_cartridge, save_cartridge
from cas.model.llama import apply_rope
from cas.testing import TINY, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model()


DOC = list(np.random.default_rng(0).integers(2, 128, 40))


def test_first_tokens_init_is_the_documents_kv(model):
  cart = init_cartridge(model, DOC, 12)
  k, v = model.layer_kv(jnp.asarray([DOC[:12]]), jnp.arange(12)[None])
  fk, fv = cart.full_kv()
  np.testing.assert_allclose(fk, k[:, 0], atol=1e-6)
  np.testing.assert_allclose(fv, v[:, 0], atol=1e-6)
  assert cart.spec == CartridgeSpec(TINY.num_layers, 12, TINY.num_kv_heads, TINY.head_dim, 1)
  assert cart.spec.nbytes(2) == 2 * TINY.num_layers * 12 * TINY.num_kv_heads * TINY.head_dim * 2


def test_only_cartridge_tokens_are_trainable(model):
  cart = init_cartridge(model, DOC, 12, num_frozen=2)
  trainable = nnx.state(cart, CartridgeKV)
  leaves = {"/".join(map(str, p)): np.shape(v) for p, v in nnx.to_flat_state(trainable)}
  assert leaves == {"k": (2, 10, 2, 16), "v": (2, 10, 2, 16)}
  prefix = cart.prefix(batch=3)
  assert prefix.k.shape == (2, 3, 12, 2, 16) and prefix.mask.shape == (3, 12)


def test_other_inits_and_bad_input(model):
  a = init_cartridge(model, DOC, 12, strategy="random_chunk", seed=1)
  b = init_cartridge(model, DOC, 12, strategy="random_vectors", seed=1)
  f = init_cartridge(model, DOC, 12)
  np.testing.assert_array_equal(a.frozen_k[...], f.frozen_k[...])  # same sink
  assert not np.allclose(a.k[...], f.k[...]) and not np.allclose(b.k[...], f.k[...])
  with pytest.raises(CartridgeError, match="needs p-num_frozen=49"):
    init_cartridge(model, DOC, 50, short_documents="error")
  with pytest.raises(CartridgeError, match="empty document"):
    init_cartridge(model, [], 8)
  with pytest.raises(CartridgeError, match="unknown cartridge init"):
    init_cartridge(model, DOC, 8, strategy="zeros")
  short = init_cartridge(model, DOC[:5], 12, strategy="random_vectors")  # allowed: no text needed
  assert short.spec.num_tokens == 12


def test_short_document_repeat_fill_is_the_repeated_documents_kv(model):
  """A 5-token document in a p = 12 cartridge (sink [1]): the document, then itself again, as one
  causal pass over sink + doc + doc + doc[:1], so every slot holds real keys/values."""
  doc = DOC[:5]
  cart = init_cartridge(model, doc, 12, sink_ids=[1])  # pad + repeat are the defaults
  toks = [1] + (doc * 3)[:11]
  k, v = model.layer_kv(jnp.asarray([toks]), jnp.arange(12)[None])
  fk, fv = cart.full_kv()
  np.testing.assert_allclose(fk, k[:, 0], atol=1e-6)
  np.testing.assert_allclose(fv, v[:, 0], atol=1e-6)
  # the first len(doc) slots equal those of a long document that starts the same way
  long = init_cartridge(model, doc + DOC[5:], 12, sink_ids=[1])
  np.testing.assert_allclose(cart.k[...][:, :5], long.k[...][:, :5], atol=1e-6)


def test_short_document_random_fill_keeps_its_tokens(model):
  doc = DOC[:5]
  cart = init_cartridge(model, doc, 12, sink_ids=[1], short_fill="random_vectors", seed=3)
  k, _ = model.layer_kv(jnp.asarray([[1] + doc]), jnp.arange(6)[None])
  np.testing.assert_allclose(cart.k[...][:, :5], k[:, 0, 1:], atol=1e-6)  # its own 5 tokens
  rest = np.asarray(cart.k[...][:, 5:])
  assert rest.shape == (TINY.num_layers, 6, TINY.num_kv_heads, TINY.head_dim)
  assert not np.allclose(rest, init_cartridge(model, doc, 12, sink_ids=[1]).k[...][:, 5:])
  assert 0.2 < rest.std() / float(np.asarray(k[:, 0, 1:]).std()) < 5  # the document's own scale
  one = init_cartridge(model, [7], 12, sink_ids=[1])  # one token: repeated to fill p
  assert np.isfinite(np.asarray(one.k[...])).all()
  with pytest.raises(CartridgeError, match="short_fill"):
    init_cartridge(model, doc, 12, short_fill="zeros")


def test_short_documents_check_names_every_document():
  lengths = {"a": 30, "b": 4, "c": 10, "d": 11}
  assert short_documents(lengths, 12, 1) == ["b", "c"]  # p - num_frozen = 11 tokens needed
  with pytest.raises(CartridgeError, match=r"2 document\(s\) are shorter.*'b' \(4 tokens\).*'c'"):
    short_documents(lengths, 12, 1, rule="error")
  assert short_documents(lengths, 12, 1, strategy="random_vectors", rule="error") == ["b", "c"]
  with pytest.raises(CartridgeError, match="no tokens.*'e'"):
    short_documents({**lengths, "e": 0}, 12, 1)
  with pytest.raises(CartridgeError, match="short_documents='drop'"):
    short_documents(lengths, 12, 1, rule="drop")


def test_save_load_roundtrip_and_errors(model, tmp_path):
  cart = init_cartridge(model, DOC, 12)
  path = save_cartridge(str(tmp_path / "c"), cart, model_fingerprint="fp1", info={"doc_id": "d0"})
  back, meta = load_cartridge(path, model_fingerprint="fp1", expect_spec=cart.spec)
  for name in ("frozen_k", "frozen_v", "k", "v"):
    assert np.asarray(getattr(back, name)[...]).tobytes() == np.asarray(getattr(cart, name)[...]).tobytes()
  assert meta["doc_id"] == "d0"
  # overwrite is atomic: the old one is replaced, no temp dirs remain
  save_cartridge(path, init_cartridge(model, DOC, 12, strategy="random_chunk"), model_fingerprint="fp1")
  assert sorted(os.listdir(tmp_path)) == ["c"]
  with pytest.raises(CartridgeError, match="fingerprint"):
    load_cartridge(path, model_fingerprint="other")
  with pytest.raises(CartridgeError, match="spec"):
    load_cartridge(path, expect_spec=CartridgeSpec(2, 16, 2, 16, 1))
  with pytest.raises(CartridgeError, match="not a saved cartridge"):
    load_cartridge(str(tmp_path))
  import shutil
  shutil.rmtree(os.path.join(path, "arrays"))
  with pytest.raises(CartridgeError, match="cannot read cartridge arrays"):
    load_cartridge(path)


def test_relative_paths_save_load_and_store(model, tmp_path, monkeypatch):
  """Relative paths (as `--workdir=runs/x` gives) work for cartridges and the store: Orbax's
  checkpointer itself requires absolute ones (this broke the quickstart's evaluation once)."""
  from cas.rotation.store import CartridgeStore
  monkeypatch.chdir(tmp_path)
  cart = init_cartridge(model, list(range(2, 12)), 6)
  save_cartridge(os.path.join("runs", "c"), cart, model_fingerprint="fp")
  back, _ = load_cartridge(os.path.join("runs", "c"), model_fingerprint="fp")
  np.testing.assert_array_equal(np.asarray(back.k[...]), np.asarray(cart.k[...]))
  k = np.asarray(cart.k[...])
  with CartridgeStore(os.path.join("runs", "store"), spec=cart.spec, model_fingerprint="fp") as st:
    st.put_frozen(cart.frozen_k[...], cart.frozen_v[...])
    st.put("d", {n: k for n in ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v")}, 1)
    got, c = st.get("d")
  assert c == 1
  np.testing.assert_array_equal(got["k"], k)


def test_key_norm_init_keeps_the_lowest_norm_keys_of_the_whole_document_rotated_to_their_slots(model):
  """init='key_norm' on a 40-token document, p = 12: per layer and KV head the 11 body tokens of
  smallest key norm over the *whole* document (not its first 11), in document order; rotating each
  stored key back by (its position - its slot) gives the document's own key, values are the
  document's; a document that fits gives the first_tokens cartridge."""
  p, f = 12, 1
  cart = init_cartridge(model, DOC, p, strategy="key_norm")
  padded = DOC + [0] * (64 - len(DOC))  # the init's pass runs on the document padded to a power of two
  k, v = model.layer_kv(jnp.asarray([padded]), jnp.arange(64)[None])
  k, v = np.asarray(k[:, 0, :len(DOC)], np.float32), np.asarray(v[:, 0, :len(DOC)], np.float32)  # [L, T, H, D]
  fk, fv = cart.full_kv()
  fk, fv = np.asarray(fk), np.asarray(fv)
  np.testing.assert_allclose(fk[:, :f], k[:, :f], atol=1e-6)  # the sink stays
  inv = np.asarray(model.inv_freq[...], np.float32)
  norms = np.linalg.norm(k[:, f:], axis=-1)  # [L, T', H]
  picked_late = 0
  for li in range(k.shape[0]):
    for h in range(k.shape[2]):
      want = np.sort(np.argsort(norms[li, :, h], kind="stable")[:p - f]) + f  # positions in the document
      picked_late += int((want >= p).sum())
      for s, pos in enumerate(want):
        np.testing.assert_allclose(fv[li, f + s, h], v[li, pos, h], atol=1e-6)
        back = apply_rope(jnp.asarray(fk[li, f + s, h])[None, None, None], jnp.asarray([[pos - (f + s)]]), inv)
        np.testing.assert_allclose(np.asarray(back)[0, 0, 0], k[li, pos, h], atol=1e-4)
  assert picked_late > 0  # tokens past the first p were chosen: the init is not first_tokens
  fits = init_cartridge(model, DOC[:p], p, strategy="key_norm").full_kv()
  first = init_cartridge(model, DOC[:p], p).full_kv()
  np.testing.assert_allclose(np.asarray(fits[0]), np.asarray(first[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(fits[1]), np.asarray(first[1]), atol=1e-6)
