"""A fake object store for tests: an fsspec filesystem ("casfakeobj://<bucket>/<key>") with the
semantics of GCS/S3 and none of a POSIX filesystem's extras:

  * an object becomes visible whole when its writer closes it (never partially), and a put
    replaces a whole object;
  * "xb" (create if absent) is atomic: of two writers creating the same key, exactly one wins
    (FileExistsError for the other), like GCS if-generation-match=0 / S3 If-None-Match;
  * no rename, move or copy (they raise), no directories (a prefix exists while objects under it
    do), no locks;
  * `calls` counts the operations by name (puts, gets, lists, deletes), so tests can check what a
    store does on object storage.

Objects are kept as files below a local directory ($CAS_FAKEOBJ_ROOT or set_root()), so a
subprocess (a writer that gets SIGKILLed) and the test see the same bucket. Register with
`register()` (also in child processes).
"""
from __future__ import annotations

import collections
import io
import os
import uuid

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOL = "casfakeobj"
ENV = "CAS_FAKEOBJ_ROOT"
calls: collections.Counter = collections.Counter()


class NoRename(NotImplementedError):
  """Object storage cannot rename: a store that needs it would not work on GCS/S3."""


class _Upload(io.BytesIO):
  """Buffered upload, published on close (atomically; 'xb': only if the key is still absent)."""

  def __init__(self, fs: "FakeObjectStore", path: str, exclusive: bool):
    super().__init__()
    self._fs, self._path, self._exclusive = fs, path, exclusive

  def close(self) -> None:
    if self.closed:
      return
    data = self.getvalue()
    super().close()
    self._fs._publish(self._path, data, self._exclusive)


class FakeObjectStore(AbstractFileSystem):
  protocol = PROTOCOL
  root_marker = ""
  cachable = False

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)

  @staticmethod
  def _root() -> str:
    root = os.environ.get(ENV)
    if not root:
      raise RuntimeError(f"set ${ENV} (the local directory behind the fake object store)")
    return root

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    if path.startswith(PROTOCOL + "://"):
      path = path[len(PROTOCOL) + 3:]
    return path.strip("/")

  def _local(self, path: str) -> str:
    return os.path.join(self._root(), *self._strip_protocol(path).split("/"))

  # -- objects
  def _publish(self, path: str, data: bytes, exclusive: bool) -> None:
    calls["put"] += 1
    local = self._local(path)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = os.path.join(self._root(), f".upload-{uuid.uuid4().hex}")  # outside every listed prefix
    with open(tmp, "wb") as f:
      f.write(data)
    if exclusive:
      try:
        os.link(tmp, local)  # atomic create-if-absent
      except FileExistsError:
        raise FileExistsError(path)
      finally:
        os.remove(tmp)
    else:
      os.replace(tmp, local)

  def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kw):
    path = self._strip_protocol(path)
    if mode == "rb":
      calls["get"] += 1
      return open(self._local(path), "rb")
    if mode in ("wb", "xb"):
      if mode == "xb" and os.path.exists(self._local(path)):
        raise FileExistsError(path)
      return _Upload(self, path, exclusive=mode == "xb")
    raise ValueError(f"{PROTOCOL}: mode {mode!r} is not supported by object storage")

  def cat_file(self, path, start=None, end=None, **kw):
    calls["get"] += 1
    with open(self._local(path), "rb") as f:
      if start:
        f.seek(start)
      return f.read() if end is None else f.read(end - (start or 0))

  def info(self, path, **kw):
    local = self._local(path)
    name = self._strip_protocol(path)
    if os.path.isfile(local):
      return {"name": name, "size": os.path.getsize(local), "type": "file"}
    if os.path.isdir(local) and self._has_objects(local):
      return {"name": name, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  @staticmethod
  def _has_objects(local: str) -> bool:
    return any(files for _, _, files in os.walk(local))

  def ls(self, path, detail=True, **kw):
    calls["list"] += 1
    name = self._strip_protocol(path)
    local = self._local(path)
    if os.path.isfile(local):
      out = [self.info(path)]
    elif os.path.isdir(local):
      out = []
      for e in sorted(os.listdir(local)):
        p = os.path.join(local, e)
        if os.path.isfile(p):
          out.append({"name": f"{name}/{e}", "size": os.path.getsize(p), "type": "file"})
        elif self._has_objects(p):
          out.append({"name": f"{name}/{e}", "size": 0, "type": "directory"})
    else:
      out = []
    if not out and not os.path.isdir(local):
      raise FileNotFoundError(path)
    return out if detail else [o["name"] for o in out]

  def rm_file(self, path, **kw):
    calls["delete"] += 1
    local = self._local(path)
    if not os.path.isfile(local):
      raise FileNotFoundError(path)
    os.remove(local)

  def rm(self, path, recursive=False, maxdepth=None, **kw):
    local = self._local(path)
    if os.path.isfile(local):
      self.rm_file(path)
      return
    if not os.path.isdir(local):
      raise FileNotFoundError(path)
    if not recursive:
      raise IsADirectoryError(path)
    for d, _, files in os.walk(local):
      for f in files:
        calls["delete"] += 1
        os.remove(os.path.join(d, f))

  def makedirs(self, path, exist_ok=False):
    pass  # object storage has no directories

  def mkdir(self, path, create_parents=True, **kw):
    pass

  def invalidate_cache(self, path=None):
    pass

  # -- what object storage cannot do
  def mv(self, *a, **kw):
    raise NoRename(f"{PROTOCOL}: object storage has no rename/move")

  rename = move = mv

  def copy(self, *a, **kw):
    raise NoRename(f"{PROTOCOL}: this fake does not copy (a store must not need it)")

  cp_file = copy


def register() -> None:
  fsspec.register_implementation(PROTOCOL, FakeObjectStore, clobber=True)


def set_root(path: str) -> None:
  os.makedirs(path, exist_ok=True)
  os.environ[ENV] = path
