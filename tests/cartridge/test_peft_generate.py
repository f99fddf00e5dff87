"""Greedy generation in transformers + peft with a cartridge equals cas' own greedy decoding.

transformers >= 5.24 with peft 0.19 .. 0.21.2: `PeftModel.generate` ignores a CARTRIDGE adapter
(docs/PEFT_GENERATE.md); `cas.cartridge.peft_io.generate_with_cartridge` is the working path.
Each test compares token lists exactly: tiny random Llama in fp32, and the default model
(SmolLM2-135M-Instruct GGUF, dequantized to fp32 on both sides; skipped when the file is absent).
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cas.cartridge.cartridge import Cartridge, CartridgeError, init_cartridge  # noqa: E402
from cas.cartridge.io import load_cartridge, save_cartridge  # noqa: E402
from cas.cartridge.peft_io import (export_peft, generate_with_cartridge, import_peft,  # noqa: E402
                                   known_peft_generate_broken, peft_cartridge_kv,
                                   peft_generate_is_broken, probe_peft_generate)
from cas.model import Prefix  # noqa: E402
from cas.model.sampler import Sampler  # noqa: E402
from tests.cartridge.test_peft_io import TinyPair, trained_like  # noqa: E402
from tests.hf_reference import hf_from_gguf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_EOS, TINY_PAD = 2, 0
N_NEW = 12
BROKEN = peft_generate_is_broken(probe_unknown=True)  # the warning for the installed versions, or None


@pytest.fixture(scope="module")
def tiny():
  pair = TinyPair()
  pair.sampler = Sampler(pair.model, pad_id=TINY_PAD)
  return pair


def cas_greedy(sampler: Sampler, cart_kv, prompts: list[list[int]], n: int, stop_ids) -> list[list[int]]:
  """cas greedy tokens after each prompt; cart_kv: (k, v) [L, P, Hkv, D] or None (no cartridge).
  The stop token is kept, nothing after it."""
  if cart_kv is None:
    return sampler.generate(prompts, max_new_tokens=n, stop_ids=stop_ids).tokens
  k, v = (jnp.asarray(a, jnp.float32) for a in cart_kv)
  P = k.shape[1]
  prefix = Prefix(k[:, None], v[:, None], jnp.ones((1, P), bool))
  return sampler.generate(prompts, max_new_tokens=n, prefix=prefix, position_offset=P,
                          stop_ids=stop_ids).tokens


def left_padded(prompts: list[list[int]], pad: int):
  """prompts -> input_ids [B, T] int64 (left padding with `pad`), attention_mask [B, T]."""
  T = max(map(len, prompts))
  ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
  return ids, mask


def new_tokens(out, width: int, eos: int | tuple[int, ...]) -> list[list[int]]:
  """Rows of generate's sequences [B, width + new] -> the new tokens up to and including the
  first stop id (`eos`: one id or several)."""
  stops = set(eos) if isinstance(eos, tuple) else {eos}
  rows = []
  for row in out[:, width:].tolist():
    ends = [i for i, t in enumerate(row) if t in stops]
    rows.append(row[:ends[0] + 1] if ends else row)
  return rows


def hf_greedy(model, prompts, n, *, eos, pad, **kw) -> list[list[int]]:
  """Greedy tokens of `generate_with_cartridge` for a left-padded batch of prompts."""
  ids, mask = left_padded(prompts, pad)
  with torch.no_grad():
    out = generate_with_cartridge(model, ids, mask, max_new_tokens=n, do_sample=False,
                                  eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
                                  pad_token_id=pad, **kw)
  return new_tokens(out, ids.shape[1], eos)


def test_exported_cartridge_generates_like_cas(tmp_path, tiny):
  rng = np.random.default_rng(11)
  cart = trained_like(tiny.model, [int(t) for t in rng.integers(3, 128, 20)], 16)
  path = export_peft(str(tmp_path / "a"), cart)
  prompts = [[int(t) for t in rng.integers(3, 128, n)] for n in (11, 7)]
  ours = cas_greedy(tiny.sampler, cart.full_kv(), prompts, N_NEW, [TINY_EOS])
  plain = cas_greedy(tiny.sampler, None, prompts, N_NEW, [TINY_EOS])
  print("cas greedy with the cartridge:", ours, "without:", plain)
  assert ours != plain  # the cartridge changes the answer
  pm = peft.PeftModel.from_pretrained(tiny.hf, path).eval()
  kw = dict(eos=TINY_EOS, pad=TINY_PAD)
  assert hf_greedy(pm, prompts, N_NEW, **kw) == ours  # the PeftModel's adapter
  assert hf_greedy(pm, prompts, N_NEW, new_tokens_only=False, **kw) == ours  # transformers 4.x path
  assert hf_greedy(tiny.hf, prompts, N_NEW, cartridge=path, **kw) == ours  # adapter directory
  assert hf_greedy(tiny.hf, prompts, N_NEW, cartridge=cart, **kw) == ours  # cas Cartridge
  # The adapter read from the PeftModel is the exported cartridge, bit for bit.
  k, v = peft_cartridge_kv(pm)
  np.testing.assert_array_equal(k.detach().numpy(), np.asarray(cart.full_kv()[0]))
  np.testing.assert_array_equal(v.detach().numpy(), np.asarray(cart.full_kv()[1]))
  # peft's own generate: the base model's tokens where the installed versions are affected.
  ids = torch.tensor([prompts[0]])
  with torch.no_grad():
    theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                         do_sample=False, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
  print(f"PeftModel.generate ({'broken' if BROKEN else 'working'} versions):", new_tokens(theirs, 11, TINY_EOS))
  assert new_tokens(theirs, 11, TINY_EOS)[0] == (plain[0] if BROKEN else ours[0])
  with pytest.raises(CartridgeError, match="not both"):
    generate_with_cartridge(pm, ids, cartridge=cart, max_new_tokens=1)
  with pytest.raises(CartridgeError, match="needs `cartridge`"):
    generate_with_cartridge(tiny.hf, ids, max_new_tokens=1)


def run_launch_peft(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, "-m", "launch.peft", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_peft_made_adapter_through_launch_import_generates_like_cas(tmp_path, tiny):
  """peft makes an adapter (prefill of a document, then moved), `launch.peft import` brings it into
  cas, and cas greedy equals transformers greedy with the adapter; the CLI warns iff affected."""
  rng = np.random.default_rng(12)
  doc = [int(t) for t in rng.integers(3, 128, 10)]
  hf = TinyPair().hf  # get_peft_model wraps the model in place; keep the shared one clean
  pm = peft.get_peft_model(hf, peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                    num_frozen_tokens=1))
  with torch.no_grad():
    out = hf(input_ids=torch.tensor([doc]), use_cache=True)
  from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values
  initialize_kv_prefix_from_past_key_values(pm, past_key_values=out.past_key_values)
  with torch.no_grad():  # like a trained adapter: away from any real prefill
    pm.prompt_encoder["default"].trainable_embedding.add_(0.5 * torch.randn(9, 2 * 2 * 32))
  pm.save_pretrained(str(tmp_path / "p"))
  tiny.hf.save_pretrained(str(tmp_path / "tiny_hf"))  # the model dir for the imported cartridge's fingerprint
  res = run_launch_peft("import", f"--adapter={tmp_path / 'p'}", f"--out={tmp_path / 'c'}",
                        f"--model_path={tmp_path / 'tiny_hf'}")
  assert ("PeftModel.generate() ignores a CARTRIDGE adapter" in res.stderr) == (BROKEN is not None)
  cart, _ = load_cartridge(str(tmp_path / "c"))
  assert cart.spec.num_tokens == 10 and cart.spec.num_frozen == 1
  prompts = [[int(t) for t in rng.integers(3, 128, n)] for n in (9, 5)]
  ours = cas_greedy(tiny.sampler, cart.full_kv(), prompts, N_NEW, [TINY_EOS])
  assert ours != cas_greedy(tiny.sampler, None, prompts, N_NEW, [TINY_EOS])
  pm.eval()
  assert hf_greedy(pm, prompts, N_NEW, eos=TINY_EOS, pad=TINY_PAD) == ours
  # export from a cas cartridge directory warns the same way
  save_cartridge(str(tmp_path / "c2"), cart, model_fingerprint="fp")
  res = run_launch_peft("export", f"--cartridge={tmp_path / 'c2'}", f"--out={tmp_path / 'q'}")
  assert ("PeftModel.generate() ignores a CARTRIDGE adapter" in res.stderr) == (BROKEN is not None)
  back, _ = import_peft(str(tmp_path / "q"))
  np.testing.assert_array_equal(np.asarray(back.full_kv()[0]), np.asarray(cart.full_kv()[0]))


def test_version_rule_agrees_with_behaviour():
  assert known_peft_generate_broken("5.23.0", "0.21.2") is False  # before the `cache` rename
  assert known_peft_generate_broken("4.57.6", "0.21.2") is False
  assert known_peft_generate_broken("5.24.0", "0.21.2") is True
  assert known_peft_generate_broken("5.25.0", "0.19.0") is True
  assert known_peft_generate_broken("5.25.0", "0.18.1") is False  # no CARTRIDGE in peft yet
  assert known_peft_generate_broken("5.25.0", "0.22.0") is None  # newer than checked: probed
  broken = probe_peft_generate()
  print(f"transformers {transformers.__version__} + peft {peft.__version__}: generate broken = {broken}")
  known = known_peft_generate_broken(metadata.version("transformers"), metadata.version("peft"))
  if known is not None:
    assert known == broken
  assert (BROKEN is not None) == broken
  if BROKEN:
    assert "generate_with_cartridge" in BROKEN and transformers.__version__ in BROKEN


def test_default_model_generate(tmp_path):
  """SmolLM2-135M-Instruct: an exported cas cartridge and a peft-made adapter give the same greedy
  answer in transformers (generate_with_cartridge) as in cas."""
  from cas.model import fetch
  path = fetch.default_model_path()
  if not path.is_file():
    pytest.skip(f"{path} is missing: run `python -m launch.fetch_model` to run this test")
  from cas.model.loader import load_model
  lm = load_model()
  tok = lm.tokenizer
  hf = hf_from_gguf(path)
  hf2 = hf_from_gguf(path)  # a second, untouched base for the peft-made adapter below
  sampler = Sampler(lm.model, pad_id=tok.pad_id)
  eos = tuple(tok.eos_ids)
  doc = ("The lighthouse keeper of Varnholm, Edda Lindqvist, logged every ship that passed the "
         "northern strait between 1921 and 1958, and her ledgers are kept in the town museum.")
  ids = [tok.bos_id] + tok.encode(doc)
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
             for q in ("Who kept the lighthouse of Varnholm?", "Where are the ledgers kept?")]
  n = 24
  kw = dict(eos=eos, pad=tok.pad_id)
  plain = cas_greedy(sampler, None, prompts, n, tok.eos_ids)

  # a cas cartridge (prefill + noise, like a trained one) exported to PEFT
  c = init_cartridge(lm.model, ids[1:], 24, sink_ids=ids[:1])
  rng = np.random.default_rng(13)
  cart = Cartridge(c.frozen_k[...], c.frozen_v[...],
                   np.asarray(c.k[...]) + 0.1 * rng.standard_normal(c.k.shape).astype(np.float32),
                   np.asarray(c.v[...]) + 0.1 * rng.standard_normal(c.v.shape).astype(np.float32))
  out = export_peft(str(tmp_path / "smol"), cart, base_model_name_or_path=str(path))
  ours = cas_greedy(sampler, cart.full_kv(), prompts, n, tok.eos_ids)
  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  theirs = hf_greedy(pm, prompts, n, **kw)
  print("SmolLM2, exported cartridge: cas", [tok.decode(t) for t in ours], "transformers",
        [tok.decode(t) for t in theirs], "no cartridge", [tok.decode(t) for t in plain])
  assert theirs == ours and ours != plain

  # an adapter made by peft from a prefill of the document, imported into cas
  pm2 = peft.get_peft_model(hf2, peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(ids),
                                                      num_frozen_tokens=1))
  with torch.no_grad():
    pkv = hf2(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
  from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values
  initialize_kv_prefix_from_past_key_values(pm2, past_key_values=pkv)
  pm2.save_pretrained(str(tmp_path / "made"))
  cart2, _ = import_peft(str(tmp_path / "made"), model_cfg=lm.config)
  ours2 = cas_greedy(sampler, cart2.full_kv(), prompts, n, tok.eos_ids)
  theirs2 = hf_greedy(pm2.eval(), prompts, n, **kw)
  print("SmolLM2, peft-made adapter: cas", [tok.decode(t) for t in ours2], "transformers",
        [tok.decode(t) for t in theirs2])
  assert theirs2 == ours2 and ours2 != plain
