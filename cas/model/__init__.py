"""Model layer: config, Flax NNX decoder, loaders, tokenizer, sampler."""
from cas.model.config import PRESETS, ModelConfig, ModelConfigError
from cas.model.errors import ModelLoadError
from cas.model.fetch import (MODELS, FetchError, default_model_path, fetch_default_model, fetch_model,
                             named_model_path)
from cas.model.llama import KVCache, Prefix, Transformer, build_model, params_from_hf
from cas.model.loader import LoadedModel, load_config, load_model, model_fingerprint, resolve_model_path
from cas.model.tokenizer import Tokenizer
