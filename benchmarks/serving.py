"""Issue 7.3: serving with a cartridge vs in-context learning (ICL), memory and throughput.

The Cartridges paper's claim (38.6x less memory, 26.4x higher throughput than ICL) in our stack:
one random-weight model (default Llama-3.1-8B shape, bf16) answers questions about a document
either
  * cartridge: p cartridge tokens in each sequence's KV cache (p = 2048), then the question, or
  * icl: the whole document (32k or 128k tokens) in each sequence's KV cache, then the question.
Everything else is identical: the question (`--question_len` = 64 tokens) is prefilled into the
cache, then `--answer_len` (128) answer tokens are decoded greedily one at a time with cas's
KVCache path (`model(tokens, positions, cache=KVCache)`, a jitted single-token step with the
cache donated). Each sequence holds its own context KV (no prefix sharing between sequences),
as a server does when every request names its own document or cartridge.

Memory: KV bytes per sequence are exact from the shapes (keys + values, bf16, all layers, over
the cache length context + question + answer) plus the int32 segment ids. The largest batch is
(free device memory after the weights - a reserve) / (KV bytes per sequence + an estimate of the
question prefill's temporaries per sequence), capped at `--max_batch`; it is verified by running
at that batch and backing off by 20% on out-of-memory.

Throughput: decode tokens/s = batch * answer_len / decode time (compilation excluded, two
warm-up steps excluded); answers/s = batch / (question prefill + decode). The context KV
(cartridge or document) is *resident*: it is filled with constant values instead of being
prefilled, because the decode cost does not depend on the values (random weights make a real
prefill no more meaningful). The real document prefill time (chunked, batch 1, attention
`--prefill_attn`) is measured separately for documents up to `--prefill_max_len` tokens and
reported on its own, with answers/s if every ICL request had to prefill its document.

Ratios reported per document length: memory (ICL / cartridge KV bytes per sequence), max batch,
decode tokens/s and answers/s (cartridge / ICL).

  python -m benchmarks.serving --model=llama-3.1-8b --doc_lens=32768,131072
  python -m benchmarks.serving --smoke
"""
from __future__ import annotations

import functools
import time

from benchmarks import _common as C  # first: sets up cas.model imports and the memory fraction

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cas.model import attention as attn_lib
from cas.model.llama import KVCache

F = flags.FLAGS
flags.DEFINE_string("model", "llama-3.1-8b", "PRESETS name or tiny")
flags.DEFINE_list("doc_lens", ["32768", "131072"], "document lengths (tokens) for ICL")
flags.DEFINE_integer("p", 2048, "cartridge tokens")
flags.DEFINE_integer("question_len", 64, "question tokens")
flags.DEFINE_integer("answer_len", 128, "answer tokens decoded")
flags.DEFINE_integer("max_batch", 512, "batch cap")
flags.DEFINE_float("reserve_gb", 3.0, "device memory kept free beyond the estimate")
flags.DEFINE_float("mem_budget_gb", None, "pretend device budget for the KV caches (CPU / smoke)")
flags.DEFINE_integer("prefill_max_len", 32768, "measure the real chunked document prefill up to this length")
flags.DEFINE_string("prefill_attn", "reference", "attention for the document prefill")
flags.DEFINE_string("attn", "reference", "attention for question prefill and decode")
flags.DEFINE_bool("smoke", False, "tiny model on CPU")
flags.DEFINE_string("out", None, "append JSON lines here")
flags.DEFINE_integer("seed", 0, "seed")


def kv_bytes_per_seq(cfg, length: int) -> int:
  """Exact cache bytes of one sequence: bf16 keys + values over all layers, int32 segment ids."""
  return 2 * cfg.num_layers * length * cfg.num_kv_heads * cfg.head_dim * 2 + 4 * length


def prefill_temp_per_seq(cfg, q: int, length: int) -> int:
  """Rough per-sequence temporaries of the question prefill: f32 scores + bf16 probs over the
  cache, plus MLP activations."""
  return cfg.num_heads * q * length * 6 + 4 * q * (cfg.hidden_size + cfg.intermediate_size) * 2


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def filled_cache(cfg, batch: int, size: int, ctx: int) -> KVCache:
  """A cache [L, batch, size, Hkv, D] bf16 whose first `ctx` slots hold (constant) context KV."""
  shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
  seg = jnp.broadcast_to((jnp.arange(size) < ctx).astype(jnp.int32)[None], (batch, size))
  return KVCache(jnp.full(shape, 0.01, jnp.bfloat16), jnp.full(shape, 0.01, jnp.bfloat16), seg,
                 jnp.asarray(ctx, jnp.int32))


