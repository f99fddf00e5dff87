"""Test set-up: 8 fake CPU devices (multi-device code is tested on them), CPU only, fp32 matmuls.

The GPU tests (`*_on_gpu`) skip on the CPU; on a GPU machine run them with JAX_PLATFORMS=cuda set, e.g.
`JAX_PLATFORMS=cuda python3 -m pytest -q tests/model/test_shared_prefix.py -k on_gpu` (without it they skip there too)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tokenizers built from GGUF files (many of them written to tmp_path) are kept here, not in the user's $CAS_HOME
os.environ.setdefault("CAS_TOKENIZER_CACHE", os.path.abspath(os.path.join(os.path.dirname(__file__), "..",
                                                                          ".pytest_cache", "tokenizers")))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One XLA compilation cache for the whole test session, shared by the xdist workers and the subprocesses
# the tests start (they inherit the environment): many tests compile the same programs (a fresh Sampler or
# step function re-lowers to the same HLO), and a cache hit skips XLA's compile. Keys are content hashes
# (HLO, compile options, jax version), so a stale entry is never used for a changed program.
# CAS_TEST_COMPILE_CACHE=0 turns it off; a path sets its directory.
_cache = os.environ.get("CAS_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                               "xla"))
if _cache != "0":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
