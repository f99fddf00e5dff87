"""Bounded local load test of the server (issue 22): `launch.serve` on loopback, N concurrent
clients for a fixed time, requests/s and latency percentiles, failed requests (must be 0).

What it does:
  1. builds a cartridge store for the model: `--docs` documents (prose from cas/data/texts), each
     cartridge initialised from the document's first `--p` tokens (untrained, the served shapes);
  2. starts `python -m launch.serve --store=... --host=127.0.0.1` as a subprocess with a random
     API key in CAS_API_KEY (so the key check is on the measured path) and waits for /health;
  3. runs `--concurrency` client threads (one keep-alive HTTP connection each) that send
     non-streamed chat completions, each naming one random document's cartridge and one of a few
     questions, `max_tokens=--max_tokens`, greedy; first for `--warmup_s` (compilation of the
     batch / length buckets; discarded), then for `--duration_s` (measured: requests started in
     the window, all waited for);
  4. prints a markdown table (and JSON lines to --out): requests, failed, requests/s, generated
     tokens/s, latency p50/p90/p99, and the server's compiled programs before/after the window.

  python -m benchmarks.serve_load                          # default model, CPU ok
  python -m benchmarks.serve_load --duration_s=60 --concurrency=16 --max_batch=16
  python -m benchmarks.serve_load --model_path=/path/to/tiny-hf-dir --docs=2 --p=16   # tiny model
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags, logging

F = flags.FLAGS
flags.DEFINE_string("model_path", None, "Model (.gguf or HF dir); default: the default SmolLM2 GGUF.")
flags.DEFINE_integer("docs", 8, "Documents (cartridges) in the served store.")
flags.DEFINE_integer("p", 128, "Cartridge tokens.")
flags.DEFINE_integer("concurrency", 8, "Concurrent clients.")
flags.DEFINE_float("duration_s", 30.0, "Measured window (seconds).")
flags.DEFINE_float("warmup_s", 30.0, "Load before the window (compilation), discarded.")
flags.DEFINE_integer("max_tokens", 32, "max_tokens of every request.")
flags.DEFINE_float("temperature", 0.0, "temperature of every request (0: greedy).")
flags.DEFINE_float("top_p", 1.0, "top_p of every request (below 1 the server sorts the vocabulary per step).")
flags.DEFINE_integer("max_batch", 8, "The server's --max_batch.")
flags.DEFINE_string("dtype", "float32", "The server's --dtype.")
flags.DEFINE_list("serve_flags", [], "More flags for launch.serve, e.g. --serve_flags=--presplit,--split_cache")
flags.DEFINE_float("request_timeout_s", 300.0, "Client timeout per request (a timeout counts as failed).")
flags.DEFINE_float("startup_timeout_s", 600.0, "Seconds to wait for the server's /health.")
flags.DEFINE_string("out", None, "Append JSON lines here.")
flags.DEFINE_integer("seed", 0, "Seed (documents, request mix).")

QUESTIONS = ["What is this document about?", "Who is the main person in the text?",
             "Summarize the first paragraph in one sentence.", "Name one place mentioned in the text.",
             "When did the events described take place?", "What happened first?"]


def prose_texts(n: int, seed: int) -> list[str]:
  """n passages of the built-in prose file (cas/data/texts/prose.jsonl.gz), in a seeded order."""
  path = os.path.join(os.path.dirname(__file__), "..", "cas", "data", "texts", "prose.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as fh:
    recs = [json.loads(line) for line in fh if line.strip()]
  texts = []
  for r in recs:
    t = " ".join(b[1] for b in r.get("blocks", []) if isinstance(b, list) and len(b) > 1 and isinstance(b[1], str))
    if len(t) > 2000:
      texts.append(t)
  if len(texts) < n:
    raise SystemExit(f"serve_load: only {len(texts)} prose passages, --docs={n}")
  order = np.random.default_rng(seed).permutation(len(texts))[:n]
  return [texts[i] for i in order]


def build_store(store_dir: str, model_path: str | None, docs: int, p: int, seed: int) -> list[str]:
  """A cartridge store with `docs` cartridges initialised from each text's first p tokens; returns doc ids."""
  from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
  from cas.model.loader import load_model
  from cas.rotation.store import CartridgeStore
  lm = load_model(model_path)
  spec = CartridgeSpec.for_model(lm.config, p, 1)
  ids = [f"doc_{i}" for i in range(docs)]
  with CartridgeStore(store_dir, spec=spec, model_fingerprint=lm.fingerprint) as store:
    items = []
    for i, (d, text) in enumerate(zip(ids, prose_texts(docs, seed))):
      c = init_cartridge(lm.model, lm.tokenizer.encode(text), p, sink_ids=[lm.tokenizer.bos_id])
      if i == 0:
        store.put_frozen(c.frozen_k[...], c.frozen_v[...])
      k, v = np.asarray(c.k[...]), np.asarray(c.v[...])
      z = np.zeros_like(k)
      items.append((d, {"k": k, "v": v, "mu_k": z, "mu_v": z, "nu_k": z, "nu_v": z}, 1))
    store.put_many(items)
  return ids


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def get_json(port: int, path: str, key: str, timeout: float = 10.0) -> dict:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
      raise RuntimeError(f"GET {path}: HTTP {r.status} {body[:200]!r}")
    return json.loads(body)
  finally:
    conn.close()


def wait_ready(proc: subprocess.Popen, port: int, key: str, timeout: float, log_path: str) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise SystemExit(f"serve_load: the server exited with status {proc.returncode}; its log: {log_path}")
    try:
      get_json(port, "/health", key, timeout=2)
      return
    except (OSError, RuntimeError):
      time.sleep(1.0)
  raise SystemExit(f"serve_load: the server did not answer /health within {timeout:.0f}s; log: {log_path}")


