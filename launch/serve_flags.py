"""Flags shared by launch/serve.py and launch/chat.py, and the engine they build."""
from absl import flags, logging

WORKDIR = flags.DEFINE_string("workdir", None, "A CAS run directory; its store (<workdir>/cas/store or "
                              "<workdir>/store, or <workdir>/parts<M>/cas/store of a run with "
                              "cartridge.max_doc_tokens=M) and retrieval index are served as a collection.")
MAX_DOC_TOKENS = flags.DEFINE_integer("max_doc_tokens", None, "Which run of --workdir to serve: 0 the "
                                      "whole-document store, M the run whose documents were cut into parts of "
                                      "at most M tokens (<workdir>/parts<M>). Default: the workdir's only store "
                                      "(an error naming them when there are several). A document cut into parts "
                                      "is requested by its doc id and loads all its parts in order.")
STORES = flags.DEFINE_multi_string("store", [], "A cartridge store to serve, 'name=path' or 'path' (repeatable).")
MODEL_PATH = flags.DEFINE_string("model_path", None, "A .gguf file or HF model directory (default: the "
                                 "default SmolLM2 GGUF in $CAS_HOME).")
MODEL_NAME = flags.DEFINE_string("model_name", None, "The model id clients use (default: the model file or "
                                 "directory name).")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
CACHE_SIZE = flags.DEFINE_integer("cache_size", 64, "Cartridges kept on the device (LRU).")
MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Requests decoded together.")
MAX_CONTEXT = flags.DEFINE_integer("max_context", None, "Longest context (cartridge positions + prompt + "
                                   "reply); default the model's max_position_embeddings.")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Reply length when a request names none.")
TOP_K = flags.DEFINE_integer("top_k", 2, "Cartridges retrieved when a request names a collection but no top_k.")
PRESPLIT = flags.DEFINE_bool("presplit", False, "Decode with the layers unrolled (on a GPU, or a model loaded with "
                             "layer_loop unrolled) and each layer's weights sliced once at start-up instead of in "
                             "every step; holds one more copy of the layer weights (not measured in the server yet).")
SPLIT_CACHE = flags.DEFINE_bool("split_cache", False, "With --presplit: one heads-first KV array per layer, read in "
                                "place by each step's attention (not measured in the server yet).")
MERGE_PROJECTIONS = flags.DEFINE_bool("merge_projections", False, "With --presplit: each layer's q/k/v and gate/up "
                                      "weights joined into one matrix each, 4 matmuls per layer and step instead "
                                      "of 7 (not measured on a GPU yet).")
PROMPT_FORMAT = flags.DEFINE_enum(
    "prompt_format", "auto", ["auto", "chat", "bare", "completion"],
    "How messages become a prompt, as config.prompt_format in self-study and evaluation: chat (the chat "
    "template), bare (the chat template without the default system turn it adds to a conversation with no "
    "system message), completion (a base model: the messages flattened by the evaluation's formatter into "
    "'[BOS]{system}\\n\\nQuestion: {user}\\nAnswer: {assistant}\\n...Question: {user}\\nAnswer:', a "
    "system message only first; the reply is the first non-empty line the model writes), or auto (the format "
    "the served cartridges were trained with, as their training recorded it; else chat when the model's files "
    "carry a chat template, else completion).")
RETRIEVER = flags.DEFINE_enum("retriever", "auto", ["auto", "none"], "Use the document index saved next "
                              "to each store (auto) or none.")


