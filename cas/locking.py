"""One writer per directory: an exclusive lock file for workdirs, datasets and cartridge stores.

    with DirLock(workdir, what="training workdir"):
      ...  # only this process writes into workdir

The lock is `fcntl.flock` on `<directory>/.lock` (opened close-on-exec), so the kernel releases
it when the holder exits for any reason, SIGKILL included. While held, the file records who
holds it: JSON {"pid", "host", "started" (ISO time), "argv", "what"}; a clean release empties it.

  * A second process that wants the same directory gets `LockError` at once (no waiting), with
    the holder's pid, host, start time and command line and the lock file's path.
  * A lock file that still names a holder but whose flock is free belongs to a process that died
    without releasing it (killed, preempted): it is taken over with a warning naming the dead
    holder (and whether its pid is still running on this host).
  * Within one process the lock is not re-entrant: two `DirLock`s on one directory conflict,
    exactly like two processes (flock locks belong to open file descriptions).

Network filesystems: Linux emulates flock with POSIX record locks on NFS (v4 and v3 with lockd),
which works across hosts. On a filesystem without working locks `acquire` fails loudly rather
than pretending.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from absl import logging

LOCK_FILE = ".lock"


class LockError(RuntimeError):
  """The directory is locked by another live process (or its lock file cannot be used)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _describe(holder: dict) -> str:
  if not holder:
    return "an unknown process (the lock file names no holder yet)"
  argv = holder.get("argv") or []
  cmd = " ".join(str(a) for a in argv)[:200]
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r} (started {holder.get('started')}"
          + (f", command: {cmd}" if cmd else "") + ")")


def read_holder(path: str) -> dict:
  """The holder record of a lock file ({} when empty, missing or unreadable)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return {}
  if not text.strip():
    return {}
  try:
    obj = json.loads(text)
  except json.JSONDecodeError:
    return {"pid": None, "host": None, "started": None, "raw": text[:200]}
  return obj if isinstance(obj, dict) else {}


class DirLock:
  """Exclusive, non-blocking lock of a directory (see module docstring).

  directory: created if missing. what: words for messages ("training workdir", ...).
  """

  def __init__(self, directory: str, *, what: str = "directory", filename: str = LOCK_FILE):
    self.directory = os.path.abspath(directory)
    self.path = os.path.join(self.directory, filename)
    self.what = what
    self._fd: int | None = None
    self.took_over: dict | None = None  # the dead holder's record when a stale lock was taken over

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "DirLock":
    if self._fd is not None:
      raise LockError(f"{self.path}: this DirLock is already held by this object")
    os.makedirs(self.directory, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise LockError(f"{self.path}: cannot lock the {self.what} ({e}); the filesystem may not "
                        f"support file locks") from e
      raise self._busy() from None
    prev = read_holder(self.path)
    if prev:
      self.took_over = prev
      host, pid = prev.get("host"), prev.get("pid")
      if host == socket.gethostname() and isinstance(pid, int):
        state = "is no longer running" if not _pid_alive(pid) else "is running but no longer holds the lock"
        logging.warning("%s: taking over a stale lock of the %s: its holder pid %s on this host %s "
                        "(it was killed or crashed without releasing it; started %s)",
                        self.path, self.what, pid, state, prev.get("started"))
      else:
        logging.warning("%s: taking over a stale lock of the %s left by %s (the lock was free, so "
                        "that process ended without releasing it)", self.path, self.what, _describe(prev))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "argv": list(sys.argv), "what": self.what}
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def _busy(self) -> LockError:
    holder = read_holder(self.path)
    extra = ""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not _pid_alive(holder["pid"]):
      extra = (f" The recorded pid {holder['pid']} is no longer running, so a process that "
               f"inherited the lock (e.g. a forked child) still holds it; stop that process.")
    return LockError(
        f"{self.directory}: this {self.what} is in use by {_describe(holder)}; lock file "
        f"{self.path}. Two runs must not write the same {self.what}: wait for that run to finish "
        f"or stop it, or use another directory.{extra}")

  def check_free(self) -> None:
    """Raise LockError (as `acquire` would) when another process holds the lock now. Creates and
    writes nothing (a run checks its config after this and before it takes the lock)."""
    try:
      fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
      return  # no lock file (or no directory): free
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._busy() from None
        return  # no working locks here: acquire reports it
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def release(self) -> None:
    """Empty the lock file (a clean exit leaves no holder behind) and unlock it."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def __del__(self):
    try:
      self.release()
    except Exception:
      pass
