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

Issue 22 adds the ICL a user would deploy, *prefix caching* (`icl_shared`, as vLLM / SGLang): the
document's KV is computed once and shared by every request on it. Each row's cache holds only its
question and answer; the document rides as a batch-1 `Prefix` (the model's shared-prefix path,
so a faster shared-prefix attention shows up here). Memory = the document's KV once + the rows'
caches. And traffic over many documents (`--traffic_docs`, e.g. 64 documents of log-uniform
lengths in [--traffic_min_len, --traffic_max_len], `--traffic_requests` requests drawn uniformly
over them, question and answer as above), served three ways, every document's KV or cartridge
resident (prefilled beforehand, not timed):
  * cartridge: requests in batches of up to the cartridge batch, each row its own cartridge;
  * icl: per-request copies; requests sorted by document length, batched under the memory
    budget, each batch's cache as long as its longest document (rounded up to a power of two);
  * icl_shared: every document's KV once (if they do not all fit, reported as such, no eviction
    modelled); a request batch is the requests on one document (no paged attention here: rows of
    different documents would need their own prefix copies), up to the memory budget.
answers/s = requests / the sum of the batches' question prefill + decode times (compile excluded);
memory = resident KV (documents or cartridges) + the largest batch's caches.

  python -m benchmarks.serving --model=llama-3.1-8b --doc_lens=32768,131072
  python -m benchmarks.serving --model=llama-3.1-8b --doc_lens=32768,131072 --traffic_docs=64
  python -m benchmarks.serving --smoke               # tiny model on CPU (traffic: 6 documents)
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
from cas.model.llama import KVCache, Prefix

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
flags.DEFINE_list("methods", ["cartridge", "icl", "icl_shared"], "cartridge, icl (per-request document KV), "
                  "icl_shared (the document's KV once, shared by its requests), cartridge_shared (one "
                  "cartridge once, shared by every request on its document: the fair match for icl_shared)")
flags.DEFINE_integer("traffic_docs", 0, "documents of the many-document traffic (0: skip it)")
flags.DEFINE_integer("traffic_min_len", 1024, "shortest traffic document (tokens)")
flags.DEFINE_integer("traffic_max_len", 32768, "longest traffic document (tokens)")
flags.DEFINE_integer("traffic_requests", 512, "requests of the traffic, drawn uniformly over the documents")


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


def _prefill_question(model, cache, tokens, positions, prefix=None):
  """tokens, positions [B, Q] int32 -> (next token [B] int32, cache). prefix: None, or the shared
  document KV (`Prefix` k, v [L, 1, P, Hkv, D] bf16, mask [1, P] bool) that every row attends to."""
  h, cache = model(tokens, positions, jnp.ones_like(tokens), prefix=prefix, cache=cache, return_hidden=True)
  logits = model.logits_from_hidden(h[:, -1:])[:, 0]  # [B, V] f32
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


def _decode(model, cache, tok, pos, prefix=None):
  """tok [B] int32, pos [] int32 (same position for every row) -> (next token [B], cache)."""
  b = tok.shape[0]
  positions = jnp.full((b, 1), pos, jnp.int32)
  logits, cache = model(tok[:, None], positions, jnp.ones((b, 1), jnp.int32), prefix=prefix, cache=cache)
  return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def shared_prefix(cfg, size: int, ctx: int) -> Prefix:
  """A document's KV held once: k, v [L, 1, size, Hkv, D] bf16 (constant values), mask [1, size]
  True on the first `ctx` slots (the rest pads the length to a bucket)."""
  shape = (cfg.num_layers, 1, size, cfg.num_kv_heads, cfg.head_dim)
  return Prefix(jnp.full(shape, 0.01, jnp.bfloat16), jnp.full(shape, 0.01, jnp.bfloat16),
                (jnp.arange(size) < ctx)[None], None)


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


_COMPILED: dict = {}


