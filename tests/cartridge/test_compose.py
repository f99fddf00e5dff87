"""Composing cartridges: sink once, shared vs sequential positions (keys re-rotated)."""
import jax.numpy as jnp
import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeError, init_cartridge
from cas.cartridge.compose import compose
from cas.testing import tiny_model


def test_shared_and_sequential_composition():
  m = tiny_model()
  rng = np.random.default_rng(0)
  a, b = list(rng.integers(2, 128, 9)), list(rng.integers(2, 128, 9))
  ca = init_cartridge(m, a, 8, sink_ids=[1])
  cb = init_cartridge(m, b, 8, sink_ids=[1])
  k, v, off = compose([ca, cb], mode="shared")
  assert k.shape[1] == 1 + 7 + 7 and off == 8
  np.testing.assert_array_equal(k[:, 8:], cb.k[...])  # shared: stored keys untouched
  k2, v2, off2 = compose([ca, cb], mode="sequential", inv_freq=m.inv_freq[...])
  assert off2 == 15
  np.testing.assert_array_equal(v2, v)  # values carry no position
  # Layer-0 keys depend only on token and position: the sequential composition must equal the
  # layer-0 keys of reading sink + a + b one after another.
  toks = [1] + a[:7] + b[:7]
  ref_k, _ = m.layer_kv(jnp.asarray([toks]), jnp.arange(len(toks))[None])
  np.testing.assert_allclose(k2[0], ref_k[0, 0], atol=1e-5)
  assert not np.allclose(k[0], ref_k[0, 0], atol=1e-3)  # shared positions differ, as they should
  with pytest.raises(CartridgeError, match="different specs"):
    compose([ca, init_cartridge(m, a, 6, sink_ids=[1])])
  with pytest.raises(CartridgeError, match="position mode"):
    compose([ca], mode="interleaved")