class Load:
  """`concurrency` client threads sending chat completions until `stop_at`; results per request:
  (start, latency s, ok, completion tokens, error)."""

  def __init__(self, port: int, key: str, model: str, doc_ids: list[str], seed: int):
    self.port, self.key, self.model, self.doc_ids, self.seed = port, key, model, doc_ids, seed
    self.results: list[tuple[float, float, bool, int, str | None]] = []
    self._lock = threading.Lock()

  def _client(self, i: int, stop_at: float) -> None:
    rng = np.random.default_rng([self.seed, i, int(stop_at)])
    conn = None
    while time.time() < stop_at:
      body = {"model": self.model, "temperature": F.temperature, "top_p": F.top_p, "max_tokens": F.max_tokens,
              "messages": [{"role": "user", "content": QUESTIONS[rng.integers(len(QUESTIONS))]}],
              "cartridges": [self.doc_ids[rng.integers(len(self.doc_ids))]]}
      t0 = time.time()
      ok, ntok, err = False, 0, None
      try:
        if conn is None:
          conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=F.request_timeout_s)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        r = conn.getresponse()
        data = r.read()
        if r.status == 200:
          out = json.loads(data)
          ok, ntok = True, int(out["usage"]["completion_tokens"])
        else:
          err = f"HTTP {r.status}: {data[:200]!r}"
      except Exception as e:  # a failed request, counted
        err = f"{type(e).__name__}: {e}"
        if conn is not None:
          conn.close()
        conn = None
      with self._lock:
        self.results.append((t0, time.time() - t0, ok, ntok, err))
    if conn is not None:
      conn.close()

  def run(self, concurrency: int, seconds: float) -> tuple[list, float]:
    """Load for `seconds`; returns (results of this run, wall seconds until the last one ended)."""
    n0 = len(self.results)
    t0 = time.time()
    threads = [threading.Thread(target=self._client, args=(i, t0 + seconds), daemon=True) for i in range(concurrency)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return self.results[n0:], time.time() - t0


def summarize(results: list, wall: float) -> dict:
  lat = np.array([r[1] for r in results if r[2]])
  failed = [r for r in results if not r[2]]
  pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
  return {"requests": len(results), "ok": int(len(lat)), "failed": len(failed),
          "failures": sorted({r[4] for r in failed})[:5], "wall_s": wall,
          "requests_per_s": len(lat) / wall, "generated_tokens_per_s": sum(r[3] for r in results) / wall,
          "mean_completion_tokens": float(np.mean([r[3] for r in results if r[2]])) if len(lat) else 0.0,
          "p50_s": pct(50), "p90_s": pct(90), "p99_s": pct(99)}


def table(rec: dict) -> str:
  cols = ["model", "docs", "p", "concurrency", "max_batch", "max_tokens", "duration_s", "requests", "failed",
          "requests_per_s", "generated_tokens_per_s", "p50_s", "p90_s", "p99_s", "compiles_in_window"]
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                    "| " + " | ".join(fmt(rec[c]) for c in cols) + " |"])


def main(argv):
  del argv
  from cas.model.loader import resolve_model_path
  model_path = str(resolve_model_path(F.model_path))
  work = tempfile.mkdtemp(prefix="cas_serve_load_")
  store = os.path.join(work, "store")
  t0 = time.time()
  doc_ids = build_store(store, model_path, F.docs, F.p, F.seed)
  logging.info("store of %d cartridges (p=%d) built in %.1fs: %s", F.docs, F.p, time.time() - t0, store)
  port, key = free_port(), secrets.token_hex(16)
  log_path = os.path.join(work, "server.log")
  cmd = [sys.executable, "-m", "launch.serve", f"--store=bench={store}", f"--model_path={model_path}",
         "--host=127.0.0.1", f"--port={port}", f"--max_batch={F.max_batch}", f"--dtype={F.dtype}",
         "--retriever=none", f"--max_tokens={min(F.max_tokens, 256)}", *F.serve_flags]
  env = {**os.environ, "CAS_API_KEY": key}
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
  try:
    wait_ready(proc, port, key, F.startup_timeout_s, log_path)
    model = get_json(port, "/v1/models", key)["data"][0]["id"]
    load = Load(port, key, model, doc_ids, F.seed)
    if F.warmup_s > 0:
      warm, wall = load.run(F.concurrency, F.warmup_s)
      logging.info("warm-up: %s", json.dumps(summarize(warm, wall)))
    traces0 = get_json(port, "/v1/cas/stats", key)["traces"]
    res, wall = load.run(F.concurrency, F.duration_s)
    stats = get_json(port, "/v1/cas/stats", key)
    rec = {"benchmark": "serve_load", "model": os.path.basename(model_path), "docs": F.docs, "p": F.p,
           "concurrency": F.concurrency, "max_batch": F.max_batch, "max_tokens": F.max_tokens,
           "temperature": F.temperature, "top_p": F.top_p, "duration_s": F.duration_s, "warmup_s": F.warmup_s,
           "dtype": F.dtype, "serve_flags": list(F.serve_flags),
           "compiles_in_window": stats["traces"] - traces0, "server_batches": stats["batches"],
           "server_max_batch_size": stats["max_batch_size"], "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), **summarize(res, wall)}
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
  print(json.dumps(rec))
  print(table(rec))
  if F.out:
    with open(F.out, "a") as fh:
      fh.write(json.dumps(rec) + "\n")
  if rec["failed"]:
    raise SystemExit(f"serve_load: {rec['failed']} failed request(s): {rec['failures']}")


if __name__ == "__main__":
  app.run(main)