def _prefill_question(model, cache, tokens, positions):
  """tokens, positions [B, Q] int32 -> (next token [B] int32, cache)."""
  h, cache = model(tokens, positions, jnp.ones_like(tokens), cache=cache, return_hidden=True)
  logits = model.logits_from_hidden(h[:, -1:])[:, 0]  # [B, V] f32
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


def _decode(model, cache, tok, pos):
  """tok [B] int32, pos [] int32 (same position for every row) -> (next token [B], cache)."""
  b = tok.shape[0]
  positions = jnp.full((b, 1), pos, jnp.int32)
  logits, cache = model(tok[:, None], positions, jnp.ones((b, 1), jnp.int32), cache=cache)
  return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache


def _prefill_chunk(model, cache, tokens, positions):
  _, cache = model(tokens, positions, jnp.ones_like(tokens), cache=cache, return_hidden=True)
  return cache


def measure_doc_prefill(cfg, model, doc_len: int, emit: C.Emitter) -> float | None:
  """Seconds to prefill one document of `doc_len` tokens (batch 1, chunked, compile excluded)."""
  size = doc_len + F.question_len + F.answer_len
  # Chunk so that the f32 scores of one chunk stay under ~8 GB (reference attention).
  c = 4096
  while c > 128 and cfg.num_heads * c * size * 8 > 8e9:
    c //= 2
  c = min(c, doc_len)
  while doc_len % c:
    c //= 2
  prev = attn_lib.install(F.prefill_attn)
  try:
    cache = KVCache.empty(cfg, 1, size, jnp.bfloat16)
    toks = jnp.asarray(np.random.default_rng(F.seed).integers(3, cfg.vocab_size, (1, doc_len)), jnp.int32)
    fn = jax.jit(_prefill_chunk, donate_argnums=1)
    pos0 = jnp.arange(c, dtype=jnp.int32)[None]
    t0 = time.perf_counter()
    compiled = fn.lower(model, cache, toks[:, :c], pos0).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(doc_len // c):
      cache = compiled(model, cache, toks[:, i * c:(i + 1) * c], pos0 + i * c)
    jax.block_until_ready(cache.k)
    dt = time.perf_counter() - t0
    emit.emit({"method": "icl", "event": "doc_prefill", "doc_len": doc_len, "chunk": c,
               "prefill_attn": F.prefill_attn, "compile_s": compile_s, "prefill_s": dt,
               "prefill_tokens_per_s": doc_len / dt, "status": "ok"})
    del cache
    return dt
  except Exception as e:
    emit.emit({"method": "icl", "event": "doc_prefill", "doc_len": doc_len, "chunk": c,
               "status": "oom" if C.is_oom(e) else "error", "error": C.short_error(e)})
    logging.exception("document prefill failed")
    return None
  finally:
    attn_lib.restore(prev)


def free_bytes() -> float:
  if F.mem_budget_gb is not None:
    return F.mem_budget_gb * 2**30
  mem = C.jax_memory()
  if not mem or "bytes_limit" not in mem:
    raise SystemExit("serving: device memory stats unavailable; pass --mem_budget_gb")
  return mem["bytes_limit"] - mem["bytes_in_use"]


def run_method(cfg, model, method: str, ctx: int, emit: C.Emitter, doc_len: int | None) -> dict:
  """Largest-batch run of one method with `ctx` resident context tokens."""
  q, a = F.question_len, F.answer_len
  size = ctx + q + a
  per_seq = kv_bytes_per_seq(cfg, size)
  temp = prefill_temp_per_seq(cfg, q, size)
  free = free_bytes() - F.reserve_gb * 2**30 * (0 if F.mem_budget_gb is not None else 1)
  b = int(max(1, min(F.max_batch, free // (per_seq + temp))))
  rec = {"method": method, "ctx_tokens": ctx, "doc_len": doc_len, "cache_len": size,
         "kv_bytes_per_seq": per_seq, "free_bytes": int(free), "batch_estimate": b, "attn": F.attn}
  prev = attn_lib.install(F.attn)
  try:
    for attempt in range(6):
      try:
        rng = np.random.default_rng(F.seed + attempt)
        cache = filled_cache(cfg, b, size, ctx)
        qt = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, q)), jnp.int32)
        qp = jnp.broadcast_to(ctx + jnp.arange(q, dtype=jnp.int32)[None], (b, q))
        t0 = time.perf_counter()
        pre = jax.jit(_prefill_question, donate_argnums=1).lower(model, cache, qt, qp).compile()
        tok0 = jnp.zeros((b,), jnp.int32)
        dec = jax.jit(_decode, donate_argnums=1).lower(model, cache, tok0, jnp.int32(0)).compile()
        compile_s = time.perf_counter() - t0
        # Warm-up: prefill + 2 decode steps, then rewind the cache to after the question.
        tok, cache = pre(model, cache, qt, qp)
        for i in range(2):
          tok, cache = dec(model, cache, tok, jnp.int32(ctx + q + i))
        jax.block_until_ready(tok)
        cache = cache._replace(index=jnp.asarray(ctx, jnp.int32))
        t0 = time.perf_counter()
        tok, cache = pre(model, cache, qt, qp)
        jax.block_until_ready(tok)
        q_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(a):
          tok, cache = dec(model, cache, tok, jnp.int32(ctx + q + i))
        jax.block_until_ready(tok)
        d_s = time.perf_counter() - t0
        rec.update({"status": "ok", "batch": b, "attempts": attempt + 1, "compile_s": compile_s,
                    "question_prefill_s": q_s, "decode_s": d_s, "decode_tokens_per_s": b * a / d_s,
                    "answers_per_s": b / (q_s + d_s), "kv_bytes_total": per_seq * b,
                    "memory": C.jax_memory()})
        del cache
        break
      except Exception as e:
        if not C.is_oom(e):
          raise
        emit.emit({"method": method, "doc_len": doc_len, "event": "oom_backoff", "batch": b,
                   "error": C.short_error(e, 200)})
        cache = None
        b = max(1, int(b * 0.8))
    else:
      rec.update({"status": "oom"})
  except Exception as e:
    rec.update({"status": "error", "error": C.short_error(e)})
    logging.exception("serving %s failed", method)
  finally:
    attn_lib.restore(prev)
  return emit.emit(rec)


def main(argv):
  del argv
  if F.smoke:
    F.model, F.p, F.question_len, F.answer_len = "tiny", 32, 8, 8
    if F["doc_lens"].present == 0:
      F.doc_lens = ["256", "1024"]
    F.max_batch, F.prefill_max_len = 64, 256
    if F.mem_budget_gb is None:
      F.mem_budget_gb = 0.02
  cfg = C.model_config(F.model)
  info = C.jax_device_info()
  emit = C.Emitter(F.out, "serving", {"model": F.model, "device": info["device"], "jax": info["jax"],
                                      "question_len": F.question_len, "answer_len": F.answer_len})
  t0 = time.perf_counter()
  model = C.init_random_model(cfg, dtype=jnp.bfloat16, seed=F.seed)
  jax.block_until_ready(model.embed[...])
  emit.emit({"event": "model_init", "init_s": time.perf_counter() - t0, "memory": C.jax_memory()})

  doc_lens = [int(x) for x in F.doc_lens]
  prefill_s = {d: measure_doc_prefill(cfg, model, d, emit) for d in doc_lens if d <= F.prefill_max_len}
  cart = run_method(cfg, model, "cartridge", F.p, emit, None)
  results = []
  for d in doc_lens:
    icl = run_method(cfg, model, "icl", d, emit, d)
    results.append(icl)
    row = {"comparison": "cartridge_vs_icl", "doc_len": d, "p": F.p,
           "memory_ratio": icl["kv_bytes_per_seq"] / cart["kv_bytes_per_seq"],
           "paper_memory_ratio": 38.6, "paper_throughput_ratio": 26.4}
    if cart.get("status") == "ok" and icl.get("status") == "ok":
      row.update({"batch_cartridge": cart["batch"], "batch_icl": icl["batch"],
                  "batch_ratio": cart["batch"] / icl["batch"],
                  "decode_throughput_ratio": cart["decode_tokens_per_s"] / icl["decode_tokens_per_s"],
                  "answers_per_s_ratio": cart["answers_per_s"] / icl["answers_per_s"]})
      if prefill_s.get(d):
        with_prefill = icl["batch"] / (icl["question_prefill_s"] + icl["decode_s"] + icl["batch"] * prefill_s[d])
        row.update({"icl_doc_prefill_s": prefill_s[d], "icl_answers_per_s_with_doc_prefill": with_prefill,
                    "answers_per_s_ratio_with_doc_prefill": cart["answers_per_s"] / with_prefill})
    emit.emit(row)
  if F.smoke and [r for r in [cart, *results] if r.get("status") != "ok"]:
    raise SystemExit("smoke: a serving run failed")


if __name__ == "__main__":
  app.run(main)
