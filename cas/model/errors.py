"""Errors raised while reading model files (weights, tokenizer, default-model fetch)."""


class ModelLoadError(ValueError):
  """A model file that cas cannot read; the message names the file and the problem."""
