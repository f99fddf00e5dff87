"""Tests for cas/model/sampler.py on a tiny random Llama (weights shared with transformers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from cas.model import ModelConfig, Prefix, build_model, params_from_hf
from cas.model.sampler import Sampler, bucket_size, top_p_filter

V = 128
PAD = 0
T_REF = 64  # padded length of the full-recompute reference


@pytest.fixture(scope="module")
def hf_and_model():
  """A tiny torch LlamaForCausalLM with random weights and the same weights loaded into cas."""
  torch.manual_seed(0)
  hf_cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       initializer_range=0.2, max_position_embeddings=512,
                       tie_word_embeddings=False)
  hf = LlamaForCausalLM(hf_cfg).eval()
  cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), source="tiny")
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  model = build_model(cfg, params_from_hf(cfg, sd, source="tiny"))
  return hf, model


@pytest.fixture(scope="module")
def model(hf_and_model):
  return hf_and_model[1]


@pytest.fixture(scope="module")
def sampler(model):
  return Sampler(model, pad_id=PAD)


@pytest.fixture(scope="module")
def full_logits(model):
  """Full recompute (no cache): log_softmax of the logits at every position of one sequence."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, seg):
    m = nnx.merge(graphdef, state)
    logits, _ = m(tokens, jnp.arange(T_REF)[None], seg)
    return jax.nn.log_softmax(logits[0], axis=-1)  # [T, V]

  def f(seq):
    tokens = np.full((1, T_REF), PAD, np.int32)
    tokens[0, :len(seq)] = seq
    seg = (np.arange(T_REF) < len(seq)).astype(np.int32)[None]
    return np.asarray(run(state, tokens, seg))[:len(seq)]
  return f


