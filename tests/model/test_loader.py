"""load_model / load_config: default path, dtypes, shardings, tokenizer/model consistency."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cas.model.errors import ModelLoadError
from cas.model.loader import LoadedModel, load_config, load_model
from tests.model import _tiny


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("m") / "tiny.gguf"
  return _tiny.write_gguf(str(path), _tiny.tiny_model("llama", seed=1), QType.F32,
                          _tiny.tiny_tokenizer())


def test_missing_default_model_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv("CAS_HOME", str(tmp_path))
  with pytest.raises(ModelLoadError, match=r"python -m launch\.fetch_model") as e:
    load_model()
  assert str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf") in str(e.value)


def test_loaded_model_fields_and_config(gguf_path):
  lm = load_model(gguf_path)
  assert isinstance(lm, LoadedModel)
  assert lm.source == gguf_path and len(lm.fingerprint) == 16
  assert lm.config == load_config(gguf_path)
  assert lm.config.vocab_size == 320 and lm.tokenizer.vocab_size == 320
  assert lm.hf_config["architectures"] == ["LlamaForCausalLM"]


def test_bf16_params_and_shardings(gguf_path):
  ref = load_model(gguf_path)
  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))

  def shardings(axes, shape=None):
    return NamedSharding(mesh, PartitionSpec(*["model" if a == "mlp" else None for a in axes]))

  lm = load_model(gguf_path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, shardings=shardings)
  w = lm.model.layers.w_up[...]
  assert w.dtype == jnp.bfloat16
  assert w.sharding.spec == PartitionSpec(None, None, "model")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 10)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  a = np.asarray(ref.model(tokens, pos)[0])
  b = np.asarray(lm.model(tokens, pos)[0])
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_tokenizer_larger_than_model_is_refused(tmp_path):
  tok = _tiny.tiny_tokenizer()  # 300 tokens
  model = _tiny.tiny_model("llama", vocab_size=256)
  d = _tiny.save_hf_dir(str(tmp_path / "d"), model, tok)
  with pytest.raises(ModelLoadError, match="tokenizer has 300 tokens but the model embeds only 256"):
    load_model(d)
