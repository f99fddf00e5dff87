"""The server's step decoder (cas.serve.decode.StepDecoder) with the Sampler's decode levers: presplit
weights, the split cache and merged projections give the same tokens and log-probs; a batch whose rows all have
top_p = 1 skips the vocabulary sort. (Apart from tests/model/test_decode_levers.py so that the two halves of that
module's compile time can run on separate xdist workers.)"""
import jax
import jax.numpy as jnp
import numpy as np

from cas.model import ModelConfig, build_model
from tests.model.test_decode_levers import CONFIGS


def test_the_servers_step_decoder_takes_presplit_weights_and_the_split_cache():
  """StepDecoder(presplit=True, split_cache=True) streams the same tokens and log-probs as without them, with
  per-row cartridges, one shared cartridge and none, greedy and seeded sampling; off an unrolled model
  (a scan) the flags are off."""
  from cas.serve.decode import Row, StepDecoder
  cfg = ModelConfig.from_hf_dict(CONFIGS["gemma3"], source="gemma3")
  model = build_model(cfg, seed=4, layer_loop="unrolled")
  rng = np.random.default_rng(2)
  k1, k2 = (rng.normal(size=(cfg.num_layers, 5, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32) for _ in range(2))
  batches = {
      "per_row": [Row([5, 9, 14, 3], 6, k1, k1 * 0.5, 5), Row([7, 2], 6, k2, k2 * 0.5, 5, 1.0, 1.0, 3)],
      "shared": [Row([5, 9, 14, 3], 6, k1, k2, 5), Row([7, 2, 8], 6, k1, k2, 5, 0.8, 0.9, 4)],
      "none": [Row([5, 9, 14, 3, 1, 2, 3, 4, 5], 7), Row([11], 7, temperature=1.0, seed=9)],
  }
  kw = dict(pad_id=0, prompt_buckets=(16,), batch_buckets=(2,), new_token_buckets=(8,), prefix_multiple=8)

  def run(dec, rows):
    got = []
    dec.decode(rows, lambda step, t, lp: got.append((t.copy(), lp.copy())) or np.zeros(len(rows), bool))
    return got

  plain = StepDecoder(model, **kw)
  fast = StepDecoder(model, presplit=True, split_cache=True, **kw)
  merged = StepDecoder(model, presplit=True, split_cache=True, merge_projections=True, **kw)
  assert fast.presplit and fast.split_cache and not plain.presplit
  assert merged.merge_projections and not fast.merge_projections and "wqkv" in merged._split[0]
  for name, rows in batches.items():
    ref = run(plain, rows)
    # merged on the shared cartridge only (each batch compiles its own programs: the suite's time; the Sampler's
    # merged path is checked on all three prefixes in tests/model/test_decode_levers.py)
    for dec in (fast, merged) if name == "shared" else (fast,):
      for (ta, la), (tb, lb) in zip(ref, run(dec, rows)):
        np.testing.assert_array_equal(ta, tb, err_msg=name)
        np.testing.assert_allclose(la, lb, atol=1e-5, err_msg=name)
  scan = StepDecoder(build_model(cfg, seed=4, layer_loop="scan"), presplit=True, split_cache=True,
                     merge_projections=True, **kw)
  assert not scan.presplit and not scan.split_cache and not scan.merge_projections


def test_the_servers_decoder_sorts_for_top_p_only_where_a_row_asks_for_it():
  """StepDecoder: a sampled batch whose rows all have top_p = 1 skips the per-step sort of the vocabulary (a
  program without the filter) and draws what the filter at top_p = 1 draws; a row with top_p < 1 keeps its
  tokens within its nucleus, beside a top_p = 1 row."""
  from cas.serve.decode import Row, StepDecoder, _choose
  logits = jax.random.normal(jax.random.key(0), (8, 3_000), jnp.float32) * 3
  temps, seeds = jnp.ones((8,)), jnp.arange(8, dtype=jnp.uint32)
  for step in range(5):
    a = _choose(logits, temps, jnp.ones((8,)), seeds, jnp.int32(step), True, filtering=True)
    b = _choose(logits, temps, jnp.ones((8,)), seeds, jnp.int32(step), True, filtering=False)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  top_ps = jnp.asarray([0.3] + [1.0] * 7)
  nucleus = np.argsort(-np.asarray(logits[0]))[:int(np.searchsorted(np.cumsum(np.sort(np.asarray(
      jax.nn.softmax(logits[0])))[::-1]), 0.3)) + 1]
  for step in range(20):
    tok = int(_choose(logits, temps, top_ps, seeds, jnp.int32(step), True, filtering=True)[0][0])
    assert tok in set(nucleus.tolist())

  cfg = ModelConfig.from_hf_dict(CONFIGS["gemma3"], source="gemma3")
  dec = StepDecoder(build_model(cfg, seed=4), pad_id=0, prompt_buckets=(16,), batch_buckets=(2,),
                    new_token_buckets=(8,), prefix_multiple=8)
  seen = []
  for rows in ([Row([5, 9, 14], 4, temperature=1.0, seed=1), Row([7, 2], 4, temperature=0.7, seed=2)],
               [Row([5, 9, 14], 4, temperature=1.0, top_p=0.5, seed=1), Row([7, 2], 4, temperature=0.7, seed=2)]):
    before = dec.num_traces
    dec.decode(rows, lambda step, t, lp: seen.append(t.copy()) or np.zeros(len(rows), bool))
    assert dec.num_traces == before + 2  # a prefill and a step program of their own: with and without the filter
