"""A cas cartridge as a Hugging Face PEFT `CARTRIDGE` adapter, and back (peft >= 0.19).

    export_peft("out/doc_3-peft", cartridge, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    # transformers + peft:  PeftModel.from_pretrained(hf_model, "out/doc_3-peft")
    cart, meta = import_peft("out/doc_3-peft", model_cfg=lm.config)
    # generation in transformers: not PeftModel.generate (ignores the adapter on transformers >= 5.24
    # with peft <= 0.21.2, docs/PEFT_GENERATE.md) but
    out = generate_with_cartridge(peft_model, input_ids, attention_mask, max_new_tokens=64, do_sample=False)

peft is imported only by the generation helpers at the end; the format below was read from peft 0.21.2
(`peft/tuners/cartridge/{config,model,utils}.py`, `PeftModel.get_prompt`), where CARTRIDGE
exists since 0.19.0.

On-disk format (a directory):
  adapter_config.json        {"peft_type": "CARTRIDGE", "task_type": "CAUSAL_LM",
                              "num_virtual_tokens": P, "num_frozen_tokens": F, "num_layers": L,
                              "num_attention_heads": Hkv, "token_dim": Hkv * D,
                              "num_transformer_submodules": 1, "inference_mode": true, ...}
                             PEFT's GQA handling stores the number of KV heads (not query heads)
                             in `num_attention_heads` and `token_dim = Hkv * D`.
  adapter_model.safetensors  one tensor `prompt_embeddings` [P, L * 2 * Hkv * D]: a reshape of
                             [P, 2L, Hkv, D] whose slot 2l holds layer l's keys and slot 2l+1 its
                             values (`PeftModel.get_prompt` views it so, permutes to
                             [2L, B, Hkv, P, D] and splits it into per-layer (key, value) pairs
                             of a `DynamicCache`). The first F rows are PEFT's frozen
                             `frozen_embedding` (the attention sink), the rest `trainable_embedding`.
  cas_cartridge.json         cas' own metadata (spec, model fingerprint, doc ids); PEFT ignores it.

Mapping to a cas `Cartridge` (keys/values [L, P, Hkv, D], sink = first num_frozen tokens):
  prompt_embeddings.reshape(P, L, 2, Hkv, D)[:, l, 0] == k[l] and [:, l, 1] == v[l].
  num_frozen_tokens == Cartridge.spec.num_frozen.

RoPE convention: PEFT feeds the adapter as `past_key_values`, i.e. as cached keys *after* RoPE
(transformers caches rotated keys), at cache positions 0..P-1; the prompt then gets
`cache_position` (= position ids) P, P+1, ... because the cache already holds P tokens. cas stores
keys after RoPE at positions 0..P-1 and starts the prompt at P (`position_offset = P`), and cas'
RoPE is transformers' half-split ("rotate_half") layout for the same head order (`params_from_hf`
keeps HF's q/k projection layout; the GGUF loader undoes llama.cpp's permutation). So keys and
values map over unchanged, with no re-rotation.
The one difference: a PEFT prompt always starts at position P (the adapter's length). Several cas
cartridges composed in `sequential` mode satisfy this (their prompt offset is the total length),
so they export faithfully; `shared` composition (prompt at the single-cartridge P, all
cartridges at the same positions) has no PEFT equivalent and `export_peft` refuses it.
(peft's own `compose_cartridge_adapters` concatenates adapters unchanged, i.e. every part keeps
positions 0..P-1, its own sink, and the prompt starts after all of them: neither cas mode.)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from cas.cartridge.cartridge import Cartridge, CartridgeError, CartridgeSpec
from cas.fileio import replace_dir
from cas.model.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CAS_META = "cas_cartridge.json"
TENSOR = "prompt_embeddings"
PEFT_TYPE = "CARTRIDGE"
PEFT_VERSION = "0.21.2"  # the version whose format this module writes (recorded in the config)
DTYPES = ("float32", "float16", "bfloat16")


def to_prompt_embeddings(k: Any, v: Any) -> np.ndarray:
  """k, v [L, P, Hkv, D] (rotated keys, values) -> PEFT `prompt_embeddings` [P, L*2*Hkv*D] f32."""
  k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
  if k.ndim != 4 or k.shape != v.shape:
    raise CartridgeError(f"cartridge keys/values must both be [L, P, Hkv, D], got {k.shape} and {v.shape}")
  L, P, H, D = k.shape
  kv = np.stack([k, v], axis=1)  # [L, 2, P, Hkv, D]
  return np.ascontiguousarray(kv.transpose(2, 0, 1, 3, 4).reshape(P, L * 2 * H * D))  # [P, 2L*Hkv*D]


def from_prompt_embeddings(emb: Any, num_layers: int, num_kv_heads: int, head_dim: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """PEFT `prompt_embeddings` [P, L*2*Hkv*D] -> k, v [L, P, Hkv, D] f32."""
  emb = np.asarray(emb, np.float32)
  L, H, D = num_layers, num_kv_heads, head_dim
  if emb.ndim != 2 or emb.shape[1] != L * 2 * H * D:
    raise CartridgeError(f"{TENSOR} has shape {emb.shape}, expected [P, {L * 2 * H * D}] "
                         f"(L={L} * 2 * Hkv={H} * D={D})")
  kv = emb.reshape(emb.shape[0], L, 2, H, D).transpose(1, 2, 0, 3, 4)  # [L, 2, P, Hkv, D]
  return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1])


def peft_config_dict(spec: CartridgeSpec, *, base_model_name_or_path: str | None = None,
                     revision: str | None = None) -> dict:
  """The adapter_config.json that peft's `CartridgeConfig` reads for a cartridge of `spec`."""
  return {
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "inference_mode": True,
      "modules_to_save": None,
      "num_attention_heads": spec.num_kv_heads,
      "num_frozen_tokens": spec.num_frozen,
      "num_layers": spec.num_layers,
      "num_transformer_submodules": 1,
      "num_virtual_tokens": spec.num_tokens,
      "peft_type": PEFT_TYPE,
      "peft_version": PEFT_VERSION,
      "revision": revision,
      "task_type": "CAUSAL_LM",
      "token_dim": spec.num_kv_heads * spec.head_dim,
  }


