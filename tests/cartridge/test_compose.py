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


def test_blend_is_the_weighted_mean_of_a_trained_cartridge_and_its_init():
  """blend(trained, init, a) = a * trained + (1 - a) * init on the trainable keys and values, the sink kept; a = 1
  is the trained cartridge and 0 the init; an alpha outside [0, 1], another spec or another sink is refused."""
  from cas.cartridge.cartridge import Cartridge
  from cas.cartridge.compose import blend
  m = tiny_model()
  rng = np.random.default_rng(1)
  init = init_cartridge(m, list(rng.integers(2, 128, 9)), 8, sink_ids=[1])
  trained = Cartridge(init.frozen_k[...], init.frozen_v[...], init.k[...] + 1.0, init.v[...] * 2.0)
  mid = blend(trained, init, 0.25)
  np.testing.assert_allclose(mid.k[...], init.k[...] + 0.25, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mid.v[...], init.v[...] * 1.25, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mid.frozen_k[...], init.frozen_k[...])
  np.testing.assert_array_equal(blend(trained, init, 1.0).k[...], trained.k[...])
  np.testing.assert_array_equal(blend(trained, init, 0.0).v[...], init.v[...])
  with pytest.raises(CartridgeError, match="alpha must be in"):
    blend(trained, init, 1.5)
  with pytest.raises(CartridgeError, match="spec"):
    blend(trained, init_cartridge(m, list(rng.integers(2, 128, 9)), 6, sink_ids=[1]), 0.5)
  with pytest.raises(CartridgeError, match="different sinks"):
    blend(trained, init_cartridge(m, list(rng.integers(2, 128, 9)), 8, sink_ids=[2]), 0.5)
