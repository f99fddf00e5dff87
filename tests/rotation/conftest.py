"""Shared tiny shapes and array helpers for the rotation tests."""
import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeSpec
from cas.rotation.store import ARRAY_NAMES

# L=2, p=4 with one frozen sink token -> trainable [2, 3, 2, 4]
SPEC = CartridgeSpec(num_layers=2, num_tokens=4, num_kv_heads=2, head_dim=4, num_frozen=1)
FP = "model-fp-A"


def rand_arrays(seed: int, spec: CartridgeSpec = SPEC, special: bool = False) -> dict:
  """Random {k, v, mu_k, mu_v, nu_k, nu_v} [L, P-F, Hkv, D] f32; `special` plants NaN, -0.0,
  inf and a subnormal so that bit-identity (not just allclose) is tested."""
  rng = np.random.default_rng(seed)
  out = {n: rng.standard_normal(spec.trainable_shape).astype(np.float32) for n in ARRAY_NAMES}
  if special:
    k = out["k"].reshape(-1)
    k[:4] = [np.nan, -0.0, np.inf, np.float32(1e-45)]
  return out


def assert_bit_identical(a: dict, b: dict) -> None:
  assert set(a) == set(b), (sorted(a), sorted(b))
  for n in a:
    x, y = np.asarray(a[n]), np.asarray(b[n])
    assert x.dtype == y.dtype and x.shape == y.shape, (n, x.dtype, y.dtype, x.shape, y.shape)
    assert x.tobytes() == y.tobytes(), f"{n} differs"


@pytest.fixture
def spec():
  return SPEC
