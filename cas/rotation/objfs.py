"""The storage layer of the cartridge store: one small interface over a local directory and over
object storage (any fsspec URL: gs://, s3://, memory://, ...), with exactly the guarantees the
store builds on and nothing more.

  write(path, data)             a new object, complete and durable when the call returns; only
                                referenced (by a commit record) afterwards, so no atomicity needed
  write_atomic(path, data)      replace an object: readers see the old or the new one, never a mix
  create_exclusive(path, data)  the commit point: create an object that must not exist yet
                                (FileExistsError when it does); readers see all of it or nothing
  read / read_range / size / exists / listdir / remove / rmtree

Local directories: write = write + fsync (+ fsync of the directory); write_atomic and
create_exclusive write a temp file (`.<name>.tmp-<pid>-<hex>`), fsync it, and rename it into place
(create_exclusive checks first; a single writer holds the store's flock). Object storage has no
rename and no flock: every put of a whole object is atomic there, so write_atomic is a plain put,
and create_exclusive is `open(path, "xb")`, which backends with conditional writes (GCS
if-generation-match=0, S3 If-None-Match, fsspec's memory filesystem) refuse atomically when the
object exists; on a backend without them fsspec checks existence first (a race two writers could
lose together, which the store's writer lease makes unlikely but not impossible).
"""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import numpy as np


