"""Small real fixtures shared by tests and examples: a tiny random model and a teacher-labelled
self-study dataset made by actually running that model with the document in context."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cas.model.config import ModelConfig
from cas.model.llama import build_model
from cas.synth.format import FORMAT_VERSION, MANIFEST, Conversation, atomic_write_json, write_shard

TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)


def skip_module_without_devices(n: int = 8) -> None:
  """At a test module's top level: skip the whole module unless `n` devices are there (the CPU test run forces 8
  with XLA_FLAGS, tests/conftest.py; one GPU has 1)."""
  if jax.device_count() < n:
    import pytest
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count={n}), "
                f"have {jax.device_count()}", allow_module_level=True)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY, scale: float = 10.0):
  """Random tiny model; weights scaled up (std 0.02*scale) so that context visibly matters."""
  from flax import nnx
  m = build_model(cfg, seed=seed)
  for _, var in nnx.iter_graph(m):
    if isinstance(var, nnx.Param) and var.ndim >= 2:
      var.set_value(var.get_value() * scale)
  return m


def tiny_packed_inputs(seed: int = 0, cfg: ModelConfig = TINY):
  """Two packed rows for `cfg` (row 0: segments of 6 and 4 tokens; row 1: 8 tokens and 2 of
  padding), positions from 4, and a random 4-token prefix shared by the rows.
  Returns tokens, positions, segment_ids [2, 10] int32 and prefix k, v [L, 1, 4, Hkv, D] f32."""
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(1, 100, (2, 10)).astype(np.int32))
  pos = jnp.asarray(np.broadcast_to(np.arange(4, 14, dtype=np.int32), (2, 10)))
  seg = jnp.asarray(np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], np.int32))
  shape = (cfg.num_layers, 1, 4, cfg.num_kv_heads, cfg.head_dim)
  pk = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  pv = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  return tok, pos, seg, pk, pv


def teacher_conversations(model, doc_ids, *, num: int, prompt_len: int, answer_len: int,
                          top_k: int, seed: int, doc_id: str = "doc0") -> list[Conversation]:
  """Conversations with random prompt/answer tokens whose teacher top-k comes from the model
  reading [document + prompt + answer] (the document in context)."""
  rng = np.random.default_rng(seed)
  V = model.cfg.vocab_size
  fwd = jax.jit(lambda m, t, p: m(t, p)[0])
  out = []
  for _ in range(num):
    prompt = rng.integers(2, V, prompt_len).astype(np.int32)
    answer = rng.integers(2, V, answer_len).astype(np.int32)
    seq = np.concatenate([doc_ids, prompt, answer]).astype(np.int32)
    logits = np.asarray(fwd(model, jnp.asarray(seq[None]), jnp.arange(len(seq))[None]))[0]
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    start = len(doc_ids) + prompt_len - 1
    sl = lp[start:start + answer_len]  # predicts answer tokens
    ids = np.argsort(-sl, axis=-1)[:, :top_k].astype(np.int32)
    out.append(Conversation(doc_id, prompt, answer, ids, np.take_along_axis(sl, ids, -1).astype(np.float32),
                            "question", (0, len(doc_ids))))
  return out


def write_dataset(directory: str, convs, *, model_fingerprint: str, shard_size: int = 8, top_k: int = 8,
                  doc_ids=None, per_doc: int | None = None) -> None:
  """Write conversations as a self-study dataset (doc-major order, like cas.synth writes it)."""
  os.makedirs(directory, exist_ok=True)
  shards = []
  for i in range(0, len(convs), shard_size):
    write_shard(directory, i // shard_size, convs[i:i + shard_size])
    shards.append({"name": f"shard-{i // shard_size:05d}.array_record", "count": len(convs[i:i + shard_size])})
  atomic_write_json(os.path.join(directory, MANIFEST), {
      "format_version": FORMAT_VERSION, "model_fingerprint": model_fingerprint, "model_source": "tiny",
      "top_k": top_k, "shards": shards, "complete": True,
      "doc_ids": list(doc_ids) if doc_ids else sorted({c.doc_id for c in convs}),
      "config": {"conversations_per_doc": per_doc or len(convs), "shard_size": shard_size}})


def single_doc_dataset(directory: str, model) -> tuple[np.ndarray, list[Conversation]]:
  """The single-cartridge test dataset: a 24-token document (seed 1) and 12 teacher-labelled
  conversations about it (prompt 6, answer 10, top-8), written to `directory`."""
  doc = np.random.default_rng(1).integers(2, 128, 24).astype(np.int32)
  convs = teacher_conversations(model, doc, num=12, prompt_len=6, answer_len=10, top_k=8, seed=0)
  write_dataset(directory, convs, model_fingerprint="tiny")
  return doc, convs


def cas_dataset(directory: str, model, *, num_docs: int = 6, per_doc: int = 4) -> dict[str, np.ndarray]:
  """The CAS test dataset: `num_docs` 16-token documents doc0.. (seed 0), `per_doc`
  teacher-labelled conversations each (prompt 4, answer 6, top-8), written to `directory` in
  shards of 4. Returns {doc_id: token ids}."""
  rng = np.random.default_rng(0)
  docs = {f"doc{i}": rng.integers(2, 128, 16).astype(np.int32) for i in range(num_docs)}
  convs = []
  for i, (d, ids) in enumerate(docs.items()):
    convs += teacher_conversations(model, ids, num=per_doc, prompt_len=4, answer_len=6, top_k=8, seed=i, doc_id=d)
  write_dataset(directory, convs, model_fingerprint="tiny", shard_size=4, doc_ids=list(docs), per_doc=per_doc)
  return docs


def real_tokenizer():
  """The default model's real tokenizer (SmolLM2, from the fetched GGUF; cached per process)."""
  global _TOK
  if _TOK is None:
    from cas.model.loader import resolve_model_path
    from cas.model.tokenizer import Tokenizer
    _TOK = Tokenizer.from_path(resolve_model_path(None))
  return _TOK