def export_peft(path: str, cartridge: Cartridge | tuple[Any, Any], *, num_frozen: int | None = None,
                position_offset: int | None = None, base_model_name_or_path: str | None = None,
                model_fingerprint: str | None = None, info: dict | None = None,
                dtype: str = "float32", overwrite: bool = False) -> str:
  """Write `cartridge` as a PEFT CARTRIDGE adapter directory at `path`; returns its absolute path.

  cartridge: a `Cartridge`, or (k, v) [L, P, Hkv, D] (e.g. from `compose`, then pass
  `num_frozen` and the prompt `position_offset` that compose returned: it must equal P, see the
  module docstring). dtype: of the saved tensor ("float32", "float16" or "bfloat16").
  Written to a temporary sibling and renamed, so a reader never sees half an adapter.
  """
  if dtype not in DTYPES:
    raise CartridgeError(f"export_peft: dtype {dtype!r}; choose from {DTYPES}")
  if isinstance(cartridge, Cartridge):
    k, v = (np.asarray(a, np.float32) for a in cartridge.full_kv())
    spec = cartridge.spec
    if num_frozen is not None and num_frozen != spec.num_frozen:
      raise CartridgeError(f"export_peft: num_frozen={num_frozen} but the cartridge has {spec.num_frozen}")
  else:
    k, v = (np.asarray(a, np.float32) for a in cartridge)
    if num_frozen is None:
      raise CartridgeError("export_peft: pass num_frozen with raw (k, v) arrays")
    if k.ndim != 4 or k.shape != v.shape:
      raise CartridgeError(f"export_peft: k, v must both be [L, P, Hkv, D], got {k.shape} and {v.shape}")
    L, P, H, D = k.shape
    if not 0 <= num_frozen < P:
      raise CartridgeError(f"export_peft: num_frozen={num_frozen} must be in [0, P={P})")
    spec = CartridgeSpec(L, P, H, D, num_frozen)
  if position_offset is not None and position_offset != spec.num_tokens:
    raise CartridgeError(
        f"export_peft: the prompt of this cartridge starts at position {position_offset}, but a PEFT "
        f"adapter of {spec.num_tokens} tokens always starts it at {spec.num_tokens}; compose several "
        f"cartridges in 'sequential' mode to export them together ('shared' has no PEFT equivalent)")
  emb = to_prompt_embeddings(k, v)  # [P, L*2*Hkv*D] f32

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CartridgeError(f"{path}: already exists (pass overwrite=True to replace it)")
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  _save_tensor(os.path.join(tmp, ADAPTER_WEIGHTS), emb, dtype)
  with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
    json.dump(peft_config_dict(spec, base_model_name_or_path=base_model_name_or_path), f, indent=2,
              sort_keys=True)
  meta = {"format": "cas-peft-cartridge", "spec": dataclasses.asdict(spec),
          "model_fingerprint": model_fingerprint, "dtype": dtype, **(info or {})}
  with open(os.path.join(tmp, CAS_META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return replace_dir(tmp, path)


def read_peft_config(path: str) -> dict:
  """adapter_config.json of a PEFT CARTRIDGE adapter, checked (errors name the file and field)."""
  cp = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(cp):
    raise CartridgeError(f"{path}: not a PEFT adapter directory ({ADAPTER_CONFIG} missing)")
  try:
    with open(cp) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise CartridgeError(f"{cp}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict) or cfg.get("peft_type") != PEFT_TYPE:
    raise CartridgeError(f"{cp}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}, "
                         f"expected {PEFT_TYPE!r}")
  for field in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
    if not isinstance(cfg.get(field), int) or cfg[field] < 1:
      raise CartridgeError(f"{cp}: field {field!r} must be a positive int, got {cfg.get(field)!r}")
  cfg.setdefault("num_frozen_tokens", 1)  # CartridgeConfig's default
  cfg.setdefault("num_transformer_submodules", 1)
  if cfg["num_transformer_submodules"] != 1:
    raise CartridgeError(f"{cp}: num_transformer_submodules={cfg['num_transformer_submodules']}; only "
                         "decoder-only adapters (1) map to a cas cartridge")
  if cfg["token_dim"] % cfg["num_attention_heads"]:
    raise CartridgeError(f"{cp}: token_dim={cfg['token_dim']} is not a multiple of "
                         f"num_attention_heads={cfg['num_attention_heads']}")
  if not 0 <= cfg["num_frozen_tokens"] < cfg["num_virtual_tokens"]:
    raise CartridgeError(f"{cp}: num_frozen_tokens={cfg['num_frozen_tokens']} must be in "
                         f"[0, num_virtual_tokens={cfg['num_virtual_tokens']}) for a cas cartridge")
  return cfg


def import_peft(path: str, *, model_cfg: ModelConfig | None = None,
                expect_spec: CartridgeSpec | None = None) -> tuple[Cartridge, dict]:
  """Read a PEFT CARTRIDGE adapter directory into a cas `Cartridge` (float32).

  Returns (cartridge, meta) where meta = {"peft_config": ..., "cas": cas_cartridge.json or None}.
  model_cfg: refuse an adapter whose layers / KV heads / head dim do not fit this model.
  """
  cfg = read_peft_config(path)
  L, H = cfg["num_layers"], cfg["num_attention_heads"]
  D = cfg["token_dim"] // H
  P, F = cfg["num_virtual_tokens"], cfg["num_frozen_tokens"]
  if model_cfg is not None and (L, H, D) != (model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim):
    raise CartridgeError(
        f"{path}: adapter is for L={L}, Hkv={H}, D={D} (num_layers, num_attention_heads, token_dim / "
        f"num_attention_heads) but the model has L={model_cfg.num_layers}, Hkv={model_cfg.num_kv_heads}, "
        f"D={model_cfg.head_dim}")
  wp = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.isfile(wp):
    raise CartridgeError(f"{path}: {ADAPTER_WEIGHTS} missing (adapters saved with "
                         "safe_serialization=False are not supported)")
  emb = _load_tensor(wp, TENSOR)  # [P, L*2*Hkv*D] f32
  if emb.shape[0] != P:
    raise CartridgeError(f"{wp}: {TENSOR} has {emb.shape[0]} rows but num_virtual_tokens={P}")
  k, v = from_prompt_embeddings(emb, L, H, D)
  cart = Cartridge(k[:, :F], v[:, :F], k[:, F:], v[:, F:])
  if expect_spec is not None and cart.spec != expect_spec:
    raise CartridgeError(f"{path}: adapter has spec {cart.spec}, expected {expect_spec}")
  cas_meta = None
  mp = os.path.join(path, CAS_META)
  if os.path.isfile(mp):
    with open(mp) as f:
      cas_meta = json.load(f)
  return cart, {"peft_config": cfg, "cas": cas_meta}


# ----------------------------------------------------------------------------- safetensors

def _save_tensor(path: str, emb: np.ndarray, dtype: str) -> None:
  """emb [P, X] f32 -> safetensors file with one tensor named `prompt_embeddings` in `dtype`."""
  if dtype == "bfloat16":
    import jax.numpy as jnp
    from safetensors.flax import save_file as save_flax
    save_flax({TENSOR: jnp.asarray(emb, jnp.bfloat16)}, path, metadata={"format": "pt"})
  else:
    from safetensors.numpy import save_file
    save_file({TENSOR: emb.astype(dtype)}, path, metadata={"format": "pt"})


def _load_tensor(path: str, name: str) -> np.ndarray:
  """One tensor of a safetensors file as float32 numpy (any float dtype, bfloat16 included)."""
  from safetensors import SafetensorError, safe_open
  try:
    # framework="flax" reads bfloat16 too (numpy has no bfloat16 dtype).
    with safe_open(path, framework="flax") as f:
      names = list(f.keys())
      if name not in names:
        raise CartridgeError(f"{path}: tensor {name!r} missing (tensors: {names})")
      return np.asarray(f.get_tensor(name), np.float32)
  except SafetensorError as e:
    raise CartridgeError(f"{path}: cannot read safetensors file ({e})") from e


# ----------------------------------------------------------------------------- generation in transformers

# transformers renamed the KV-cache argument of the model forward and of
# `GenerationMixin.prepare_inputs_for_generation` from `past_key_values` to `cache` in 5.24.0.
# peft (every release with CARTRIDGE, 0.19.0 .. 0.21.2) still injects the adapter into
# `model_kwargs["past_key_values"]` during `generate`, next to the `cache` that transformers passes;
# the forward keeps `cache` (its own, empty) and drops `past_key_values`, so `PeftModel.generate`
# decodes as if there were no adapter. `PeftModel.forward` is unaffected. docs/PEFT_GENERATE.md.
GENERATE_BROKEN_FROM_TRANSFORMERS = "5.24.0"  # first transformers release with the `cache` rename
GENERATE_CHECKED_PEFT = "0.21.2"  # newest peft release checked (affected); later ones are probed


def known_peft_generate_broken(transformers_version: str, peft_version: str) -> bool | None:
  """Whether `PeftModel.generate` ignores a CARTRIDGE adapter with these versions, as measured
  (docs/PEFT_GENERATE.md): True for transformers >= 5.24.0 with peft 0.19.0 .. 0.21.2; False before
  transformers 5.24.0 or for a peft without CARTRIDGE (< 0.19); None (not known) for a peft newer
  than the last one checked on a transformers with the rename."""
  from packaging.version import Version
  tv, pv = Version(transformers_version), Version(peft_version)
  if pv < Version("0.19.0") or tv < Version(GENERATE_BROKEN_FROM_TRANSFORMERS):
    return False
  if pv > Version(GENERATE_CHECKED_PEFT):
    return None
  return True


def peft_generate_is_broken(probe_unknown: bool = True) -> str | None:
  """A warning if the installed transformers + peft ignore a CARTRIDGE adapter in `generate`, else None.

  Decided from the installed versions (importlib.metadata; nothing is imported) where they are
  known (`known_peft_generate_broken`); for a peft newer than the last checked release on
  transformers >= 5.24 by `probe_peft_generate` (a tiny random model; a few seconds with the
  imports) when `probe_unknown`, else None. None also when transformers, peft or torch is missing.
  """
  from importlib import metadata
  try:
    tv, pv = metadata.version("transformers"), metadata.version("peft")
    metadata.version("torch")
  except metadata.PackageNotFoundError:
    return None
  broken = known_peft_generate_broken(tv, pv)
  if broken is None:
    try:
      broken = probe_unknown and probe_peft_generate()
    except Exception as e:  # an untested combination may not even run the probe
      return (f"transformers {tv} + peft {pv}: could not check whether PeftModel.generate() uses a CARTRIDGE "
              f"adapter (probe failed: {type(e).__name__}: {e}); cas.cartridge.peft_io.generate_with_cartridge "
              "is the checked way to generate (docs/PEFT_GENERATE.md).")
    why = "a probe on a tiny random model generated the base model's tokens"
  else:
    why = (f"transformers >= {GENERATE_BROKEN_FROM_TRANSFORMERS} passes the KV cache as `cache`, peft "
           f"<= {GENERATE_CHECKED_PEFT} injects the adapter as `past_key_values`, which the model drops")
  if not broken:
    return None
  return (f"transformers {tv} + peft {pv}: PeftModel.generate() ignores a CARTRIDGE adapter and returns "
          f"the base model's text ({why}); PeftModel.forward() is unaffected. Generate with "
          "cas.cartridge.peft_io.generate_with_cartridge(peft_model, input_ids, ...) instead "
          "(docs/PEFT_GENERATE.md).")


def probe_peft_generate(num_new_tokens: int = 6) -> bool:
  """True if the installed `PeftModel.generate` ignores a CARTRIDGE adapter.

  Builds a tiny random Llama (fp32, 2 layers) with a random CARTRIDGE adapter and compares greedy
  `PeftModel.generate` with greedy decoding by full forward passes of the PeftModel (which uses the
  adapter): different tokens mean generate is broken. Needs torch, transformers and peft.
  """
  import torch
  import transformers
  import peft
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  state = torch.random.get_rng_state()
  try:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(base, peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                        num_frozen_tokens=1)).eval()
    with torch.no_grad():
      pm.prompt_encoder[pm.active_adapter].trainable_embedding.mul_(3.0)  # a cartridge that matters
      ids = torch.tensor([[1, 5, 9, 13, 17]])
      x = ids
      for _ in range(num_new_tokens):  # greedy by forward passes over the whole sequence
        nxt = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
      gen = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new_tokens,
                        do_sample=False, pad_token_id=0)
  finally:
    torch.random.set_rng_state(state)
  return gen[0, ids.shape[1]:].tolist() != x[0, ids.shape[1]:].tolist()


def cache_argument_name(model: Any) -> str:
  """The name under which `model.forward` / `model.generate` take a KV cache: "cache" on
  transformers >= 5.24, "past_key_values" before."""
  import inspect
  return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def peft_cartridge_kv(peft_model: Any) -> tuple[Any, Any]:
  """The active CARTRIDGE adapter of a peft `PeftModel` as torch k, v [L, P, Hkv, D] (keys after
  RoPE at positions 0..P-1), in the layout `PeftModel.get_prompt` reads (module docstring)."""
  cfg = peft_model.active_peft_config
  ptype = str(getattr(cfg.peft_type, "value", cfg.peft_type))
  if ptype != PEFT_TYPE or getattr(cfg, "num_transformer_submodules", 1) != 1:
    raise CartridgeError(f"generate_with_cartridge: the active adapter {peft_model.active_adapter!r} is a "
                         f"{ptype} adapter; expected a decoder-only {PEFT_TYPE} adapter")
  emb = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight  # [P, L*2*Hkv*D] (sink first)
  P, L, H = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
  kv = emb.reshape(P, L, 2, H, cfg.token_dim // H)  # slot 2l = keys of layer l, 2l+1 = values
  return kv[:, :, 0].transpose(0, 1), kv[:, :, 1].transpose(0, 1)  # [L, P, Hkv, D] each


def _cartridge_cache(k: Any, v: Any, batch: int, config: Any) -> Any:
  """torch k, v [L, P, Hkv, D] -> a transformers `DynamicCache` holding them for `batch` rows:
  per layer keys / values [B, Hkv, P, D] (as a transformers model caches them: keys after RoPE)."""
  from transformers import DynamicCache
  try:
    cache = DynamicCache(config=config)
  except TypeError:  # transformers < 4.56
    cache = DynamicCache()
  for layer in range(k.shape[0]):
    kl = k[layer].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()  # [B, Hkv, P, D]
    vl = v[layer].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()  # [B, Hkv, P, D]
    cache.update(kl, vl, layer)
  return cache


def _takes_new_tokens_only() -> bool:
  """Whether transformers' `generate` accepts only the uncached tokens as `input_ids` (with an
  attention mask over cache + input): its `prepare_inputs_for_generation` has `next_sequence_length`."""
  import inspect
  from transformers.generation.utils import GenerationMixin
  return "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def generate_with_cartridge(model: Any, input_ids: Any, attention_mask: Any = None, *,
                            cartridge: Cartridge | tuple[Any, Any] | str | None = None,
                            new_tokens_only: bool | None = None, **generate_kwargs: Any) -> Any:
  """`generate` of a transformers causal LM with a cartridge, as cas decodes it.

  model: a peft `PeftModel` whose active adapter is CARTRIDGE (its keys/values are used, pass no
    `cartridge`), or a plain transformers causal LM plus `cartridge`: a cas `Cartridge`, (k, v)
    [L, P, Hkv, D] arrays (rotated keys, prompt at position P), or a PEFT adapter directory.
  input_ids: [B, T] int64 torch, the prompt only; attention_mask: [B, T] (0 = left padding) or None.
  new_tokens_only: how the cached cartridge is given to `generate`; None picks what the installed
    transformers supports. True: `input_ids` is the prompt alone and the attention mask covers
    cartridge + prompt (transformers 5.x with `next_sequence_length`). False: P placeholder tokens
    stand for the cartridge in `input_ids` (generate slices the cached part off, they are never
    embedded) and are cut off the result; logits processors that read the input ids (e.g.
    repetition_penalty) see them, and `max_length` is shifted by P. Both give the same tokens.
  generate_kwargs: passed to `generate` (max_new_tokens, do_sample, eos_token_id, ...).
  Returns what `generate` returns for `input_ids` (sequences [B, T + new], prompt first).

  The base model generates from a KV cache pre-filled with the cartridge (P slots, keys after RoPE
  at positions 0..P-1) and an attention mask over cartridge + prompt, so the prompt sits at
  positions P, P+1, ... (per row, after left padding): cas' convention and PeftModel.forward's.
  Works on transformers before and after the 5.24 `past_key_values` -> `cache` rename.
  """
  import torch
  if hasattr(model, "active_peft_config"):
    if cartridge is not None:
      raise CartridgeError("generate_with_cartridge: pass a PeftModel or a cartridge, not both")
    k, v = peft_cartridge_kv(model)
    base = model.get_base_model()
  else:
    if cartridge is None:
      raise CartridgeError("generate_with_cartridge: a plain model needs `cartridge`")
    if isinstance(cartridge, str):
      cartridge, _ = import_peft(cartridge)
    ka, va = cartridge.full_kv() if isinstance(cartridge, Cartridge) else cartridge
    k, v = torch.tensor(np.asarray(ka, np.float32)), torch.tensor(np.asarray(va, np.float32))  # copies
    base = model
  dev = input_ids.device
  dtype = next(base.parameters()).dtype
  k, v = k.detach().to(device=dev, dtype=dtype), v.detach().to(device=dev, dtype=dtype)
  cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
  n_layers = getattr(cfg, "num_hidden_layers", k.shape[0])
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != n_layers:
    raise CartridgeError(f"generate_with_cartridge: cartridge k, v {tuple(k.shape)} / {tuple(v.shape)} do not "
                         f"fit a model of {n_layers} layers ([L, P, Hkv, D] expected)")
  B, T = input_ids.shape
  P = k.shape[1]
  if attention_mask is None:
    attention_mask = torch.ones_like(input_ids)
  full_mask = torch.cat([torch.ones((B, P), dtype=attention_mask.dtype, device=dev), attention_mask], 1)
  kwargs = dict(generate_kwargs)
  kwargs[cache_argument_name(base)] = _cartridge_cache(k, v, B, cfg)
  if new_tokens_only is None:
    new_tokens_only = _takes_new_tokens_only()
  if new_tokens_only:
    return base.generate(input_ids=input_ids, attention_mask=full_mask, **kwargs)
  # transformers 4.x slices the cached part off input_ids: placeholders stand there for the cartridge.
  if kwargs.get("max_length") is not None:
    kwargs["max_length"] += P
  padded = torch.cat([input_ids[:, :1].expand(B, P), input_ids], 1)
  out = base.generate(input_ids=padded, attention_mask=full_mask, **kwargs)
  if isinstance(out, torch.Tensor):
    return out[:, P:]
  out.sequences = out.sequences[:, P:]
  return out
