"""Saving and loading cartridges with Orbax.

A saved cartridge is a directory:
  cartridge.json    spec (L, p, Hkv, D, num_frozen), model fingerprint, doc ids, training info
  arrays/           Orbax PyTree checkpoint of {frozen_k, frozen_v, k, v} (float32)
Written to `<path>.tmp-<pid>` and renamed, so a reader never sees half a cartridge.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import orbax.checkpoint as ocp

from cas.cartridge.cartridge import Cartridge, CartridgeError, CartridgeSpec
from cas.fileio import local_checkpointer, replace_dir

META = "cartridge.json"


def save_cartridge(path: str, cart: Cartridge, *, model_fingerprint: str, info: dict | None = None) -> str:
  path = os.path.abspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  from cas.distributed import fetch  # arrays may live on a mesh spanning processes
  arrays = {"frozen_k": fetch(cart.frozen_k[...]), "frozen_v": fetch(cart.frozen_v[...]),
            "k": fetch(cart.k[...]), "v": fetch(cart.v[...])}
  with local_checkpointer() as ckptr:  # one process writes (see cas.train.loop)
    ckptr.save(os.path.join(tmp, "arrays"), args=ocp.args.PyTreeSave(arrays))
  meta = {"spec": dataclasses.asdict(cart.spec), "model_fingerprint": model_fingerprint, **(info or {})}
  with open(os.path.join(tmp, META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return replace_dir(tmp, path)


def read_cartridge_meta(path: str) -> dict:
  mp = os.path.join(path, META)
  if not os.path.exists(mp):
    raise CartridgeError(f"{path}: not a saved cartridge (no {META})")
  try:
    with open(mp) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CartridgeError(f"{mp}: corrupt cartridge metadata ({e})") from e


def load_cartridge(path: str, *, model_fingerprint: str | None = None,
                   expect_spec: CartridgeSpec | None = None) -> tuple[Cartridge, dict]:
  """Load a cartridge; refuses one made for another model or of another shape."""
  meta = read_cartridge_meta(path)
  spec = CartridgeSpec(**meta["spec"])
  if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
    raise CartridgeError(f"{path}: cartridge was trained for model fingerprint "
                         f"{meta.get('model_fingerprint')}, not {model_fingerprint}")
  if expect_spec is not None and spec != expect_spec:
    raise CartridgeError(f"{path}: cartridge spec {spec} does not match expected {expect_spec}")
  try:
    with local_checkpointer() as ckptr:
      arrays = ckptr.restore(os.path.abspath(os.path.join(path, "arrays")))  # Orbax needs absolute
  except Exception as e:
    raise CartridgeError(f"{path}: cannot read cartridge arrays ({e})") from e
  cart = Cartridge(arrays["frozen_k"], arrays["frozen_v"], arrays["k"], arrays["v"])
  if cart.spec != spec:
    raise CartridgeError(f"{path}: arrays have spec {cart.spec}, metadata says {spec}")
  return cart, meta