def time_batch(cfg, model, b: int, ctx: int, cache_ctx: int, prefix: Prefix | None, seed: int) -> dict:
  """Question prefill + `answer_len` greedy decode steps for `b` rows whose context is `ctx` tokens:
  resident in each row's cache (cache_ctx = ctx slots, prefix None) or a shared `prefix`
  (cache_ctx = 0). Compile and two warm-up steps excluded. Returns compile_s, question_prefill_s,
  decode_s."""
  q, a = F.question_len, F.answer_len
  size = cache_ctx + q + a
  rng = np.random.default_rng(seed)
  cache = filled_cache(cfg, b, size, cache_ctx)
  qt = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, q)), jnp.int32)
  qp = jnp.broadcast_to(ctx + jnp.arange(q, dtype=jnp.int32)[None], (b, q))
  t0 = time.perf_counter()
  key = (id(model), b, size, None if prefix is None else prefix.k.shape)
  if key not in _COMPILED:  # one pair of programs per shape (the traffic runs reuse them)
    pre = jax.jit(_prefill_question, donate_argnums=1).lower(model, cache, qt, qp, prefix).compile()
    tok0 = jnp.zeros((b,), jnp.int32)
    dec = jax.jit(_decode, donate_argnums=1).lower(model, cache, tok0, jnp.int32(0), prefix).compile()
    _COMPILED[key] = (pre, dec)
  pre, dec = _COMPILED[key]
  compile_s = time.perf_counter() - t0
  # Warm-up: prefill + 2 decode steps, then rewind the cache to after the context.
  tok, cache = pre(model, cache, qt, qp, prefix)
  for i in range(2):
    tok, cache = dec(model, cache, tok, jnp.int32(ctx + q + i), prefix)
  jax.block_until_ready(tok)
  cache = cache._replace(index=jnp.asarray(cache_ctx, jnp.int32))
  t0 = time.perf_counter()
  tok, cache = pre(model, cache, qt, qp, prefix)
  jax.block_until_ready(tok)
  q_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(a):
    tok, cache = dec(model, cache, tok, jnp.int32(ctx + q + i), prefix)
  jax.block_until_ready(tok)
  d_s = time.perf_counter() - t0
  del cache
  return {"compile_s": compile_s, "question_prefill_s": q_s, "decode_s": d_s}


def shared_bytes(cfg, length: int) -> int:
  """Bytes of one document's KV held once (bf16 keys + values, all layers)."""
  return 2 * cfg.num_layers * length * cfg.num_kv_heads * cfg.head_dim * 2


