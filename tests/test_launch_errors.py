"""The launchers as a new user meets them (issue 29): a config, data or store problem is reported
within seconds, before any self-study file is written, as one `error:` block without a traceback
(--verbose shows it) and a distinct exit status (launch/common.py: 2 config/usage, 3 data,
4 workdir/store); every problem of a pass is named together; an existing workdir is left byte
for byte as it was; a bug still shows its traceback (status 1). Real launchers as subprocesses
with the default model (docs/BAD_INPUT.md, "Where each problem is caught")."""
import os
import subprocess
import sys
import time

import pytest

from cas.data.types import Collection, Document

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, env=None, timeout=120):
  """`python -m <module> args` with one CPU device (the tests' 8 fake ones would refuse the quick
  preset's mesh); returns (CompletedProcess, seconds)."""
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
  e.pop("CAS_VERBOSE", None)
  t = time.time()
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=e, capture_output=True, text=True,
                     timeout=timeout)
  return r, time.time() - t


def _user_error(r, status: int, *texts: str) -> str:
  """Asserts the exit status, one `error:` block, no traceback, and every text; returns the block."""
  assert r.returncode == status, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  block = r.stderr[r.stderr.index("error: "):]
  for t in texts:
    assert t in block, (t, block)
  return block


def _snapshot(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def _save(path, texts: dict[str, str]) -> str:
  Collection(name="c", documents=[Document(doc_id=d, title=d, text=t) for d, t in texts.items()]).save(str(path))
  return str(path)


def test_config_problems_all_together_and_an_existing_workdir_is_untouched(tmp_path):
  w = tmp_path / "w"  # an existing workdir: collection, self-study manifest, a released lock
  _save(w / "collection", {"a": "some text " * 50})
  os.makedirs(w / "synth")
  (w / "synth" / "manifest.json").write_text('{"complete": true}')
  (w / ".pipeline.lock").write_text("")
  before = _snapshot(str(w))
  args = ["--config=configs/cas.py:quick", "--config.train.k_max=5", "--config.cartridge.num_tokens=0",
          "--config.train.batch_size=0", "--config.synth.min_chunk=500", "--config.data.kind=bogus",
          "--config.eval.methods=('icl','cartrige_oracle')", f"--workdir={w}"]
  r, seconds = _run("launch.cas", *args)
  _user_error(r, 2, "6 problems with the config", "config.train.k_max: k_max=5 cartridges per sample exceeds "
              "num_slots B=2", "config.cartridge.num_tokens: p=0 must be at least num_frozen + 1",
              "config.train.batch_size:", "config.synth.min_chunk:", "config.data.kind: config.data.kind='bogus' "
              "is unknown", "config.eval.methods: unknown method(s) ['cartrige_oracle']", "(exit status 2")
  assert seconds < 30
  assert _snapshot(str(w)) == before  # byte for byte
  r, _ = _run("launch.cas", *args, "--verbose")
  assert r.returncode == 2 and "Traceback" in r.stderr and "error: ConfigError: 6 problems" in r.stderr
  assert _snapshot(str(w)) == before


def test_p_zero_in_the_single_cartridge_pipeline(tmp_path):
  w = str(tmp_path / "fresh")
  r, _ = _run("launch.pipeline", "--config=configs/cartridge.py:quickstart", "--config.cartridge.num_tokens=0",
              f"--workdir={w}")
  _user_error(r, 2, "config.cartridge.num_tokens: p=0 must be at least num_frozen + 1 = 2")
  assert not os.path.exists(w)  # refused before the workdir was created
  # one pipeline: a CAS config runs through every launcher; a config of the former one-document
  # pipeline (config.pipeline='cartridge') is refused with what to do
  r, _ = _run("launch.synthesize", "--config=configs/cas.py:quick", "--config.pipeline=cartridge", f"--workdir={w}")
  _user_error(r, 2, "config.pipeline:", "former one-document pipeline", "configs/cartridge.py")
  assert not os.path.exists(w)


def test_rotation_against_the_documents_and_num_loaded(tmp_path):
  w = str(tmp_path / "w")
  r, _ = _run("launch.cas", "--config=configs/cas.py:quick", "--config.train.steps=3",
              "--config.eval.num_loaded=(1,8)", f"--workdir={w}")
  _user_error(r, 2, "2 problems", "config.train.steps: train.steps=3 is too few to train every document",
              "use train.steps >= 9", "config.eval.num_loaded:", "the run has N=4 documents")
  assert not os.path.exists(w)


def test_folder_collections_empty_or_with_bad_files(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  w = str(tmp_path / "w1")
  r, _ = _run("launch.cas", "--config=configs/cas.py:quick", "--config.data.kind=folder",
              f"--config.data.manual_dir={empty}", f"--workdir={w}")
  _user_error(r, 3, "error: CollectionError:", f"{empty}: no files with extensions", "(exit status 3")
  assert not os.path.exists(os.path.join(w, "synth"))
  bad = tmp_path / "bad"  # BAD_INPUT rows 1, 5, 6: every bad file named, not only the first
  bad.mkdir()
  (bad / "a-empty.txt").write_text(" \n\t")
  (bad / "b-scan.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
  (bad / "c-memo.txt").write_bytes("memo".encode("utf-16"))
  (bad / "d-good.txt").write_text("A good document. " * 20)
  w = str(tmp_path / "w2")
  r, _ = _run("launch.cas", "--config=configs/cas.py:quick", "--config.data.kind=folder",
              f"--config.data.manual_dir={bad}", "--config.data.num_docs=1", "--config.train.num_slots=1",
              "--config.train.k_max=1", "--config.eval.num_loaded=(1,)", f"--workdir={w}")
  _user_error(r, 3, "3 of 4 files cannot be documents", "a-empty.txt: empty file", "b-scan.txt: looks like a binary",
              "c-memo.txt: the file is UTF-16")
  assert not os.path.exists(os.path.join(w, "synth"))


def test_documents_against_the_cartridge_after_the_model_loads(tmp_path):
  """Short documents with cartridge.short_documents='error' and a document the tokenizer cannot spell:
  all named in one error after the model loads, before self-study."""
  coll = _save(tmp_path / "coll", {"short-1": "Ten words are not enough for this cartridge at all.",
                                   "short-2": "Nor are these few.", "ctl": "\x04\x06\x13",
                                   "long": "river stone lamp garden " * 40})
  w = str(tmp_path / "w")
  r, seconds = _run("launch.cas", "--config=configs/cas.py:quick", f"--config.data.path={coll}",
                    "--config.cartridge.short_documents=error", f"--workdir={w}")
  _user_error(r, 3, "error: CartridgeError: 2 problems with the documents", "no tokens to build a cartridge from",
              "'ctl'", "2 document(s) are shorter than the cartridge's p-num_frozen=63 tokens", "'short-1' (",
              "'short-2' (")
  assert "'long'" not in r.stderr.split("error: ")[-1]
  assert seconds < 60
  assert not os.path.exists(os.path.join(w, "synth"))


def test_memory_preflight_before_self_study(tmp_path):
  w = str(tmp_path / "w")
  r, _ = _run("launch.cas", "--config=configs/cas.py:quick", f"--workdir={w}",
              env={"CAS_DEVICE_MEMORY_BYTES": "100000000"})  # 100 MB: SmolLM2 alone is larger
  _user_error(r, 2, "problems with the device memory", "config.synth: self-study with synth.batch_size=16",
              "config.train (stage cas): CAS training (cas) with "
              "num_slots=2", "does not fit in device memory", "config.eval.methods (monolithic)", "Lower train.num_slots")
  assert not os.path.exists(os.path.join(w, "synth"))


def test_evaluate_serve_and_peft(tmp_path):
  w = str(tmp_path / "w")
  r, _ = _run("launch.evaluate", "--config=configs/cartridge.py:tiny", f"--workdir={w}")
  _user_error(r, 4, "error: MissingStageError:", "CAS training", "(exit status 4")
  r, _ = _run("launch.serve", f"--store={tmp_path}/nostore", "--cache_size=0", f"--model_path={tmp_path}/m.gguf")
  _user_error(r, 2, "3 problems with the command line", "--cache_size: --cache_size=0 must be >= 1",
              f"--store: {tmp_path}/nostore", "--model_path:")
  r, _ = _run("launch.peft", "export", f"--workdir={tmp_path}", "--doc_id=a", f"--out={tmp_path}")
  _user_error(r, 2, "--out:", "exists; pass --overwrite", "--workdir:", "no cartridge store")


def test_a_bug_keeps_its_traceback():
  code = ("from launch.entry import run\n"
          "def main(argv):\n  raise KeyError('not a user error')\n"
          "run(main)\n")
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**e, "PYTHONPATH": REPO}, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'not a user error'" in r.stderr
  assert "error: KeyError" not in r.stderr


@pytest.mark.parametrize("name,status", [("ConfigError", 2), ("CollectionError", 3), ("StoreCorruptError", 4),
                                          ("NumericsError", 5), ("KeyError", None)])
def test_exit_status_of_each_class(name, status):
  from cas.config_check import ConfigError, raise_problems, Problem
  from cas.data.types import CollectionError
  from cas.rotation.store import StoreCorruptError
  from cas.train.numerics import NumericsError
  from launch.entry import exit_status
  exc = {"ConfigError": ConfigError("x"), "CollectionError": CollectionError("x"),
         "StoreCorruptError": StoreCorruptError("x"), "NumericsError": NumericsError("x"), "KeyError": KeyError("x")}
  assert exit_status(exc[name]) == status
  try:  # a ConfigError that is also a RotationError: the config status, not another
    from cas.rotation.policy import RotationError
    raise_problems([Problem("config.train.k_max", "x", RotationError)])
  except ConfigError as e:
    assert isinstance(e, RotationError) and exit_status(e) == 2


def test_verbose_by_environment(monkeypatch, capsys):
  from launch.entry import report
  from cas.config_check import ConfigError
  try:
    raise ConfigError("config.x: bad")
  except ConfigError as e:
    monkeypatch.delenv("CAS_VERBOSE", raising=False)
    report(e, 2)
    quiet = capsys.readouterr().err
    monkeypatch.setenv("CAS_VERBOSE", "1")
    report(e, 2)
    loud = capsys.readouterr().err
  assert quiet.startswith("error: ConfigError: 1 problem with the config") and "Traceback" not in quiet
  assert "--verbose or CAS_VERBOSE=1 shows the traceback" in quiet
  assert "Traceback" in loud and "error: ConfigError" in loud
