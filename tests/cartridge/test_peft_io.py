"""PEFT CARTRIDGE interop: a cas cartridge exported as a PEFT adapter gives transformers + peft
the same logits as cas with the cartridge (and an adapter made by peft imports into cas).

Tiny random Llama: fp32 on both sides, max-abs logits difference <= 1e-4 (measured 2e-6).
Default model (SmolLM2-135M-Instruct GGUF, dequantized to fp32 on both sides): <= 1e-3, like
tests/model/test_smollm2_real.py (measured 1.2e-4); skipped when the GGUF is not in the cas cache.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cas.cartridge.cartridge import Cartridge, CartridgeError, init_cartridge  # noqa: E402
from cas.cartridge.compose import compose  # noqa: E402
from cas.cartridge.peft_io import (ADAPTER_CONFIG, export_peft, from_prompt_embeddings,  # noqa: E402
                                   import_peft, to_prompt_embeddings)
from cas.model import ModelConfig, Prefix, build_model, params_from_hf  # noqa: E402

TINY_ATOL = 1e-4
REAL_ATOL = 1e-3


class TinyPair:
  """A random transformers LlamaForCausalLM (GQA, 2 layers) and the same weights in cas."""

  def __init__(self, seed: int = 0):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=256)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
      for name, p in hf.named_parameters():
        if "norm" in name:
          p.uniform_(0.5, 1.5)
        else:
          p.normal_(0.0, 0.1)
    self.hf = hf
    self.cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), source="tiny llama")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    self.model = build_model(self.cfg, params_from_hf(self.cfg, sd, source="tiny llama"))


@pytest.fixture(scope="module")
def tiny():
  return TinyPair()


def cas_logits(model, cart_kv, prompt, offset=None) -> np.ndarray:
  """cas logits [T, V] f32 of `prompt` after cartridge keys/values [L, P, Hkv, D]."""
  k, v = (jnp.asarray(a, jnp.float32) for a in cart_kv)
  P = k.shape[1]
  prefix = Prefix(k[:, None], v[:, None], jnp.ones((1, P), bool))
  off = P if offset is None else offset
  pos = jnp.arange(off, off + len(prompt), dtype=jnp.int32)[None]
  logits, _ = model(jnp.asarray([prompt], jnp.int32), pos, prefix=prefix)
  return np.asarray(logits[0])


def peft_logits(hf, adapter_dir, prompt) -> np.ndarray:
  """transformers + peft logits [T, V] f32 of `prompt` with the adapter loaded from disk."""
  pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
  with torch.no_grad():
    ids = torch.tensor([prompt])
    return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()


def trained_like(model, tokens, p, seed=0) -> Cartridge:
  """A cartridge initialised from `tokens` then moved off any real KV (like training does)."""
  c = init_cartridge(model, tokens, p, sink_ids=[1], num_frozen=1)
  rng = np.random.default_rng(seed)
  k = np.asarray(c.k[...]) + 0.5 * rng.standard_normal(c.k.shape).astype(np.float32)
  v = np.asarray(c.v[...]) + 0.5 * rng.standard_normal(c.v.shape).astype(np.float32)
  return Cartridge(c.frozen_k[...], c.frozen_v[...], k, v)


def test_layout_round_trip_is_exact():
  rng = np.random.default_rng(0)
  k = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)
  v = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)
  emb = to_prompt_embeddings(k, v)
  assert emb.shape == (5, 3 * 2 * 2 * 4)
  # PEFT's view: [P, 2L, Hkv, D] with slot 2l = keys of layer l, 2l+1 = values.
  view = emb.reshape(5, 6, 2, 4)
  np.testing.assert_array_equal(view[:, 2], k[1])
  np.testing.assert_array_equal(view[:, 5], v[2])
  k2, v2 = from_prompt_embeddings(emb, 3, 2, 4)
  np.testing.assert_array_equal(k2, k)
  np.testing.assert_array_equal(v2, v)


def test_export_import_round_trip(tmp_path, tiny):
  rng = np.random.default_rng(1)
  cart = trained_like(tiny.model, list(rng.integers(2, 128, 12)), 9)
  path = export_peft(str(tmp_path / "a"), cart, model_fingerprint="fp", info={"doc_id": "d1"})
  cfg = json.load(open(os.path.join(path, ADAPTER_CONFIG)))
  assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["num_frozen_tokens"]) == ("CARTRIDGE", 9, 1)
  assert (cfg["num_attention_heads"], cfg["token_dim"], cfg["num_layers"]) == (2, 32, 2)
  back, meta = import_peft(path, model_cfg=tiny.cfg)
  assert back.spec == cart.spec and meta["cas"]["doc_id"] == "d1"
  for a, b in zip(back.full_kv(), cart.full_kv()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-exact in float32
  # bfloat16 export: import equals the bf16-rounded cartridge.
  p16 = export_peft(str(tmp_path / "b"), cart, dtype="bfloat16")
  b16, _ = import_peft(p16)
  np.testing.assert_array_equal(np.asarray(b16.k[...]),
                                np.asarray(cart.k[...].astype(jnp.bfloat16).astype(jnp.float32)))
  # peft reads our config and weights as a CARTRIDGE adapter.
  pc = peft.PeftConfig.from_pretrained(path)
  assert pc.peft_type == peft.PeftType.CARTRIDGE and pc.num_frozen_tokens == 1
  with pytest.raises(CartridgeError, match="already exists"):
    export_peft(path, cart)
  wrong = ModelConfig(**{**tiny.cfg.__dict__, "num_kv_heads": 1, "num_heads": 2})
  with pytest.raises(CartridgeError, match="Hkv"):
    import_peft(path, model_cfg=wrong)


def test_cas_cartridge_in_peft_gives_same_logits(tmp_path, tiny):
  rng = np.random.default_rng(2)
  cart = trained_like(tiny.model, list(rng.integers(2, 128, 20)), 16)
  path = export_peft(str(tmp_path / "c"), cart)
  prompt = [int(t) for t in rng.integers(2, 128, 11)]
  theirs = peft_logits(tiny.hf, path, prompt)
  imported, _ = import_peft(path, model_cfg=tiny.cfg)
  ours = cas_logits(tiny.model, imported.full_kv(), prompt)
  err = float(np.abs(ours - theirs).max())
  print(f"tiny llama: cas vs transformers+peft max-abs logits error {err:.2e}")
  assert np.abs(theirs).max() > 1.0 and err <= TINY_ATOL
  # The cartridge matters: without it the logits are far off.
  with torch.no_grad():
    plain = tiny.hf(input_ids=torch.tensor([prompt])).logits[0].numpy()
  assert np.abs(plain - theirs).max() > 100 * TINY_ATOL


def test_peft_made_adapter_imports_into_cas(tmp_path, tiny):
  """An adapter initialised by peft from a prefill (its paper option 3) equals cas' own
  init_cartridge of the same tokens, and gives the same logits."""
  rng = np.random.default_rng(3)
  tokens = [int(t) for t in rng.integers(2, 128, 10)]
  cfg = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, num_frozen_tokens=1)
  hf = TinyPair().hf  # get_peft_model wraps the model in place; keep the shared one clean
  pm = peft.get_peft_model(hf, cfg)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor([tokens]), use_cache=True)
  from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values
  initialize_kv_prefix_from_past_key_values(pm, past_key_values=out.past_key_values)
  pm.save_pretrained(str(tmp_path / "p"))
  cart, meta = import_peft(str(tmp_path / "p"), model_cfg=tiny.cfg)
  assert meta["cas"] is None and cart.spec.num_tokens == 10 and cart.spec.num_frozen == 1
  ref = init_cartridge(tiny.model, tokens[1:], 10, sink_ids=tokens[:1])  # sink + document
  for a, b in zip(cart.full_kv(), ref.full_kv()):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  prompt = [int(t) for t in rng.integers(2, 128, 7)]
  ours = cas_logits(tiny.model, cart.full_kv(), prompt)
  theirs = peft_logits(TinyPair().hf, str(tmp_path / "p"), prompt)
  assert float(np.abs(ours - theirs).max()) <= TINY_ATOL


def test_sequential_composition_exports_shared_refused(tmp_path, tiny):
  rng = np.random.default_rng(4)
  a = trained_like(tiny.model, list(rng.integers(2, 128, 12)), 8, seed=1)
  b = trained_like(tiny.model, list(rng.integers(2, 128, 12)), 8, seed=2)
  k, v, off = compose([a, b], mode="sequential", inv_freq=tiny.model.inv_freq[...])
  path = export_peft(str(tmp_path / "ab"), (k, v), num_frozen=1, position_offset=off)
  prompt = [int(t) for t in rng.integers(2, 128, 9)]
  theirs = peft_logits(tiny.hf, path, prompt)
  ours = cas_logits(tiny.model, (k, v), prompt, offset=off)
  assert float(np.abs(ours - theirs).max()) <= TINY_ATOL
  ks, vs, offs = compose([a, b], mode="shared")
  with pytest.raises(CartridgeError, match="no PEFT equivalent"):
    export_peft(str(tmp_path / "shared"), (ks, vs), num_frozen=1, position_offset=offs)


def test_default_model_parity(tmp_path):
  """SmolLM2-135M-Instruct (the default GGUF): same logits through transformers + peft."""
  from cas.model import fetch
  path = fetch.default_model_path()
  if not path.is_file():
    pytest.skip(f"{path} is missing: run `python -m launch.fetch_model` to run this test")
  from cas.model.loader import load_model
  lm = load_model()
  from tests.hf_reference import hf_from_gguf
  hf = hf_from_gguf(path)  # the GGUF read by transformers, kept after the suite's first read
  doc = ("The lighthouse keeper of Varnholm, Edda Lindqvist, logged every ship that passed the "
         "northern strait between 1921 and 1958, and her ledgers are kept in the town museum.")
  ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(doc)
  c = init_cartridge(lm.model, ids[1:], 24, sink_ids=ids[:1])
  rng = np.random.default_rng(5)
  cart = Cartridge(c.frozen_k[...], c.frozen_v[...],
                   np.asarray(c.k[...]) + 0.1 * rng.standard_normal(c.k.shape).astype(np.float32),
                   np.asarray(c.v[...]) + 0.1 * rng.standard_normal(c.v.shape).astype(np.float32))
  out = export_peft(str(tmp_path / "smol"), cart, base_model_name_or_path=str(path),
                    model_fingerprint=lm.fingerprint)
  prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Who kept the lighthouse?"}])
  theirs = peft_logits(hf, out, prompt)
  imported, meta = import_peft(out, model_cfg=lm.config)
  assert meta["cas"]["model_fingerprint"] == lm.fingerprint
  ours = cas_logits(lm.model, imported.full_kv(), prompt)
  err = float(np.abs(ours - theirs).max())
  print(f"SmolLM2-135M: cas vs transformers+peft max-abs logits error {err:.2e}")
  assert err <= REAL_ATOL
  assert int(np.argmax(ours[-1])) == int(np.argmax(theirs[-1]))
