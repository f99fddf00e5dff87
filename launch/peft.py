"""Move cartridges between cas and Hugging Face PEFT (the CARTRIDGE adapter, peft >= 0.19).

  # a CAS workdir's cartridge for one document -> a PEFT adapter directory
  python -m launch.peft export --workdir=runs/cas_quick --doc_id=patient-00003 --out=adapters/p3
  # several documents composed one after another (sequential positions) into one adapter
  python -m launch.peft export --workdir=runs/cas_quick --doc_id=patient-00003,patient-00007 --out=adapters/p37
  # the one-document quickstart's cartridge (exported on its own by the pipeline)
  python -m launch.peft export --cartridge=runs/quickstart/cas/cartridge --out=adapters/q
  # a PEFT adapter -> a cas cartridge directory (Orbax), usable by the evaluator and server
  python -m launch.peft import --adapter=adapters/q --out=runs/imported/cartridge

Format and RoPE mapping: cas/cartridge/peft_io.py. Both commands warn when the installed
transformers + peft make `PeftModel.generate` ignore a CARTRIDGE adapter (transformers >= 5.24 with
peft <= 0.21.2; docs/PEFT_GENERATE.md: use cas.cartridge.peft_io.generate_with_cartridge there).
"""
import json
import os

from absl import flags, logging

from launch.entry import run  # config / data / store problems: one `error:` line and exit status

WORKDIR = flags.DEFINE_string("workdir", None, "export: a CAS workdir (its cartridge store)")
STORE = flags.DEFINE_string("store", None, "export: a cartridge store directory (instead of --workdir)")
DOC_IDS = flags.DEFINE_list("doc_id", [], "export: document id(s) in the store; several are composed "
                            "sequentially")
CARTRIDGE = flags.DEFINE_string("cartridge", None, "export: a cas cartridge directory (instead of a store)")
ADAPTER = flags.DEFINE_string("adapter", None, "import: the PEFT adapter directory")
OUT = flags.DEFINE_string("out", None, "output directory (must not exist unless --overwrite)")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "export: tensor dtype")
BASE = flags.DEFINE_string("base_model", None, "export: base_model_name_or_path written into the adapter")
MODEL = flags.DEFINE_string("model_path", None, "the model the cartridges are for (import: its fingerprint, "
                            "default the adapter's cas metadata; export of several docs: its RoPE); "
                            "default: the default model")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out if it exists")


def flag_problems(command: str | None) -> list:
  """Every problem of the command line (cas.config_check.Problem), before anything is read or written."""
  from cas.config_check import Problem
  out = []
  if command not in ("export", "import"):
    return [Problem("command", f"usage: python -m launch.peft export|import --out=DIR ... (got {command!r})")]
  if not OUT.value:
    out.append(Problem("--out", "--out is required (the directory to write)"))
  elif os.path.exists(OUT.value) and not OVERWRITE.value:
    out.append(Problem("--out", f"--out={OUT.value} exists; pass --overwrite to replace it"))
  if command == "export":
    if CARTRIDGE.value:
      from cas.cartridge.io import META
      if not os.path.isfile(os.path.join(CARTRIDGE.value, META)):
        out.append(Problem("--cartridge", f"{CARTRIDGE.value}: not a saved cartridge (no {META})"))
    elif not DOC_IDS.value:
      out.append(Problem("--doc_id", "export needs --cartridge, or --workdir/--store with --doc_id"))
    else:
      from cas.rotation.store import STORE_META, StoreError
      from cas.serve.cartridges import store_of_workdir
      if STORE.value:
        if not os.path.isfile(os.path.join(STORE.value, STORE_META)):
          out.append(Problem("--store", f"{STORE.value}: not a cartridge store ({STORE_META} missing)"))
      else:
        try:
          store_of_workdir(WORKDIR.value or ".")
        except StoreError as e:
          out.append(Problem("--workdir", str(e)))
  elif not ADAPTER.value:
    out.append(Problem("--adapter", "import needs --adapter (a PEFT adapter directory)"))
  return out


def _export():
  from cas.cartridge.peft_io import export_peft
  if CARTRIDGE.value:
    from cas.cartridge.io import load_cartridge
    cart, meta = load_cartridge(CARTRIDGE.value)
    return export_peft(OUT.value, cart, model_fingerprint=meta.get("model_fingerprint"), dtype=DTYPE.value,
                       base_model_name_or_path=BASE.value, overwrite=OVERWRITE.value)
  from cas.rotation.store import STORE_META
  from cas.serve.cartridges import Collection, store_of_workdir
  store_dir = STORE.value or store_of_workdir(WORKDIR.value or ".")
  with open(os.path.join(store_dir, STORE_META)) as f:
    fp = json.load(f)["model_fingerprint"]
  coll = Collection.open("export", store_dir, model_fingerprint=fp, retriever=None)
  carts = [coll.load(d) for d in DOC_IDS.value]
  if len(carts) == 1:
    cart, extra = carts[0], {}
  else:  # PEFT puts the prompt after all P tokens: sequential positions (peft_io docstring)
    import numpy as np
    from cas.cartridge.compose import compose
    from cas.model.llama import rope_inv_freq
    from cas.model.loader import load_config
    k, v, offset = compose(carts, mode="sequential", inv_freq=np.asarray(rope_inv_freq(load_config(MODEL.value))))
    cart, extra = (k, v), {"num_frozen": carts[0].spec.num_frozen, "position_offset": offset}
  return export_peft(OUT.value, cart, **extra, model_fingerprint=fp, dtype=DTYPE.value, base_model_name_or_path=BASE.value,
                     info={"store": os.path.abspath(store_dir), "doc_ids": DOC_IDS.value}, overwrite=OVERWRITE.value)


def _import():
  from cas.cartridge.io import save_cartridge
  from cas.cartridge.peft_io import import_peft
  cart, meta = import_peft(ADAPTER.value)
  fp = (meta.get("cas") or {}).get("model_fingerprint")
  if MODEL.value or not fp:
    from cas.model.loader import model_fingerprint
    fp = model_fingerprint(MODEL.value)
  return save_cartridge(OUT.value, cart, model_fingerprint=fp, info={"imported_from": os.path.abspath(ADAPTER.value)})


def main(argv):
  from cas.config_check import raise_problems
  raise_problems(flag_problems(argv[1] if len(argv) == 2 else None), what="the command line")
  path = _export() if argv[1] == "export" else _import()
  print(path)
  from cas.cartridge.peft_io import peft_generate_is_broken
  if (warning := peft_generate_is_broken()) is not None:
    logging.warning(warning)


if __name__ == "__main__":
  run(main)
