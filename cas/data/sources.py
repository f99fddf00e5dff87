"""Where a pipeline's collection comes from (`config.data`), written once into the workdir.

  config.data.path         a saved collection directory (cas.data.types); read in place
  config.data.kind         "patients" | "products" | "minutes"   built-in synthetic collection
                                                      (data.num_docs, data.seed, data.words_per_doc;
                                                      data.question_refs: None = the kind's default,
                                                      or a subset of ("title", "content");
                                                      data.pair_share: share of two-document
                                                      questions, 0 = none)
                           "prose"                    built-in real prose (Britannica 1911 on
                                                      Shakespeare, Areopagitica, sonnets) with
                                                      planted facts (cas.data.prose; data.num_docs
                                                      <= 24, data.seed; words_per_doc must be None)
                           "longhealth" | "quality" | "qasper"   a benchmark, from its source files
                                                      in data.manual_dir, through the tfds builders
                                                      (cas.data.tfds_builders; no TensorFlow);
                                                      data.split picks the split (None: the only one)
                           "folder"                   every .txt/.md file under data.manual_dir is
                                                      a document (no questions)

Everything but `data.path` is written to `<workdir>/collection/` as a normal collection directory
(cas.data.types: documents.jsonl, questions.jsonl, manifest.json written last, so a killed build
leaves no manifest and is redone) and read from there afterwards, so every later stage is the same
whatever the source. A benchmark or folder collection records its source in the manifest
(`meta.data_source`: kind, split, sha256 of the source files); a later run whose config names
another source, or whose source files changed, is refused instead of silently mixing the two
(without the source folder, e.g. a workdir copied elsewhere to evaluate, kind and split are
checked and the saved collection is used).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from absl import logging

from cas.data import prose, synthetic
from cas.fileio import sha256_file
from cas.data.types import Collection, CollectionError, load_collection, read_manifest

BENCHMARK_KINDS = ("longhealth", "quality", "qasper")
FOLDER_KIND = "folder"
PROSE_KIND = "prose"


def known_kinds() -> list[str]:
  return sorted(synthetic.KINDS) + [PROSE_KIND] + list(BENCHMARK_KINDS) + [FOLDER_KIND]


def _manual_dir(data, kind: str) -> str:
  d = data.get("manual_dir")
  if not d:
    what = "the benchmark's source files" if kind in BENCHMARK_KINDS else "the .txt/.md files"
    raise CollectionError(f"config.data.kind={kind!r} needs config.data.manual_dir (the folder with "
                          f"{what}); e.g. --config.data.manual_dir=/data/{kind}")
  d = os.path.abspath(os.path.expanduser(d))
  if not os.path.isdir(d):
    raise CollectionError(f"config.data.manual_dir={d}: no such folder (config.data.kind={kind!r})")
  return d


def _source_files(kind: str, manual_dir: str, split: str | None) -> dict[str, str]:
  """split -> source file of a benchmark in manual_dir (the split asked for, or the only one)."""
  from cas.data import benchmarks
  files = benchmarks.find_split_files(kind, manual_dir)
  if not files:
    raise CollectionError(f"config.data.manual_dir={manual_dir}: no {kind} source files; expected "
                          f"names matching {benchmarks.expected_files(kind)}")
  if split is None:
    if len(files) != 1:
      raise CollectionError(f"config.data.manual_dir={manual_dir}: several {kind} splits "
                            f"{sorted(files)}; choose one with --config.data.split=")
    split = next(iter(files))
  if split not in files:
    raise CollectionError(f"config.data.split={split!r}: no {kind} file for it in {manual_dir} "
                          f"(found splits {sorted(files)})")
  return {split: files[split]}


def describe_source(data, split: str | None = None) -> dict:
  """The `meta.data_source` record of a benchmark or folder source: kind, split (`split`, else
  config.data.split, else the only one) and the sha256 of every source file (what must match for
  a saved collection to be reused)."""
  kind = data.kind
  manual_dir = _manual_dir(data, kind)
  if kind == FOLDER_KIND:
    from cas.data.folder import DEFAULT_EXTENSIONS
    files = {}
    for dirpath, dirnames, filenames in os.walk(manual_dir):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for fn in sorted(filenames):
        if not fn.startswith(".") and fn.lower().endswith(DEFAULT_EXTENSIONS):
          p = os.path.join(dirpath, fn)
          files[os.path.relpath(p, manual_dir).replace(os.sep, "/")] = sha256_file(p)
    return {"kind": kind, "manual_dir": manual_dir, "split": None, "files": files}
  (split, path), = _source_files(kind, manual_dir, split or data.get("split")).items()
  return {"kind": kind, "manual_dir": manual_dir, "split": split,
          "files": {os.path.basename(path): sha256_file(path)}}


def build_source_collection(data, scratch_dir: str, source: dict | None = None) -> Collection:
  """Reads a benchmark (through its tfds builder, prepared in `scratch_dir`) or a folder into a
  Collection with `meta.data_source` set. Raises CollectionError for a missing folder, missing
  source files or an empty result (no documents; for a benchmark also no labelled questions)."""
  kind = data.kind
  source = source or describe_source(data)
  manual_dir = source["manual_dir"]
  if kind == FOLDER_KIND:
    from cas.data.folder import load_folder
    coll = load_folder(manual_dir)
  else:
    from cas.data import tfds_builders
    coll = tfds_builders.load_tfds_collection(kind, manual_dir, scratch_dir, split=source["split"])
  if not coll.documents:
    raise CollectionError(f"config.data.kind={kind!r}, manual_dir={manual_dir}: the source has no documents")
  if kind in BENCHMARK_KINDS and not coll.questions:
    raise CollectionError(f"config.data.kind={kind!r}, manual_dir={manual_dir}, split {source['split']!r}: "
                          "no question with an answer (unlabelled split?); nothing to evaluate")
  coll.meta = {**coll.meta, "data_source": source}
  return coll


def _check_same_source(path: str, manifest: dict, data) -> None:
  """Refuses to reuse the collection in `path` for a config that names another source: another
  kind or split, or source files whose sha256 changed. Without the source folder (e.g. a workdir
  copied to another machine to evaluate) only kind and split are checked."""
  have = (manifest.get("meta") or {}).get("data_source")
  if not isinstance(have, dict):
    raise CollectionError(f"{path} holds the collection {manifest.get('name')!r}, not one built from "
                          f"config.data.kind={data.kind!r}; use a fresh --workdir")
  split = data.get("split") or have.get("split")
  if have.get("kind") != data.kind or have.get("split") != split:
    raise CollectionError(f"{path} was built from {have.get('kind')!r} (split {have.get('split')!r}) but this "
                          f"config asks for {data.kind!r} (split {split!r}). Use a fresh --workdir (its "
                          "cartridges belong to the old collection).")
  manual_dir = data.get("manual_dir")
  if not manual_dir or not os.path.isdir(os.path.expanduser(manual_dir)):
    logging.warning("%s: reusing the %s collection without checking its source files "
                    "(config.data.manual_dir=%r is not a folder here)", path, data.kind, manual_dir)
    return
  want = describe_source(data, split=split)
  if have.get("files") != want["files"]:
    raise CollectionError(f"{path} was built from {data.kind!r} source files {sorted(have.get('files') or {})} "
                          f"that differ from those in {want['manual_dir']} now ({sorted(want['files'])}"
                          + (", same names: a source file changed" if set(have.get("files") or {}) == set(want["files"])
                             else "") + "). Use a fresh --workdir (its cartridges belong to the old collection).")


def collection_for_config(data, path: str) -> Collection:
  """The collection of `config.data` (see the module doc); `path` is `<workdir>/collection`."""
  if data.get("path"):
    return load_collection(data.path)
  kind = data.get("kind", "patients")
  if kind in synthetic.KINDS:
    try:
      read_manifest(path)
    except Exception:
      synthetic.write_synthetic_collection(path, data.num_docs, data.seed, kind=kind,
                                           words_per_doc=data.get("words_per_doc"),
                                           question_refs=data.get("question_refs"),
                                           pair_share=data.get("pair_share", 0.0) or 0.0)
    return load_collection(path)
  if kind == PROSE_KIND:
    if data.get("words_per_doc") is not None:
      raise CollectionError(f"config.data.kind='prose' has real documents of fixed lengths; "
                            f"config.data.words_per_doc must be None, got {data.words_per_doc!r}")
    try:
      read_manifest(path)
    except Exception:
      prose.write_prose_collection(path, data.num_docs, data.seed)
    return load_collection(path)
  if kind not in BENCHMARK_KINDS and kind != FOLDER_KIND:
    raise CollectionError(f"config.data.kind={kind!r} is unknown; choose one of {known_kinds()} "
                          "(or set config.data.path to a saved collection directory)")
  try:
    manifest = read_manifest(path)
  except CollectionError:
    manifest = None
  if manifest is not None:
    _check_same_source(path, manifest, data)
    return load_collection(path)
  want = describe_source(data)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".tfds-", dir=os.path.dirname(os.path.abspath(path)))
  try:
    coll = build_source_collection(data, scratch, want)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  coll.save(path)  # manifest written last: a killed write leaves none and is redone next time
  logging.info("wrote the %s collection %r (%d documents, %d questions) to %s", kind, coll.name,
               len(coll.documents), len(coll.questions), path)
  return load_collection(path)
