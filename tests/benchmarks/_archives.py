"""A compose_study.tgz written from results dicts, for the report tests."""
import io
import json
import tarfile


def write_archive(path, runs: dict) -> str:
  """runs: run name (e.g. base_patients_s0) -> its eval/results.json content. Returns the path."""
  with tarfile.open(path, "w:gz") as tar:
    for run, res in runs.items():
      data = json.dumps(res).encode()
      info = tarfile.TarInfo(f"{run}/eval/results.json")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)
