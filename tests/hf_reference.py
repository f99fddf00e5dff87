"""The transformers model of the default GGUF file, for tests that need it as a PyTorch reference (PEFT
parity). transformers reads a GGUF file in ~22 s on the 2-core CI machine, most of it the file's metadata
and vocabulary, and cannot save_pretrained a model loaded so; the first call here loads it from the GGUF
and keeps its config and dequantized float32 weights (safetensors) in .pytest_cache/hf_gguf/<key>, later
calls (other tests, other xdist workers) build it from there in ~2 s. The key hashes the file's path, size
and modification time and the transformers version. `tests/model/test_smollm2_real.py` still loads the GGUF
itself: it is the loader parity test."""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import uuid

CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "hf_gguf")


def hf_from_gguf(path):
  """AutoModelForCausalLM (float32, eval mode) of the GGUF file `path`, through the cache above."""
  import safetensors.torch
  import torch
  import transformers
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
                       .encode()).hexdigest()[:16]
  d = os.path.join(CACHE, key)
  if os.path.isfile(os.path.join(d, "model.safetensors")):
    cfg = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    safetensors.torch.load_model(model, os.path.join(d, "model.safetensors"))
    return model.eval()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=torch.float32,
      local_files_only=True).eval()
  tmp = f"{d}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    os.makedirs(tmp)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):  # the weights kept are plain float32
      delattr(cfg, "quantization_config")
    cfg.to_json_file(os.path.join(tmp, "config.json"))
    safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
    os.rename(tmp, d)  # atomic; another worker that got there first keeps its copy
  except OSError:
    pass
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return model