def run_method(cfg, model, method: str, ctx: int, emit: C.Emitter, doc_len: int | None) -> dict:
  """Largest-batch run of one method with `ctx` context tokens: resident in every row's cache
  (cartridge, icl) or once, shared by every row (icl_shared)."""
  q, a = F.question_len, F.answer_len
  shared = method in ("icl_shared", "cartridge_shared")
  cache_ctx = 0 if shared else ctx
  size = cache_ctx + q + a
  per_seq = kv_bytes_per_seq(cfg, size)
  temp = prefill_temp_per_seq(cfg, q, ctx + q + a)
  if shared:  # the 4-argument path broadcasts the shared prefix per row, one layer at a time
    temp += shared_bytes(cfg, ctx) // cfg.num_layers
  once = shared_bytes(cfg, ctx) if shared else 0
  free = free_bytes() - F.reserve_gb * 2**30 * (0 if F.mem_budget_gb is not None else 1)
  b = int(max(1, min(F.max_batch, (free - once) // (per_seq + temp))))
  rec = {"method": method, "ctx_tokens": ctx, "doc_len": doc_len, "cache_len": size,
         "kv_bytes_per_seq": per_seq, "kv_bytes_shared": once, "free_bytes": int(free), "batch_estimate": b,
         "attn": F.attn}
  prev = attn_lib.install(F.attn)
  try:
    prefix = shared_prefix(cfg, ctx, ctx) if shared else None
    for attempt in range(6):
      try:
        t = time_batch(cfg, model, b, ctx, cache_ctx, prefix, F.seed + attempt)
        rec.update({"status": "ok", "batch": b, "attempts": attempt + 1, **t,
                    "decode_tokens_per_s": b * a / t["decode_s"],
                    "answers_per_s": b / (t["question_prefill_s"] + t["decode_s"]),
                    "kv_bytes_total": per_seq * b + once, "memory": C.jax_memory()})
        break
      except Exception as e:
        if not C.is_oom(e):
          raise
        emit.emit({"method": method, "doc_len": doc_len, "event": "oom_backoff", "batch": b,
                   "error": C.short_error(e, 200)})
        b = max(1, int(b * 0.8))
    else:
      rec.update({"status": "oom"})
    del prefix
  except Exception as e:
    rec.update({"status": "error", "error": C.short_error(e)})
    logging.exception("serving %s failed", method)
  finally:
    attn_lib.restore(prev)
  return emit.emit(rec)


def _bucket(n: int) -> int:
  """The power of two >= n (cache and prefix lengths, so few programs are compiled)."""
  return 1 << max(0, (n - 1).bit_length())


def run_traffic(cfg, model, emit: C.Emitter, cart: dict | None) -> list[dict]:
  """Many-document traffic (module docstring): cartridge vs icl vs icl_shared, answers/s and memory."""
  rng = np.random.default_rng(F.seed + 1)
  n = F.traffic_docs
  lens = np.exp(rng.uniform(np.log(F.traffic_min_len), np.log(F.traffic_max_len), n)).astype(int)
  req_docs = rng.integers(0, n, F.traffic_requests)
  q, a = F.question_len, F.answer_len
  free = free_bytes() - F.reserve_gb * 2**30 * (0 if F.mem_budget_gb is not None else 1)
  base = {"event": "traffic", "docs": n, "requests": int(F.traffic_requests), "doc_len_min": int(lens.min()),
          "doc_len_max": int(lens.max()), "doc_len_mean": float(lens.mean()), "free_bytes": int(free)}
  out = []
  prev = attn_lib.install(F.attn)
  try:
    for method in [m for m in F.methods if m != "cartridge_shared"]:  # one document only
      rec = {**base, "method": method}
      try:
        total_s, compile_s, batches, peak = 0.0, 0.0, 0, 0
        if method == "cartridge":
          if not cart or cart.get("status") != "ok":
            raise RuntimeError("the single-document cartridge run did not succeed")
          resident = n * shared_bytes(cfg, F.p)  # every cartridge stored once on the device
          b = cart["batch"]
          per_batch = cart["question_prefill_s"] + cart["decode_s"]  # rows cost the same on any document
          full, rest = divmod(F.traffic_requests, b)
          total_s = full * per_batch
          if rest:
            t = time_batch(cfg, model, rest, F.p, F.p, None, F.seed)
            total_s += t["question_prefill_s"] + t["decode_s"]
            compile_s += t["compile_s"]
          batches, peak = full + bool(rest), resident + cart["kv_bytes_total"]
        elif method == "icl":
          order = sorted(range(F.traffic_requests), key=lambda i: lens[req_docs[i]])
          resident = int(sum(shared_bytes(cfg, int(x)) for x in lens))  # the documents' KV, kept to copy from
          i = 0
          while i < len(order):
            size = _bucket(int(lens[req_docs[order[i]]]))
            per = kv_bytes_per_seq(cfg, size + q + a) + prefill_temp_per_seq(cfg, q, size + q + a)
            b = 1
            while (i + b < len(order) and b < F.max_batch and _bucket(int(lens[req_docs[order[i + b]]])) <= size
                   and (b + 1) * per <= free - resident):
              b += 1
            t = time_batch(cfg, model, b, size, size, None, F.seed + i)
            total_s += t["question_prefill_s"] + t["decode_s"]
            compile_s += t["compile_s"]
            batches += 1
            peak = max(peak, resident + b * kv_bytes_per_seq(cfg, size + q + a))
            i += b
        elif method == "icl_shared":
          resident = int(sum(shared_bytes(cfg, _bucket(int(x))) for x in lens))
          if resident > free:
            raise MemoryError(f"the {n} documents' KV ({resident / 2**30:.1f} GiB) does not fit in "
                              f"{free / 2**30:.1f} GiB")
          for d in range(n):
            rows = int(np.sum(req_docs == d))
            size = _bucket(int(lens[d]))
            prefix = shared_prefix(cfg, size, int(lens[d]))
            per = kv_bytes_per_seq(cfg, q + a) + prefill_temp_per_seq(cfg, q, size + q + a)
            per += shared_bytes(cfg, size) // cfg.num_layers
            cap = int(max(1, min(F.max_batch, (free - resident) // per)))
            while rows > 0:
              b = min(rows, cap)
              b_run = _bucket(b) if _bucket(b) <= cap else b  # rows padded to a power of two: few programs
              t = time_batch(cfg, model, b_run, size, 0, prefix, F.seed + d)
              total_s += t["question_prefill_s"] + t["decode_s"]
              compile_s += t["compile_s"]
              batches += 1
              peak = max(peak, resident + b * kv_bytes_per_seq(cfg, q + a))
              rows -= b
            del prefix
        else:
          raise ValueError(f"--methods: unknown method {method!r}")
        rec.update({"status": "ok", "batches": batches, "serve_s": total_s, "compile_s": compile_s,
                    "answers_per_s": F.traffic_requests / total_s, "kv_bytes_resident": resident,
                    "kv_bytes_peak": peak})
      except Exception as e:
        rec.update({"status": "oom" if C.is_oom(e) or isinstance(e, MemoryError) else "error",
                    "error": C.short_error(e)})
        if not isinstance(e, MemoryError):
          logging.exception("traffic %s failed", method)
      out.append(emit.emit(rec))
  finally:
    attn_lib.restore(prev)
  ok = {r["method"]: r for r in out if r.get("status") == "ok"}
  if "cartridge" in ok:
    emit.emit({"comparison": "traffic", **base, **{
        f"answers_per_s_ratio_vs_{m}": ok["cartridge"]["answers_per_s"] / ok[m]["answers_per_s"]
        for m in ("icl", "icl_shared") if m in ok}, **{
        f"memory_ratio_{m}_vs_cartridge": ok[m]["kv_bytes_peak"] / ok["cartridge"]["kv_bytes_peak"]
        for m in ("icl", "icl_shared") if m in ok}})
  return out


def main(argv):
  del argv
  if F.smoke:
    F.model, F.p, F.question_len, F.answer_len = "tiny", 32, 8, 8
    if F["doc_lens"].present == 0:
      F.doc_lens = ["256", "1024"]
    F.max_batch, F.prefill_max_len = 64, 256
    if F["traffic_docs"].present == 0:
      F.traffic_docs, F.traffic_min_len, F.traffic_max_len, F.traffic_requests = 6, 64, 512, 24
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
  unknown = [m for m in F.methods if m not in ("cartridge", "icl", "icl_shared", "cartridge_shared")]
  if unknown or "cartridge" not in F.methods:
    raise SystemExit(f"--methods={F.methods}: choose from cartridge, icl, icl_shared, cartridge_shared "
                     "(cartridge is the reference)")
  prefill_s = {d: measure_doc_prefill(cfg, model, d, emit) for d in doc_lens if d <= F.prefill_max_len}
  cart = run_method(cfg, model, "cartridge", F.p, emit, None)
  results = [cart]
  cart_sh = run_method(cfg, model, "cartridge_shared", F.p, emit, None) if "cartridge_shared" in F.methods else None
  if cart_sh is not None:
    results.append(cart_sh)
  for d in doc_lens:
    row = {"comparison": "cartridge_vs_icl", "doc_len": d, "p": F.p,
           "paper_memory_ratio": 38.6, "paper_throughput_ratio": 26.4}
    for method in [m for m in F.methods if m not in ("cartridge", "cartridge_shared")]:
      r = run_method(cfg, model, method, d, emit, d)
      results.append(r)
      sfx = "" if method == "icl" else "_" + method
      row[f"memory_ratio{sfx}"] = (r["kv_bytes_per_seq"] * r.get("batch", 1) + r["kv_bytes_shared"]) / (
          cart["kv_bytes_per_seq"] * r.get("batch", 1)) if method == "icl_shared" else (
          r["kv_bytes_per_seq"] / cart["kv_bytes_per_seq"])
      if cart.get("status") == "ok" and r.get("status") == "ok":
        row.update({f"batch{sfx}": r["batch"], "batch_cartridge": cart["batch"],
                    f"batch_ratio{sfx}": cart["batch"] / r["batch"],
                    f"decode_throughput_ratio{sfx}": cart["decode_tokens_per_s"] / r["decode_tokens_per_s"],
                    f"answers_per_s_ratio{sfx}": cart["answers_per_s"] / r["answers_per_s"]})
        if method == "icl" and prefill_s.get(d):
          with_prefill = r["batch"] / (r["question_prefill_s"] + r["decode_s"] + r["batch"] * prefill_s[d])
          row.update({"icl_doc_prefill_s": prefill_s[d], "icl_answers_per_s_with_doc_prefill": with_prefill,
                      "answers_per_s_ratio_with_doc_prefill": cart["answers_per_s"] / with_prefill})
      if method == "icl_shared" and cart_sh is not None and cart_sh.get("status") == "ok" and r.get("status") == "ok":
        # both shared once: one cartridge vs one document as the batch's prefix
        row.update({"batch_cartridge_shared": cart_sh["batch"],
                    "memory_ratio_shared_vs_shared": r["kv_bytes_shared"] / max(cart_sh["kv_bytes_shared"], 1),
                    "answers_per_s_ratio_shared_vs_shared": cart_sh["answers_per_s"] / r["answers_per_s"],
                    "decode_throughput_ratio_shared_vs_shared":
                        cart_sh["decode_tokens_per_s"] / r["decode_tokens_per_s"]})
    emit.emit(row)
  if F.traffic_docs:
    results += run_traffic(cfg, model, emit, cart)
  if F.smoke and [r for r in results if r.get("status") != "ok"]:
    raise SystemExit("smoke: a serving run failed")


if __name__ == "__main__":
  app.run(main)