def greedy_reference(full_logits, prompt, n):
  """Greedy generation one token at a time, recomputing the whole sequence each step."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(full_logits(seq)[-1])))
  return seq[len(prompt):]


def make_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, V, size=n).tolist() for n in lengths]


PROMPTS = make_prompts([3, 8, 13, 20])


def test_bucket_size():
  assert bucket_size(1, (32, 64)) == 32
  assert bucket_size(33, (32, 64)) == 64
  assert bucket_size(65, (32, 64)) == 128
  assert bucket_size(130, (32, 64)) == 192


def test_greedy_batched_equals_full_recompute_and_transformers(sampler, full_logits, hf_and_model):
  hf, _ = hf_and_model
  n = 12
  res = sampler.generate(PROMPTS, max_new_tokens=n, top_k_logprobs=5)
  assert len(res) == len(PROMPTS)
  for prompt, g in zip(PROMPTS, res):
    assert g.num_prompt_tokens == len(prompt)
    assert g.finish_reason == "length"
    assert g.tokens.dtype == np.int32 and g.tokens.shape == (n,)
    ref = greedy_reference(full_logits, prompt, n)
    assert g.tokens.tolist() == ref
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == ref


def test_top_k_logprobs_match_log_softmax(sampler, full_logits):
  k = 5
  res = sampler.generate(PROMPTS, max_new_tokens=12, top_k_logprobs=k)
  for prompt, g in zip(PROMPTS, res):
    assert g.top_ids.shape == (12, k) and g.top_logprobs.shape == (12, k)
    assert g.top_ids.dtype == np.int32 and g.top_logprobs.dtype == np.float32
    seq = prompt + g.tokens.tolist()
    lp = full_logits(seq)[len(prompt) - 1:len(seq) - 1]  # [n, V] distributions that made tokens
    ref_top = -np.sort(-lp, axis=-1)[:, :k]
    np.testing.assert_allclose(g.top_logprobs, ref_top, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(lp, g.top_ids, axis=-1), g.top_logprobs, atol=1e-4)
    np.testing.assert_allclose(g.token_logprobs, lp[np.arange(len(g.tokens)), g.tokens], atol=1e-4)
    assert (g.top_ids[:, 0] == g.tokens).all()  # greedy picks the most likely token


def test_prefix_equals_prepended_context(model, sampler):
  ctx = make_prompts([7], seed=1)[0]
  p = len(ctx)
  k, v = model.layer_kv(jnp.asarray([ctx], jnp.int32), jnp.arange(p)[None])  # [L, 1, P, Hkv, D]
  prefix = Prefix(k, v, jnp.ones((1, p), bool))
  kw = dict(max_new_tokens=10, top_k_logprobs=5)  # same programs as the other greedy tests
  with_prefix = sampler.generate(PROMPTS, prefix=prefix, position_offset=p, **kw)
  prepended = sampler.generate([ctx + q for q in PROMPTS], **kw)
  assert with_prefix.tokens == prepended.tokens
  np.testing.assert_allclose([g.top_logprobs for g in with_prefix],
                             [g.top_logprobs for g in prepended], atol=1e-4)
  without = sampler.generate(PROMPTS, **kw)
  assert without.tokens != with_prefix.tokens  # the prefix matters

  # One context per prompt (Bp == len(prompts)), batch padded from 3 to the bucket of 4.
  ctxs = make_prompts([7, 7, 7], seed=2)
  k, v = model.layer_kv(jnp.asarray(ctxs, jnp.int32), jnp.tile(jnp.arange(p)[None], (3, 1)))
  per_row = sampler.generate(PROMPTS[:3], position_offset=p,
                             prefix=Prefix(k, v, jnp.ones((3, p), bool)), **kw)
  prepended = sampler.generate([c + q for c, q in zip(ctxs, PROMPTS[:3])], **kw)
  assert per_row.tokens == prepended.tokens


def test_stop_ids_end_rows(sampler):
  ref = sampler.generate(PROMPTS, max_new_tokens=16, top_k_logprobs=5).tokens
  stop = {ref[0][2], ref[2][5]}
  res = sampler.generate(PROMPTS, max_new_tokens=16, stop_ids=sorted(stop), top_k_logprobs=5)
  for r, g in zip(ref, res):
    cut = next((i for i, t in enumerate(r) if t in stop), None)
    if cut is None:
      assert g.tokens.tolist() == r and g.finish_reason == "length"
    else:
      assert g.tokens.tolist() == r[:cut + 1] and g.finish_reason == "stop"
      assert len(g.token_logprobs) == cut + 1
  assert res[0].finish_reason == "stop" and len(res[0].tokens) <= 3


def _first_line_cut(ids, newline, text):
  """answer_length's rule (cas.model.tokenizer) over tables: the length up to and including the
  first newline id that follows a text id; the whole sequence if there is none."""
  seen = False
  for j, t in enumerate(ids):
    if newline[t] and seen:
      return j + 1
    seen = seen or bool(text[t])
  return len(ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_line_stop_ends_rows_at_their_first_nonempty_line(sampler, temperature):
  """A row stops right after the line break that ends its first non-empty line; its tokens and
  log-probs up to there are those of the generation without the stop (completion format's cut),
  and rows that never end a line run on as before."""
  from cas.model.tokenizer import LineStop
  kw = dict(max_new_tokens=24, top_k_logprobs=5, temperature=temperature, seed=3)
  ref = sampler.generate(PROMPTS, **kw)
  # tables from the reference itself, so that rows end at different steps (one never does)
  newline, text = np.zeros(V, bool), np.zeros(V, bool)
  r0, r1, r2 = ref[0].tokens.tolist(), ref[1].tokens.tolist(), ref[2].tokens.tolist()
  text[[r0[0], r1[1]]] = True
  newline[[t for t in (r0[3], r1[9], r2[0]) if not text[t]]] = True
  res = sampler.generate(PROMPTS, line_stop=LineStop(newline, text), **kw)
  cut_somewhere = False
  for r, g in zip(ref, res):
    toks = r.tokens.tolist()
    n = _first_line_cut(toks, newline, text)
    assert g.tokens.tolist() == toks[:n]
    np.testing.assert_array_equal(g.token_logprobs, r.token_logprobs[:n])
    np.testing.assert_array_equal(g.top_ids, r.top_ids[:n])
    assert g.finish_reason == ("stop" if n < len(toks) else r.finish_reason)
    cut_somewhere |= n < len(toks)
  assert cut_somewhere
  # tables shorter than the model's vocabulary (a tokenizer without the padded ids) mark nothing there
  none = LineStop(np.zeros(V - 1, bool), np.zeros(V - 1, bool))
  assert sampler.generate(PROMPTS, line_stop=none, **kw).tokens == ref.tokens
  with pytest.raises(ValueError, match="both newline and text"):
    sampler.generate(PROMPTS, line_stop=LineStop(newline | text, text), **kw)
  with pytest.raises(ValueError, match="line_stop.newline"):
    sampler.generate(PROMPTS, line_stop=LineStop(np.zeros(V + 1, bool), np.zeros(V, bool)), **kw)


def test_temperature_sampling_seeded(sampler):
  kw = dict(max_new_tokens=16, temperature=1.5)
  a = sampler.generate(PROMPTS, seed=0, **kw).tokens
  b = sampler.generate(PROMPTS, seed=0, **kw).tokens
  c = sampler.generate(PROMPTS, seed=1, **kw).tokens
  greedy = sampler.generate(PROMPTS, max_new_tokens=16, top_k_logprobs=5).tokens
  assert a == b
  assert a != c
  assert a != greedy
  # A row's sample does not depend on the batch it was padded into.
  assert sampler.generate(PROMPTS[:1], seed=0, **kw).tokens[0] == a[0]
  # Any Python int is a valid seed (taken modulo 2**32).
  assert sampler.generate(PROMPTS, seed=2**31, **kw).tokens != a


def test_tiny_top_p_is_greedy(sampler):
  greedy = sampler.generate(PROMPTS, max_new_tokens=12, top_k_logprobs=5).tokens
  nucleus = sampler.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3,
                             top_k_logprobs=V)
  assert nucleus.tokens == greedy


def test_top_p_samples_stay_in_nucleus(sampler):
  top_p = 0.5
  res = sampler.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_p=top_p,
                         top_k_logprobs=V, seed=5)
  outside_greedy = 0
  for g in res:
    probs = np.exp(g.top_logprobs)  # [n, V] sorted descending
    rank = np.argmax(g.top_ids == g.tokens[:, None], axis=-1)  # [n]
    mass_before = np.cumsum(probs, axis=-1) - probs
    assert (mass_before[np.arange(len(rank)), rank] < top_p + 1e-5).all()
    outside_greedy += int((rank > 0).sum())
  assert outside_greedy > 0  # it does sample, not just argmax


def test_top_p_filter_keeps_smallest_set():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
  assert kept(0.4) == [False, True, False, False]
  assert kept(0.6) == [False, True, False, True]
  assert kept(0.85) == [False, True, True, True]
  assert kept(1.0) == [True, True, True, True]


def test_compiles_once_per_bucket(model):
  s = Sampler(model, pad_id=PAD)
  for n in (5, 9, 17, 30):
    out = s.generate(make_prompts([n], seed=n), max_new_tokens=8, top_k_logprobs=5)
    assert out[0].num_prompt_tokens == n and len(out[0].tokens) == 8
  assert s.num_compilations == 1
  s.generate(make_prompts([4, 6]), max_new_tokens=3, top_k_logprobs=5)  # new batch bucket
  assert s.num_compilations == 2
  before = s.generate(make_prompts([6, 4]), max_new_tokens=15, top_k_logprobs=5).tokens
  assert s.num_compilations == 2
  # New weights of the same shapes: parameters are program arguments, so no recompilation.
  s.update_model(build_model(model.cfg, seed=7))
  after = s.generate(make_prompts([6, 4]), max_new_tokens=15, top_k_logprobs=5).tokens
  assert s.num_compilations == 2
  assert after != before


def test_offsets_chunking_and_edge_cases(model, sampler):
  # Without a prefix RoPE makes a uniform position shift invisible; with one, offsets matter.
  ctx = make_prompts([7], seed=1)[0]
  k, v = model.layer_kv(jnp.asarray([ctx], jnp.int32), jnp.arange(7)[None])
  prefix = Prefix(k, v, jnp.ones((1, 7), bool))
  offsets = [7, 12, 30]
  prompts = PROMPTS[:3]
  kw = dict(max_new_tokens=6, prefix=prefix, top_k_logprobs=5)
  batched = sampler.generate(prompts, position_offset=offsets, **kw)
  assert batched.tokens != sampler.generate(prompts, position_offset=7, **kw).tokens
  # Batch larger than the largest bucket: split into chunks (here one prompt per chunk).
  singles = Sampler(model, pad_id=PAD, batch_buckets=(1,))
  assert singles.generate(prompts, position_offset=offsets, **kw).tokens == batched.tokens
  assert singles.num_compilations == 1

  empty = sampler.generate(prompts, max_new_tokens=0, top_k_logprobs=3)
  assert [g.tokens.shape for g in empty] == [(0,)] * 3 and empty[0].top_ids.shape == (0, 3)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler.generate([[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sampler.generate([[V]], max_new_tokens=2)
  with pytest.raises(ValueError, match="prefix batch"):
    k = jnp.zeros((2, 2, 4, 2, 16))
    sampler.generate([[1]] * 3, max_new_tokens=2, prefix=Prefix(k, k, jnp.ones((2, 4), bool)))


def test_generate_shared_prefills_the_common_tokens_once(sampler):
  """Prompts with a long common start: the same tokens and log-probs as `generate` (greedy and
  sampled), full prompt lengths reported, and the compiled program attends a shared prefix."""
  rng = np.random.default_rng(5)
  common = rng.integers(1, V, 150).tolist()
  prompts = [common + rng.integers(1, V, int(rng.integers(1, 12))).tolist() for _ in range(5)]
  for kw in (dict(top_k_logprobs=4), dict(temperature=0.8, seed=3)):
    a = sampler.generate(prompts, max_new_tokens=10, **kw)
    before = set(sampler._programs)
    b = sampler.generate_shared(prompts, max_new_tokens=10, **kw)
    new = set(sampler._programs) - before
    for x, y, p in zip(a, b, prompts):
      np.testing.assert_array_equal(x.tokens, y.tokens)
      np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
      np.testing.assert_allclose(x.top_logprobs, y.top_logprobs, atol=1e-4)
      assert y.num_prompt_tokens == len(p)
    assert not new or all(k[-1] is not None for k in new)  # any new program has a prefix
  assert any(k[-1] is not None for k in sampler._programs)
  # below min_shared (or a single prompt) it is plain generate
  short = [p[140:] for p in prompts]
  np.testing.assert_array_equal(sampler.generate_shared(short, max_new_tokens=4)[0].tokens,
                                sampler.generate(short, max_new_tokens=4)[0].tokens)


def test_unrolled_layer_loop_decodes_the_same_tokens_and_logprobs(model, sampler):
  """layer_loop="unrolled" (one flat program per decode step: the lever for a launch-bound GPU decode,
  benchmarks/synth_speed.py --layer_loop) gives the scan loop's tokens and log-probs: greedy, seeded
  sampling, and with a shared prompt start."""
  graphdef, state = nnx.split(model)
  flat = nnx.merge(graphdef, state)
  flat.layer_loop = "unrolled"
  other = Sampler(flat, pad_id=PAD)
  rng = np.random.default_rng(7)
  common = rng.integers(1, V, 100).tolist()
  shared = [common + rng.integers(1, V, int(rng.integers(1, 9))).tolist() for _ in range(3)]
  for call, prompts, kw in (("generate", PROMPTS, dict(top_k_logprobs=5)),
                            ("generate", PROMPTS, dict(temperature=1.3, seed=4, top_k_logprobs=3)),
                            ("generate_shared", shared, dict(temperature=0.9, seed=1, top_k_logprobs=4))):
    a = getattr(sampler, call)(prompts, max_new_tokens=12, **kw)
    b = getattr(other, call)(prompts, max_new_tokens=12, **kw)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.tokens, y.tokens)
      np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
      np.testing.assert_allclose(x.top_logprobs, y.top_logprobs, atol=1e-4)
  assert other._graphdef != sampler._graphdef  # the other loop really was traced


def _same_generations(got, ref, atol=1e-5):
  assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=atol)
    np.testing.assert_array_equal(g.top_ids, r.top_ids)
    assert g.num_prompt_tokens == r.num_prompt_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refilled_rows_give_each_prompt_its_own_generation(model, sampler, temperature):
  """Continuous batching (`slots`): 9 prompts of different lengths through 3 rows, refilled one or
  two at a time as rows finish (stop ids end some early), give every prompt the tokens and
  log-probs of running it alone (its index in the call keys its sampling), with and without a
  shared prefix (a document prefilled once) and a line stop."""
  from cas.model.tokenizer import LineStop
  prompts = make_prompts([3, 8, 13, 20, 5, 30, 2, 11, 7], seed=4)
  kw = dict(max_new_tokens=20, top_k_logprobs=4, temperature=temperature, seed=5)
  ref = sampler.generate(prompts, **kw)
  stop = sorted({ref[1].tokens[3], ref[4].tokens[0], ref[6].tokens[9]})
  kw["stop_ids"] = stop
  ref = sampler.generate(prompts, **kw)
  assert {g.finish_reason for g in ref} == {"stop", "length"}
  for rows in (1, 2):
    _same_generations(sampler.generate(prompts, slots=3, refill_rows=rows, **kw), ref)
  # alone: the prompt's sampling is keyed by its index, so a single prompt runs with its own row
  for i in (0, 5, 8):
    alone = Sampler(model, pad_id=PAD).generate([prompts[i]], **kw) if temperature == 0 else None
    if alone is not None:
      assert alone.tokens[0] == ref.tokens[i]
  # a shared document prefix, attended once (generate_shared) and a line stop
  doc = make_prompts([70], seed=9)[0]
  shared = [doc + p for p in prompts]
  newline, text = np.zeros(V, bool), np.zeros(V, bool)
  newline[[t for t in ref[2].tokens[4:6].tolist()]] = True
  text[[t for t in ref[2].tokens[:2].tolist() if not newline[t]]] = True
  kw["line_stop"] = LineStop(newline, text)
  ref = sampler.generate_shared(shared, **kw)
  _same_generations(sampler.generate_shared(shared, slots=4, **kw), ref)


def test_refill_falls_back_and_checks_its_arguments(model, sampler):
  prompts = make_prompts([3, 8, 13], seed=4)
  kw = dict(max_new_tokens=6, top_k_logprobs=2)
  ref = sampler.generate(prompts, **kw)
  assert sampler.generate(prompts, slots=8, **kw).tokens == ref.tokens  # fewer prompts than slots
  ctx = [make_prompts([5], seed=i)[0] for i in range(3)]  # a prefix per prompt: plain generate
  k, v = model.layer_kv(jnp.asarray(ctx, jnp.int32), jnp.broadcast_to(jnp.arange(5), (3, 5)))
  prefix = Prefix(k, v, jnp.ones((3, 5), bool))
  assert (sampler.generate(prompts, slots=1, prefix=prefix, position_offset=5, **kw).tokens
          == sampler.generate(prompts, prefix=prefix, position_offset=5, **kw).tokens)
  with pytest.raises(ValueError, match="slots must be >= 1"):
    sampler.generate(prompts, slots=0, **kw)
  with pytest.raises(ValueError, match="refill_rows must be in"):
    sampler.generate(prompts, slots=2, refill_rows=3, **kw)
