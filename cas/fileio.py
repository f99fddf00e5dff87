"""Small file helpers shared by every on-disk format of cas (checkpoints, the cartridge store,
self-study shards, collections, exported cartridges): sha256 of files, per-directory checksum
manifests and their verification, replacing a directory atomically, and cas's cache directory."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Mapping


def cas_home(override: str | os.PathLike | None = None) -> Path:
  """cas's cache directory (models, compiled programs): `override`, else $CAS_HOME, else ~/.cache/cas."""
  if override:
    return Path(override).expanduser()
  return Path(os.environ.get("CAS_HOME") or Path.home() / ".cache" / "cas").expanduser()


def cache_subdir(env_var: str, name: str, environ: Mapping[str, str] | None = None) -> Path | None:
  """A cache folder of cas that an environment variable controls: `environ[env_var]` "0" -> None (off), a path ->
  that folder, unset, empty or "1" -> `cas_home() / name` (the compilation cache, the tokenizer cache)."""
  env = os.environ if environ is None else environ
  value = env.get(env_var, "")
  if value == "0":
    return None
  if value in ("", "1"):
    return cas_home(env.get("CAS_HOME")) / name
  return Path(value).expanduser()


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tree_bytes(path: str) -> int:
  """Bytes of the files under `path` (0 when it does not exist; files vanishing meanwhile count 0)."""
  n = 0
  for dirpath, _dirnames, filenames in os.walk(path):
    for fn in filenames:
      try:
        n += os.lstat(os.path.join(dirpath, fn)).st_size
      except OSError:
        pass
  return n


def file_checksums(root: str, skip: tuple[str, ...] = ()) -> dict[str, list]:
  """{path relative to root ('/' separators): [size in bytes, sha256 hex]} of every file under
  root (sorted walk), except the relative paths in `skip`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in sorted(filenames):
      p = os.path.join(dirpath, fn)
      rel = os.path.relpath(p, root).replace(os.sep, "/")
      if rel not in skip:
        out[rel] = [os.path.getsize(p), sha256_file(p)]
  return out


def verify_files(root: str, files: Mapping[str, Any], *, what: str, error: type[Exception],
                 full: bool = True) -> int:
  """Raise `error` naming the first file of `files` ({rel: [size, sha256]}, as `file_checksums`
  wrote it) that is missing, has another size or (full=True) another sha256. Files under root
  that are not listed are ignored. Returns the number of bytes checked."""
  total = 0
  for rel, (size, digest) in sorted(files.items()):
    p = os.path.join(root, *rel.split("/"))
    if not os.path.isfile(p):
      raise error(f"{p}: {what}: file is missing")
    got = os.path.getsize(p)
    if got != size:
      raise error(f"{p}: {what}: file has {got} bytes, {size} were written (truncated or overwritten)")
    if full and sha256_file(p) != digest:
      raise error(f"{p}: {what}: file changed since it was written (sha256 mismatch: zeroed or corrupted)")
    total += size
  return total


def replace_dir(tmp: str, path: str) -> str:
  """Move the finished directory `tmp` to `path`, replacing what is there (the old one is moved
  aside first and removed last, so `path` always holds a complete directory). Returns path."""
  if os.path.exists(path):
    old = f"{path}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)
  return path


def local_checkpointer():
  """An Orbax checkpointer of host (numpy) arrays that involves this process only. Files that one
  process writes and any reads (the cartridge store, exported cartridges) must not use Orbax's
  default cross-process barriers, which expect every process to call save/restore."""
  import jax
  import orbax.checkpoint as ocp
  me = jax.process_index()
  mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp)
