"""The model's layer loop forms (`layer_loop`: scan, unrolled, auto) compute the same thing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model.llama import KVCache, Prefix, build_model
from cas.testing import TINY, tiny_packed_inputs


def test_unrolled_layers_equal_scan_in_values_and_prefix_gradients():
  """Logits and the cartridge gradient (the training step's quantities) agree between the
  layer forms; the unrolled trace has no scan; a decode with a cache agrees too."""
  tok, pos, seg, pk, pv = tiny_packed_inputs()
  valid = np.asarray(seg) > 0
  out = {}
  for loop in ("scan", "unrolled"):
    m = build_model(TINY, seed=3, layer_loop=loop)
    assert m.layer_loop == loop

    def loss(pk, pv):
      logits, _ = m(tok, pos, seg, prefix=Prefix(pk, pv, None))
      return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits

    (val, logits), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(pk, pv)
    cache = KVCache.empty(TINY, 2, 12, jnp.float32)
    dec, _ = m(tok, pos, seg, cache=cache)
    jaxpr = str(jax.make_jaxpr(lambda t: m(t, pos, seg)[0])(tok))
    out[loop] = (float(val), np.asarray(logits), [np.asarray(g) for g in grads], np.asarray(dec), jaxpr)
  (v0, l0, g0, d0, j0), (v1, l1, g1, d1, j1) = out["scan"], out["unrolled"]
  np.testing.assert_allclose(l1[valid], l0[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(g1, g0):
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(d1[valid], d0[valid], atol=1e-5, rtol=1e-5)
  assert "scan" in j0 and "scan" not in j1


def test_auto_scans_except_training_steps_on_gpu_and_bad_value_is_named():
  tok, pos, seg, _, _ = tiny_packed_inputs()
  m = build_model(TINY, seed=3)
  assert m.layer_loop == "auto"
  assert "scan" in str(jax.make_jaxpr(lambda t: m(t, pos, seg)[0])(tok))  # not a training step
  trained = str(jax.make_jaxpr(lambda t: m(t, pos, seg, training=True)[0])(tok))
  assert ("scan" in trained) == (jax.default_backend() != "gpu")
  with pytest.raises(ValueError, match="layer_loop='rolled'"):
    build_model(TINY, layer_loop="rolled")