class StoreFS:
  """Interface (see module docstring). Paths are strings below `root` joined with `join`."""
  remote: bool = False
  root: str

  def join(self, *parts: str) -> str:
    raise NotImplementedError

  def read(self, path: str) -> bytes:
    raise NotImplementedError

  def read_range(self, path: str, start: int, length: int) -> bytes:
    raise NotImplementedError

  def size(self, path: str) -> int:
    raise NotImplementedError

  def exists(self, path: str) -> bool:
    raise NotImplementedError

  def isdir(self, path: str) -> bool:
    raise NotImplementedError

  def listdir(self, path: str) -> list[str]:
    """Names directly under path ([] when there is nothing)."""
    raise NotImplementedError

  def write(self, path: str, data: bytes) -> None:
    self.write_chunks(path, [data])

  def write_chunks(self, path: str, chunks) -> int:
    """`write` of the concatenated bytes-like chunks (streamed, not joined). Returns the size."""
    raise NotImplementedError

  def write_atomic(self, path: str, data: bytes) -> None:
    raise NotImplementedError

  def create_exclusive(self, path: str, data: bytes) -> None:
    raise NotImplementedError

  def remove(self, path: str) -> None:
    """Delete one object; a missing one is fine."""
    raise NotImplementedError

  def rmtree(self, path: str) -> None:
    raise NotImplementedError

  def map(self, path: str) -> Any:
    """The whole object as a read-only uint8 array (local files: memory-mapped, so the bytes
    stay readable after the file is deleted)."""
    raise NotImplementedError


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class LocalFS(StoreFS):
  """A directory on a local (or NFS) filesystem."""
  remote = False

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self._made: set[str] = set()

  def join(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def read(self, path: str) -> bytes:
    with open(path, "rb") as f:
      return f.read()

  def read_range(self, path: str, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(length)

  def size(self, path: str) -> int:
    return os.path.getsize(path)

  def exists(self, path: str) -> bool:
    return os.path.exists(path)

  def isdir(self, path: str) -> bool:
    return os.path.isdir(path)

  def listdir(self, path: str) -> list[str]:
    try:
      return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
      return []

  def _parent(self, path: str) -> str:
    d = os.path.dirname(path)
    if d not in self._made:
      os.makedirs(d, exist_ok=True)
      self._made.add(d)
    return d

  def write_chunks(self, path: str, chunks) -> int:
    d = self._parent(path)
    with open(path, "wb") as f:
      for c in chunks:
        f.write(c)
      f.flush()
      os.fsync(f.fileno())
      size = f.tell()
    _fsync_dir(d)
    return size

  def _tmp(self, path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

  def _write_tmp(self, path: str, data: bytes) -> str:
    self._parent(path)
    tmp = self._tmp(path)
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def write_atomic(self, path: str, data: bytes) -> None:
    tmp = self._write_tmp(path, data)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))

  def create_exclusive(self, path: str, data: bytes) -> None:
    tmp = self._write_tmp(path, data)
    if os.path.exists(path):
      os.remove(tmp)
      raise FileExistsError(path)
    os.rename(tmp, path)  # the commit point (one writer: the store's flock)
    _fsync_dir(os.path.dirname(path))

  def remove(self, path: str) -> None:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass

  def rmtree(self, path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    self._made = {d for d in self._made if not (d == path or d.startswith(path + os.sep))}

  def map(self, path: str) -> Any:
    if os.path.getsize(path) == 0:
      return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class FsspecFS(StoreFS):
  """Object storage (or any fsspec filesystem) under a URL. Listings bypass fsspec's cache."""
  remote = True

  def __init__(self, url: str):
    import fsspec
    self.url = url.rstrip("/")
    self.fs, path = fsspec.core.url_to_fs(self.url)
    self._prefix = path.rstrip("/")
    protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
    self._scheme = f"{protocol}://"
    self.root = self.url

  # Paths handed around are full URLs (messages name them); the filesystem gets its own form.
  def join(self, *parts: str) -> str:
    return posixpath.join(self.url, *parts)

  def _p(self, path: str) -> str:
    if path.startswith(self.url):
      return self._prefix + path[len(self.url):]
    return self.fs._strip_protocol(path)

  def read(self, path: str) -> bytes:
    return self.fs.cat_file(self._p(path))

  def read_range(self, path: str, start: int, length: int) -> bytes:
    return self.fs.cat_file(self._p(path), start=start, end=start + length)

  def size(self, path: str) -> int:
    return int(self.fs.size(self._p(path)))

  def exists(self, path: str) -> bool:
    self.fs.invalidate_cache(posixpath.dirname(self._p(path)))
    return self.fs.exists(self._p(path))

  def isdir(self, path: str) -> bool:
    return bool(self.listdir(path))

  def listdir(self, path: str) -> list[str]:
    p = self._p(path).rstrip("/")
    self.fs.invalidate_cache(p)
    try:
      entries = self.fs.ls(p, detail=False)
    except (FileNotFoundError, NotADirectoryError):
      return []
    return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

  def write_chunks(self, path: str, chunks) -> int:
    size = 0
    with self.fs.open(self._p(path), "wb") as f:
      for c in chunks:
        f.write(c)
        size += memoryview(c).nbytes
    return size

  def write_atomic(self, path: str, data: bytes) -> None:
    self.write(path, data)  # a put of a whole object is atomic on object storage

  def create_exclusive(self, path: str, data: bytes) -> None:
    p = self._p(path)
    self.fs.invalidate_cache(posixpath.dirname(p))
    with self.fs.open(p, "xb") as f:  # FileExistsError when the object exists
      f.write(data)

  def remove(self, path: str) -> None:
    try:
      self.fs.rm_file(self._p(path))
    except FileNotFoundError:
      pass

  def rmtree(self, path: str) -> None:
    try:
      self.fs.rm(self._p(path), recursive=True)
    except FileNotFoundError:
      pass

  def map(self, path: str) -> Any:
    return np.frombuffer(self.read(path), np.uint8)


def is_url(root: str) -> bool:
  """True for 'scheme://...' roots other than file:// (those are local directories)."""
  return "://" in str(root) and not str(root).startswith("file://")


def filesystem_for(root: str) -> StoreFS:
  """LocalFS for a directory path (or file:// URL), FsspecFS for any other URL."""
  root = os.fspath(root)
  if is_url(root):
    return FsspecFS(root)
  if root.startswith("file://"):
    root = root[len("file://"):]
  return LocalFS(root)