_TOK = None

TINY_SMOL_VOCAB = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=100000.0,
                              tie_word_embeddings=True)


def tiny_smol_lm(seed: int):
  """The tiny random model with the real SmolLM2 tokenizer (TINY_SMOL_VOCAB, weights x3) as a
  cas.model.loader.LoadedModel, for pipeline tests that pass `lm=` instead of loading a model."""
  from cas.model.loader import LoadedModel
  return LoadedModel(model=tiny_model(seed=seed, cfg=TINY_SMOL_VOCAB, scale=3.0), tokenizer=real_tokenizer(),
                     config=TINY_SMOL_VOCAB, source="tiny-random", fingerprint=f"tiny-random-smol-vocab-{seed}",
                     hf_config={})


def tiny_cas_config(num_docs: int = 2):
  """configs/cas.py:quick shrunk for a tiny model on a CPU: one device (no mesh), 2 self-study
  conversations of 6 + 6 tokens per document (top-4), p = 8, 2 rows of 64 tokens, logs and
  checkpoints every 2 steps. Tests set what they exercise on top (steps, slots, methods, data)."""
  from configs.cas import get_config
  c = get_config("quick")
  c.data.num_docs = num_docs
  c.mesh = None  # one device (the 8 fake CPU devices of conftest would need num_slots % 8 == 0)
  c.synth.conversations, c.synth.shard_size, c.synth.batch_size = 2, 4, 4
  c.synth.min_chunk, c.synth.max_chunk = 32, 64
  c.synth.max_user_tokens, c.synth.max_answer_tokens = 6, 6
  c.synth.top_k = 4
  c.cartridge.num_tokens = 8
  c.train.batch_size, c.train.seq_len = 2, 64
  c.train.log_every = c.train.ckpt_every = 2
  return c


def store_init_cartridges(stages, workdir: str) -> None:
  """Fill <workdir>/cas/store with every document's init cartridge of a `CasStages` (zero Adam
  state, step 0) and its frozen sink: an evaluation-ready store without training."""
  from cas.rotation.store import ARRAY_NAMES, CartridgeStore
  init = stages._init_fn()
  with CartridgeStore(os.path.join(workdir, "cas", "store"), spec=stages.spec,
                      model_fingerprint=stages.lm.fingerprint) as store:
    items = []
    for d in stages.docs:
      a = init(d.doc_id)
      items.append((d.doc_id, {**a, **{n: np.zeros_like(a["k"]) for n in ARRAY_NAMES if n not in a}}, 0))
    store.put_many(items)
    store.put_frozen(*stages._sink())
