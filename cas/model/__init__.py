"""Model layer: config, Flax NNX decoder, loaders, tokenizer, sampler."""
from cas.model.config import ModelConfig, ModelConfigError, PRESETS
from cas.model.llama import KVCache, Prefix, Transformer, build_model, params_from_hf
