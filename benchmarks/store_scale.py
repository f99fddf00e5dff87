"""Cartridge store at scale (issue 28): what a rotation's commit, a checkpoint's snapshot and
opening the store cost for N = 10^3 ... 10^6 documents, and the files and bytes on disk.

  python -m benchmarks.store_scale --sizes=1000,10000,100000,1000000 --out=benchmarks/results/store_scale.json

Per N, with tiny cartridges (spec L=2, p=4 (one sink token), Hkv=1, D=8: 6 arrays of [2, 3, 1, 8]
f32 = 1,152 bytes per document version), through the store's public API (no training):

  fill       register N documents, then put_many all of them in batches of --fill_batch (the
             bulk path: one pack and one commit per batch), then snapshot 0, then os.sync() (so
             that the fill's gigabyte of dirty pages is not written back inside the timed fsyncs
             of the commits that follow; its time is reported as sync_after_fill_s)
  rotation   --rotations times: put_many of --batch random documents (new arrays, count + 1) =
             one rotation's eviction commit; a snapshot (a checkpoint) every --ckpt_every.
             Rotations (and opens) run interleaved over the stores: rotation r on every N in turn
  open       after each of the last --opens rotations (a full cycle of record-chain lengths: the
             chain is folded into runs every FLUSH_RECORDS records), close the writer and time
             opening for writing (lock, newest record chain, cleanup listing) and read-only
             (median); at the end 40 gets (the first 8 map the index runs and crc32-check what
             they touch: O(N) bytes once; the rest: warm) and counts() (a full scan: O(N), done
             once and then kept up to date by the store)

Reported: median / max rotation commit, median snapshot, open (write / read-only), first and
warm get, counts(), files and bytes on disk, files per document. All times are wall seconds on
this machine; the store lives under --dir (a local disk).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np

from cas.cartridge.cartridge import CartridgeSpec
from cas.rotation.store import ARRAY_NAMES, CartridgeStore

SPEC = CartridgeSpec(num_layers=2, num_tokens=4, num_kv_heads=1, head_dim=8, num_frozen=1)
FP = "store-scale-benchmark"


def _disk(root: str) -> tuple[int, int]:
  files = size = 0
  for d, _, fs in os.walk(root):
    for f in fs:
      files += 1
      size += os.path.getsize(os.path.join(d, f))
  return files, size


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
  return {n: rng.standard_normal(SPEC.trainable_shape).astype(np.float32) for n in ARRAY_NAMES}  # [2, 3, 1, 8]


class Case:
  """One store of N documents under test (its ids, the counts written, the timings)."""

  def __init__(self, n: int, root: str, seed: int):
    self.n, self.root = n, root
    self.rng = np.random.default_rng(seed + n)
    self.ids = [f"doc/{i:07d}" for i in range(n)]
    self.pool = [_arrays(self.rng) for _ in range(16)]  # reused across documents: the bytes don't matter
    self.counts = dict.fromkeys(self.ids, 1)
    self.out: dict = {"n": n}
    self.commit: list[float] = []
    self.snap: list[float] = []
    self.commit_cpu: list[float] = []
    self.snap_cpu: list[float] = []
    self.open_w: list[float] = []
    self.open_r: list[float] = []
    self.st: CartridgeStore | None = None

  def fill(self, fill_batch: int) -> None:
    t = time.perf_counter()
    self.st = st = CartridgeStore(self.root, spec=SPEC, model_fingerprint=FP, keep_snapshots=3)
    st.register(self.ids)
    self.out["register_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, self.n, fill_batch):
      st.put_many([(d, self.pool[(i + j) % 16], 1) for j, d in enumerate(self.ids[i:i + fill_batch])])
    st.put_frozen(np.zeros(SPEC.frozen_shape, np.float32), np.zeros(SPEC.frozen_shape, np.float32))
    self.out["fill_s"] = time.perf_counter() - t
    st.snapshot(0)
    st.count(self.ids[0])  # the index runs are mapped and checked here, not inside the timed commits

  def rotation(self, r: int, batch: int, ckpt_every: int) -> None:
    docs = self.rng.choice(self.n, size=min(batch, self.n), replace=False)
    items = []
    for i in docs.tolist():
      self.counts[self.ids[i]] += 1
      items.append((self.ids[i], self.pool[(r + i) % 16], self.counts[self.ids[i]]))
    t, c = time.perf_counter(), time.process_time()
    self.st.put_many(items)
    self.commit.append(time.perf_counter() - t)
    self.commit_cpu.append(time.process_time() - c)
    if r % ckpt_every == 0:
      t, c = time.perf_counter(), time.process_time()
      self.st.snapshot(r)
      self.snap.append(time.perf_counter() - t)
      self.snap_cpu.append(time.process_time() - c)

  def finish_rotations(self) -> None:
    self.out.update(commit_median_s=statistics.median(self.commit), commit_max_s=max(self.commit),
                    commit_mean_s=statistics.fmean(self.commit), snapshot_median_s=statistics.median(self.snap),
                    snapshot_max_s=max(self.snap), commit_cpu_median_s=statistics.median(self.commit_cpu),
                    snapshot_cpu_median_s=statistics.median(self.snap_cpu), rotations=len(self.commit),
                    index=self.st.stats())
    self.st.close()
    self.st = None

  def reopen(self) -> None:
    """Close the writer and time opening the store for writing (the new object writes on) and a
    read-only open beside it."""
    self.st.close()
    t = time.perf_counter()
    self.st = CartridgeStore(self.root, spec=SPEC, model_fingerprint=FP, create=False, keep_snapshots=3)
    self.open_w.append(time.perf_counter() - t)
    t = time.perf_counter()
    r = CartridgeStore(self.root, spec=SPEC, model_fingerprint=FP, create=False, read_only=True)
    self.open_r.append(time.perf_counter() - t)
    r.close()

  def reads(self) -> None:
    st = CartridgeStore(self.root, spec=SPEC, model_fingerprint=FP, create=False, read_only=True)
    gets = []
    for i in self.rng.choice(self.n, size=min(40, self.n), replace=False).tolist():
      t = time.perf_counter()
      _, c = st.get(self.ids[i])
      gets.append(time.perf_counter() - t)
      assert c == self.counts[self.ids[i]]
    self.out["first_gets_s"] = sum(gets[:8])  # the first reads map the index runs and crc32-check them
    self.out["warm_get_s"] = statistics.median(gets[8:])
    t = time.perf_counter()
    got = st.counts()
    self.out["counts_s"] = time.perf_counter() - t
    assert got == self.counts, "counts differ from what was written"
    st.close()
    files, size = _disk(self.root)
    self.out.update(files=files, bytes=size, files_per_doc=files / self.n, bytes_per_doc=size / self.n)


def run(sizes: list[int], base: str, *, rotations: int, batch: int, ckpt_every: int, fill_batch: int, seed: int,
        opens: int) -> list[dict]:
  """Fill every store, then run the rotations and the opens interleaved over the stores (rotation
  r on each store in turn), so that the noise of a shared machine (other processes' CPU and I/O,
  which move fsync latencies by milliseconds) falls on every N alike."""
  cases = []
  for n in sizes:
    root = os.path.join(base, f"n{n}")
    shutil.rmtree(root, ignore_errors=True)
    c = Case(n, root, seed)
    c.fill(fill_batch)
    cases.append(c)
    print(f"filled N={n:,}: register {c.out['register_s']:.1f} s, put {c.out['fill_s']:.1f} s", flush=True)
  t = time.perf_counter()
  os.sync()  # the fills' dirty pages (GBs) are written back here, not inside the timed commits' fsyncs
  print(f"sync after the fills: {time.perf_counter() - t:.1f} s", flush=True)
  for r in range(1, rotations + 1):
    for c in cases:
      c.rotation(r, batch, ckpt_every)
      if r > rotations - opens:  # opens spread over the last rotations: every length of record chain
        c.reopen()
  for c in cases:
    c.finish_rotations()
    c.out.update(open_write_s=statistics.median(c.open_w), open_write_max_s=max(c.open_w),
                 open_read_s=statistics.median(c.open_r), open_read_max_s=max(c.open_r))
    c.reads()
    c.out["batch"] = batch
  return [c.out for c in cases]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="1000,10000,100000,1000000")
  ap.add_argument("--rotations", type=int, default=96)
  ap.add_argument("--batch", type=int, default=64, help="documents per rotation commit (B)")
  ap.add_argument("--ckpt_every", type=int, default=8, help="rotations per snapshot")
  ap.add_argument("--fill_batch", type=int, default=50_000)
  ap.add_argument("--opens", type=int, default=16,
                  help="after each of the last this many rotations, reopen the store (median reported)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dir", default=None, help="where the stores are built (default: a temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the stores")
  ap.add_argument("--out", default=None, help="also write the results as JSON")
  a = ap.parse_args(argv)
  base = a.dir or tempfile.mkdtemp(prefix="cas-store-scale-")
  t = time.time()
  results = run([int(x) for x in a.sizes.split(",")], base, rotations=a.rotations, batch=a.batch,
                ckpt_every=a.ckpt_every, fill_batch=a.fill_batch, seed=a.seed, opens=a.opens)
  for r in results:
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
  print(f"total {time.time() - t:.0f} s")
  hdr = ("| N | rotation commit ms: median (max), CPU | snapshot ms: median, CPU | open ms: write / read-only | "
         "first 8 gets ms | warm get ms | counts() s | files | files/doc | bytes on disk | bytes/doc |")
  print("\n" + hdr + "\n|" + "---|" * 11)
  for r in results:
    print(f"| {r['n']:,} | {1e3 * r['commit_median_s']:.1f} ({1e3 * r['commit_max_s']:.0f}), "
          f"{1e3 * r['commit_cpu_median_s']:.1f} | {1e3 * r['snapshot_median_s']:.1f}, {1e3 * r['snapshot_cpu_median_s']:.1f} | "
          f"{1e3 * r['open_write_s']:.1f} / {1e3 * r['open_read_s']:.1f} | "
          f"{1e3 * r['first_gets_s']:.1f} | {1e3 * r['warm_get_s']:.2f} | {r['counts_s']:.2f} | {r['files']:,} | "
          f"{r['files_per_doc']:.4f} | {r['bytes']:,} | {r['bytes_per_doc']:.0f} |")
  if len(results) > 1:
    a0, a1 = results[0], results[-1]
    print(f"\n{a1['n']:,} vs {a0['n']:,}: commit {a1['commit_median_s'] / a0['commit_median_s']:.2f}x (CPU "
          f"{a1['commit_cpu_median_s'] / a0['commit_cpu_median_s']:.2f}x), snapshot "
          f"{a1['snapshot_median_s'] / a0['snapshot_median_s']:.2f}x, open (write) "
          f"{a1['open_write_s'] / a0['open_write_s']:.2f}x, open (read-only) {a1['open_read_s'] / a0['open_read_s']:.2f}x")
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                 "args": vars(a), "results": results}, f, indent=2)
  if not a.keep:
    for r in results:
      shutil.rmtree(os.path.join(base, f"n{r['n']}"), ignore_errors=True)
    if not a.dir:
      shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
