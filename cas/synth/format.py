"""On-disk format of self-study data: sharded ArrayRecord files plus a JSON manifest.

A dataset directory holds
  manifest.json                 model fingerprint, tokenizer, chunking, seed, top_k, shard list
  shard-00000.array_record ...  one record per conversation (msgpack), written atomically

One record (a `Conversation`):
  doc_id         str
  prompt_ids     int32 [Tp]     student context before the answer: chat-formatted user turn and the
                                assistant header (completion format: "Question: ...\nAnswer:"),
                                *without* the document (the student sees the cartridge)
  answer_ids     int32 [Ta]     assistant tokens as generated (end-of-turn token included)
  topk_ids       int32 [Ta, K]  teacher's top-k token ids at each answer position
  topk_logprobs  f32   [Ta, K]  teacher's log-probs for those ids (document chunk in context)
  seed_family    str            which seed-prompt family produced the user turn
  chunk          int32 [2]      token range [start, end) of the chunk the teacher saw

Shards are written to a temporary name and renamed, so a shard either exists whole or not at
all; a killed job resumes by regenerating only the missing shards (each shard's content is a
pure function of the dataset seed and the shard index). The manifest records each shard's
sha256: readers verify it (a truncated or zeroed shard raises SynthDataError naming the file)
and a resumed synthesis regenerates a damaged shard. Every record read is checked for
consistent shapes and finite teacher log-probs (`Conversation.check`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
from absl import logging
from flax import serialization

from cas.fileio import sha256_file  # noqa: F401 (re-exported: cas.synth.selfstudy)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class SynthDataError(ValueError):
  """Self-study data that is missing, corrupt or made for another model."""


@dataclasses.dataclass
class Conversation:
  doc_id: str
  prompt_ids: np.ndarray  # [Tp] int32
  answer_ids: np.ndarray  # [Ta] int32
  topk_ids: np.ndarray  # [Ta, K] int32
  topk_logprobs: np.ndarray  # [Ta, K] float32
  seed_family: str = ""
  chunk: tuple[int, int] = (0, 0)

  def to_bytes(self) -> bytes:
    return serialization.msgpack_serialize({
        "doc_id": self.doc_id,
        "prompt_ids": np.asarray(self.prompt_ids, np.int32),
        "answer_ids": np.asarray(self.answer_ids, np.int32),
        "topk_ids": np.asarray(self.topk_ids, np.int32),
        "topk_logprobs": np.asarray(self.topk_logprobs, np.float32),
        "seed_family": self.seed_family,
        "chunk": np.asarray(self.chunk, np.int32),
    })

  @classmethod
  def from_bytes(cls, b: bytes) -> "Conversation":
    d = serialization.msgpack_restore(b)
    return cls(d["doc_id"], np.asarray(d["prompt_ids"]), np.asarray(d["answer_ids"]),
               np.asarray(d["topk_ids"]), np.asarray(d["topk_logprobs"]), d["seed_family"],
               tuple(int(x) for x in d["chunk"]))

  def check(self, where: str) -> "Conversation":
    """Raise SynthDataError (naming `where`) unless shapes agree and the teacher's log-probs are
    log-probabilities (no NaN, no +inf, <= 0 up to rounding; -inf / -1e9 mark absent entries)."""
    def bad(msg):
      raise SynthDataError(f"{where} (doc {self.doc_id!r}): {msg}")
    if not isinstance(self.doc_id, str) or not self.doc_id:
      bad("empty or non-string doc_id")
    p, a = np.asarray(self.prompt_ids), np.asarray(self.answer_ids)
    ti, tl = np.asarray(self.topk_ids), np.asarray(self.topk_logprobs)
    if p.ndim != 1 or a.ndim != 1 or not len(a):
      bad(f"prompt_ids {p.shape} / answer_ids {a.shape} must be non-empty 1-D id arrays")
    if ti.ndim != 2 or ti.shape != tl.shape or ti.shape[0] != len(a):
      bad(f"topk_ids {ti.shape} and topk_logprobs {tl.shape} must both be [len(answer_ids)={len(a)}, K]")
    if min(p.min(initial=0), a.min(initial=0), ti.min(initial=0)) < 0:
      bad("negative token ids")
    if np.isnan(tl).any() or np.isposinf(tl).any() or (tl > 1e-3).any():
      n = int(np.isnan(tl).sum() + (tl > 1e-3).sum())
      bad(f"topk_logprobs has {n} NaN/+inf/positive entries (not log-probabilities); the data is "
          f"corrupt or the teacher's numerics failed")
    return self

  @property
  def num_tokens(self) -> int:
    return int(len(self.prompt_ids) + len(self.answer_ids))


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.array_record"


def atomic_write_json(path: str, obj) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_shard(directory: str, index: int, conversations: Sequence[Conversation]) -> str:
  """Write one shard atomically; returns its path."""
  from array_record.python import array_record_module as ar
  path = os.path.join(directory, shard_name(index))
  tmp = os.path.join(directory, f".tmp-{shard_name(index)}-{os.getpid()}")
  w = ar.ArrayRecordWriter(tmp, "group_size:1")
  for c in conversations:
    w.write(c.to_bytes())
  w.close()
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def read_shard(path: str, sha256: str | None = None) -> list[Conversation]:
  """The conversations of one shard; with `sha256` (from the manifest) the file is verified
  first. Every record is checked (`Conversation.check`); errors name the file and record."""
  from array_record.python import array_record_module as ar
  if not os.path.exists(path):
    raise SynthDataError(f"{path}: shard file is missing")
  if sha256 is not None and sha256_file(path) != sha256:
    raise SynthDataError(f"{path}: shard changed since it was written (sha256 mismatch: truncated, "
                         f"zeroed or overwritten); re-run synthesis with the same workdir to regenerate it")
  try:
    r = ar.ArrayRecordReader(path)
    n = r.num_records()
    recs = r.read_all() if n else []
    r.close()
  except Exception as e:  # array_record raises RuntimeError / status errors on corrupt files
    raise SynthDataError(f"{path}: cannot read shard ({e})") from e
  out = []
  for i, b in enumerate(recs):
    try:
      c = Conversation.from_bytes(b)
    except Exception as e:  # msgpack/field errors of a damaged record
      raise SynthDataError(f"{path}: record {i} cannot be decoded ({type(e).__name__}: {e})") from e
    out.append(c.check(f"{path}: record {i}"))
  return out


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise SynthDataError(f"{directory}: no {MANIFEST}; is this a self-study dataset directory? "
                         f"Run `python -m launch.synthesize` first")
  try:
    with open(path) as f:
      m = json.load(f)
  except json.JSONDecodeError as e:
    raise SynthDataError(f"{path}: corrupt manifest ({e})") from e
  if m.get("format_version") != FORMAT_VERSION:
    raise SynthDataError(f"{path}: format_version {m.get('format_version')} != {FORMAT_VERSION}")
  return m


def check_compatible(manifest: dict, *, model_fingerprint: str, source: str) -> None:
  """Refuse data synthesised with another model/tokenizer than the one about to train on it."""
  got = manifest.get("model_fingerprint")
  if got != model_fingerprint:
    raise SynthDataError(
        f"{source}: self-study data was made with model {manifest.get('model_source')!r} "
        f"(fingerprint {got}), but training uses fingerprint {model_fingerprint}; token ids and "
        f"teacher distributions would not match. Re-run synthesis with this model.")


class SynthDataset:
  """Read access to a finished (or partially finished) self-study dataset directory."""

  def __init__(self, directory: str, require_complete: bool = True):
    self.directory = directory
    self.manifest = read_manifest(directory)
    shards = self.manifest.get("shards", [])
    missing = [s["name"] for s in shards if not os.path.exists(os.path.join(directory, s["name"]))]
    if require_complete and (missing or not self.manifest.get("complete", False)):
      raise SynthDataError(f"{directory}: dataset is incomplete ({len(missing)} of {len(shards)} shards "
                           f"missing); resume `python -m launch.synthesize` with the same workdir")
    self.shards = [s for s in shards if s["name"] not in missing]

  def __len__(self) -> int:
    return sum(int(s["count"]) for s in self.shards)

  def iter_shards(self) -> Iterator[list[Conversation]]:
    for s in self.shards:
      convs = read_shard(os.path.join(self.directory, s["name"]), s.get("sha256"))
      if len(convs) != int(s["count"]):
        raise SynthDataError(f"{s['name']}: {len(convs)} records, manifest says {s['count']}")
      yield convs

  def load_all(self) -> list[Conversation]:
    return [c for shard in self.iter_shards() for c in shard]


class DocConversations:
  """Per-document access to a self-study dataset without loading all of it.

  Conversation g of the dataset belongs to document g // conversations_per_doc and lives in
  shard g // shard_size (see cas.synth.selfstudy), so a document's conversations are found in
  a known, small set of shards. Two small LRU caches: the conversation lists of the
  `cache_docs` most recently used documents (what a training step reads again and again: the
  resident documents; size it to at least the number resident), and the `cache_shards` most
  recently read shards (neighbouring documents that share a shard read it once). A shard is read
  (and its sha256 checked) only on a miss of both. The document cache also stops at
  `cache_bytes` of decoded arrays (host memory stays bounded when B is large; past it, documents
  are re-read, slower, and a warning says so once).
  """

  def __init__(self, dataset: SynthDataset, cache_shards: int = 8, cache_docs: int = 8,
               cache_bytes: int = 4 << 30):
    m = dataset.manifest
    cfg = m.get("config") or {}
    self.dataset = dataset
    self.doc_ids: list[str] = list(m.get("doc_ids") or [])
    if not self.doc_ids or "conversations_per_doc" not in cfg:
      raise SynthDataError(f"{dataset.directory}: manifest lacks doc_ids/config (not written by cas.synth)")
    self.per_doc = int(cfg["conversations_per_doc"])
    self.shard_size = int(cfg["shard_size"])
    self._index = {d: i for i, d in enumerate(self.doc_ids)}
    self._sha = {sh["name"]: sh.get("sha256") for sh in dataset.shards}
    self._shards: collections.OrderedDict[int, list[Conversation]] = collections.OrderedDict()
    self._docs: collections.OrderedDict[str, list[Conversation]] = collections.OrderedDict()
    self._max_shards, self._max_docs = max(1, int(cache_shards)), max(1, int(cache_docs))
    self._max_bytes, self._bytes, self._doc_bytes = int(cache_bytes), 0, {}
    self._warned = False
    self.shard_reads = 0  # shards read from disk so far (a cache miss each)

  def _shard(self, i: int) -> list[Conversation]:
    if i in self._shards:
      self._shards.move_to_end(i)
      return self._shards[i]
    convs = read_shard(os.path.join(self.dataset.directory, shard_name(i)), self._sha.get(shard_name(i)))
    self.shard_reads += 1
    self._shards[i] = convs
    while len(self._shards) > self._max_shards:
      self._shards.popitem(last=False)
    return convs

  def get(self, doc_id: str) -> list[Conversation]:
    """The document's conversations in dataset order (the cached list: do not modify it)."""
    if doc_id in self._docs:
      self._docs.move_to_end(doc_id)
      return self._docs[doc_id]
    if doc_id not in self._index:
      raise SynthDataError(f"{self.dataset.directory}: no self-study data for document {doc_id!r}")
    d = self._index[doc_id]
    g0, g1 = d * self.per_doc, (d + 1) * self.per_doc
    out = []
    for s in range(g0 // self.shard_size, (g1 - 1) // self.shard_size + 1):
      base = s * self.shard_size
      out.extend(c for j, c in enumerate(self._shard(s)) if g0 <= base + j < g1)
    self._docs[doc_id] = out
    self._doc_bytes[doc_id] = sum(c.prompt_ids.nbytes + c.answer_ids.nbytes + c.topk_ids.nbytes
                                  + c.topk_logprobs.nbytes for c in out)
    self._bytes += self._doc_bytes[doc_id]
    while len(self._docs) > 1 and (len(self._docs) > self._max_docs or self._bytes > self._max_bytes):
      old, _ = self._docs.popitem(last=False)
      self._bytes -= self._doc_bytes.pop(old)
      if len(self._docs) < self._max_docs and not self._warned:
        self._warned = True
        logging.warning("%s: the self-study data of %d documents exceeds the %.1f GiB document cache; "
                        "documents are re-read from disk (slower training)", self.dataset.directory,
                        self._max_docs, self._max_bytes / 2**30)
    return out