def flag_problems(extra: dict | None = None) -> list:
  """Every problem of the serving flags (cas.config_check.Problem), before the model loads: sizes
  out of range, a --workdir or --store without a cartridge store, a --model_path that is not there.
  extra: more {"--flag": (value, minimum)} to check (e.g. launch.serve's --port)."""
  import os

  from cas.config_check import Problem
  from cas.model.errors import ModelLoadError
  from cas.model.loader import resolve_model_path
  from cas.rotation.store import STORE_META, StoreError
  from cas.serve.cartridges import store_of_workdir
  out = []
  sizes = {"--cache_size": (CACHE_SIZE.value, 1), "--max_batch": (MAX_BATCH.value, 1),
           "--max_tokens": (MAX_TOKENS.value, 1), "--top_k": (TOP_K.value, 1), **(extra or {})}
  if MAX_CONTEXT.value is not None:
    sizes["--max_context"] = (MAX_CONTEXT.value, 1)
  for flag, (v, lo) in sizes.items():
    if v < lo:
      out.append(Problem(flag, f"{flag}={v} must be >= {lo}"))
  if WORKDIR.value:
    try:
      store_of_workdir(WORKDIR.value, MAX_DOC_TOKENS.value)
    except StoreError as e:
      out.append(Problem("--workdir", str(e)))
  elif MAX_DOC_TOKENS.value is not None:
    out.append(Problem("--max_doc_tokens", "--max_doc_tokens picks a run of --workdir; pass --workdir too"))
  for s in STORES.value:
    path = s.partition("=")[2] if "=" in s else s
    if not os.path.isfile(os.path.join(path, STORE_META)):
      out.append(Problem("--store", f"{s}: {path} is not a cartridge store ({STORE_META} missing)"))
  try:
    resolve_model_path(MODEL_PATH.value)
  except ModelLoadError as e:
    out.append(Problem("--model_path", str(e)))
  return out


def build_engine(extra_checks: dict | None = None):
  """Load the model and collections named by the flags; returns a started cas.serve.Engine. The
  flags are checked first (`flag_problems`: a ConfigError listing every problem)."""
  import os

  import jax.numpy as jnp

  from cas.config_check import raise_problems
  from cas.model.loader import load_model
  from cas.serve import Engine, open_collections
  from cas.serve.cartridges import serving_prompt_format

  raise_problems(flag_problems(extra_checks), what="the command line")

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[DTYPE.value]
  lm = load_model(MODEL_PATH.value, param_dtype=dtype, dtype=dtype)
  colls = open_collections(model_fingerprint=lm.fingerprint, workdir=WORKDIR.value, stores=STORES.value,
                           retriever=None if RETRIEVER.value == "none" else "auto",
                           max_doc_tokens=MAX_DOC_TOKENS.value)
  if not colls:
    logging.warning("no --workdir or --store: serving the model without cartridges")
  name = MODEL_NAME.value or os.path.basename(os.path.normpath(lm.source)).removesuffix(".gguf")
  engine = Engine(lm.model, lm.tokenizer, colls, model_name=name, cache_size=CACHE_SIZE.value,
                  max_batch=MAX_BATCH.value, max_context=MAX_CONTEXT.value,
                  default_max_tokens=MAX_TOKENS.value, default_top_k=TOP_K.value,
                  prompt_format=serving_prompt_format(PROMPT_FORMAT.value, colls), presplit=PRESPLIT.value,
                  split_cache=SPLIT_CACHE.value,
                  merge_projections=MERGE_PROJECTIONS.value)
  if PRESPLIT.value and not engine.decoder.presplit:
    logging.warning("--presplit has no effect here: the model's layers run in a scan (CPU, layer_loop auto)")
  logging.info("prompt format: %s (--prompt_format=%s)", engine.prompt_format, PROMPT_FORMAT.value)
  return engine.start()


def quiet_orbax() -> None:
  """Orbax logs every file operation at INFO (each cartridge load); keep our own lines readable."""
  import logging as pylogging

  class _DropOrbax(pylogging.Filter):
    def filter(self, record):
      return "/orbax/" not in record.pathname

  for h in pylogging.getLogger().handlers + pylogging.getLogger("absl").handlers:
    h.addFilter(_DropOrbax())
  pylogging.getLogger("absl").addFilter(_DropOrbax())
