"""Host-side CAS data loading: batches/s of the training loader (ResidentSampler over
DocConversations) on a real-format self-study dataset, for the document cache the training loop
uses (`cache_docs = 2B`) and for a shard-only cache (what training used before: the shards of
the resident documents re-read and decoded whenever they outnumber the shard cache).

Random conversations in the paper preset's sizes (speed only; CPU, no model):

  python -m benchmarks.cas_loader --num_docs=20 --num_slots=10 --per_doc=512 --batches=50

Prints one markdown row per cache setting: batches/s, shard reads, host MiB of decoded data.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

from cas.synth.format import Conversation, DocConversations, SynthDataset
from cas.testing import write_dataset
from cas.train.batch import ResidentSampler

F = flags.FLAGS
flags.DEFINE_integer("num_docs", 20, "N")
flags.DEFINE_integer("num_slots", 10, "B: documents resident (drawn from)")
flags.DEFINE_integer("per_doc", 512, "self-study conversations per document")
flags.DEFINE_integer("shard_size", 64, "conversations per shard (the paper preset's synth.shard_size)")
flags.DEFINE_integer("prompt_len", 96, "prompt tokens per conversation")
flags.DEFINE_integer("answer_len", 256, "answer tokens per conversation")
flags.DEFINE_integer("top_k", 20, "teacher top-k")
flags.DEFINE_integer("batch_size", 16, "rows per batch")
flags.DEFINE_integer("seq_len", 512, "tokens per row")
flags.DEFINE_integer("k_max", 10, "cartridges per row")
flags.DEFINE_integer("batches", 50, "timed batches per setting")
flags.DEFINE_string("workdir", None, "scratch dir (default: a temp dir)")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  doc_ids = [f"doc{i:05d}" for i in range(F.num_docs)]
  root = F.workdir or tempfile.mkdtemp()
  data = os.path.join(root, "data")
  if not os.path.exists(os.path.join(data, "manifest.json")):
    convs = []
    for d in doc_ids:
      for _ in range(F.per_doc):
        al = F.answer_len
        convs.append(Conversation(d, rng.integers(0, 49152, F.prompt_len).astype(np.int32),
                                  rng.integers(0, 49152, al).astype(np.int32),
                                  rng.integers(0, 49152, (al, F.top_k)).astype(np.int32),
                                  -np.abs(rng.standard_normal((al, F.top_k))).astype(np.float32)))
    write_dataset(data, convs, model_fingerprint="bench", shard_size=F.shard_size, top_k=F.top_k,
                  doc_ids=doc_ids, per_doc=F.per_doc)
  resident = {d: i for i, d in enumerate(doc_ids[:F.num_slots])}
  rows = []
  for name, cache_docs, cache_shards in (("documents (2B) + 8 shards, training's", 2 * F.num_slots, 8),
                                         ("shards only, max(8, 2B)", 1, max(8, 2 * F.num_slots))):
    dc = DocConversations(SynthDataset(data), cache_shards=cache_shards, cache_docs=cache_docs)
    sampler = ResidentSampler(dc.get, seed=0)
    kw = dict(k_max=F.k_max, p_isolated=0.3, seq_len=F.seq_len, top_k=F.top_k, p=128, num_frozen=1,
              position_mode="shared")
    sampler.next_batch(resident, F.batch_size, **kw)  # fills the caches (first reads untimed)
    t = time.perf_counter()
    for _ in range(F.batches):
      sampler.next_batch(resident, F.batch_size, **kw)
    dt = time.perf_counter() - t
    rows.append((name, F.batches / dt, dc.shard_reads))
  print(f"\n| cache | batches/s | shard reads ({F.batches + 1} batches) |\n|---|---|---|")
  for name, bps, reads in rows:
    print(f"| {name} | {bps:.1f} | {reads} |")
  print(f"N={F.num_docs}, B={F.num_slots}, {F.per_doc} conversations/doc in shards of {F.shard_size}, "
        f"batch {F.batch_size} x {F.seq_len}, k_max={F.k_max}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
  app.run(main)
