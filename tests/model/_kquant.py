"""Hand-built K-quant blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) for tests.

The `gguf` package dequantizes K-quants but cannot quantize them (`gguf.quants.quantize` raises
NotImplementedError), so test files are written with these encoders. They follow the block
layouts of llama.cpp's `ggml-common.h` (super-blocks of QK_K = 256 values) with a plain
round-to-nearest choice of scales (llama.cpp searches for better scales; the layout is what
matters here). Each encoder also returns the values it meant to store, computed from its own
integer codes and scales, so a test can check that `gguf.quants.dequantize` of the packed bytes
reads back exactly those values: two independent readings of the same layout.

    blocks, meant = quantize_k(w, QType.Q4_K)   # w [rows, n*256] f32
    blocks: [rows, n * type_size] uint8 (the GGUF tensor data); meant: [rows, n*256] f32
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as QType

K_TYPES = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)


def _f16(x: np.ndarray) -> np.ndarray:
  """x rounded to float16 and back (the stored super-block scales)."""
  return x.astype(np.float16).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  """[n] f32 -> [n, 2] uint8 (little-endian float16)."""
  return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.where(b != 0, a / np.where(b != 0, b, 1), 0.0)


def _scale_min_codes(x: np.ndarray, sub: int, qmax: int, smax: int):
  """Asymmetric sub-block codes: x [n, 256] -> y = d*sc*q - dmin*m, q in [0, qmax].

  Returns (d [n], dmin [n], sc [n, 256/sub] int, m [n, 256/sub] int, q [n, 256] int) with
  d, dmin already float16-rounded and sc, m in [0, smax].
  """
  n = x.shape[0]
  xs = x.reshape(n, -1, sub)
  lo = np.minimum(xs.min(-1), 0.0)  # [n, S] the offset -dmin*m is <= 0
  hi = xs.max(-1)
  scale = (hi - lo) / qmax
  d = _f16(scale.max(-1) / smax)
  dmin = _f16((-lo).max(-1) / smax)
  sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, smax).astype(np.int64)
  m = np.clip(np.rint(_safe_div(-lo, dmin[:, None])), 0, smax).astype(np.int64)
  step = (d[:, None] * sc)[..., None]  # [n, S, 1]
  off = (dmin[:, None] * m)[..., None]
  q = np.clip(np.rint(_safe_div(xs + off, step)), 0, qmax).astype(np.int64)
  return d, dmin, sc, m, q.reshape(n, QK_K)


def _symmetric_codes(x: np.ndarray, sub: int, qlo: int, qhi: int, slo: int, shi: int):
  """Symmetric sub-block codes: y = d*sc*q, q in [qlo, qhi], sc in [slo, shi]."""
  n = x.shape[0]
  xs = x.reshape(n, -1, sub)
  scale = np.abs(xs).max(-1) / max(-qlo, qhi)  # [n, S]
  d = _f16(scale.max(-1) / shi)
  sc = np.clip(np.rint(_safe_div(scale, d[:, None])), slo, shi).astype(np.int64)
  step = (d[:, None] * sc)[..., None]
  q = np.clip(np.rint(_safe_div(xs, step)), qlo, qhi).astype(np.int64)
  return d, sc, q.reshape(n, QK_K)


def _pack_low_bits(q: np.ndarray, bits: int, group: int) -> np.ndarray:
  """[n, 256] codes -> bytes, `8 // bits` codes per byte: value (g, s, j) = element
  g*group*(8//bits) + s*group + j goes to bits [s*bits, (s+1)*bits) of byte g*group + j."""
  n = q.shape[0]
  per = 8 // bits
  q = q.reshape(n, -1, per, group)  # [n, G, per, group]
  out = np.zeros((n, q.shape[1], group), np.int64)
  for s in range(per):
    out |= (q[:, :, s, :] & ((1 << bits) - 1)) << (s * bits)
  return out.reshape(n, -1).astype(np.uint8)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
  """8 six-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (`get_scale_min_k4`)."""
  b = np.zeros((sc.shape[0], 12), np.int64)
  b[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
  b[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
  b[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
  return b.astype(np.uint8)


def _q2_k(x):
  d, dmin, sc, m, q = _scale_min_codes(x, 16, 3, 15)
  meant = (d[:, None] * sc)[..., None] * q.reshape(len(x), 16, 16) - (dmin[:, None] * m)[..., None]
  scales = (sc | (m << 4)).astype(np.uint8)  # [n, 16]
  qs = _pack_low_bits(q, 2, 32)  # [n, 64]
  return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1), meant


def _q3_k(x):
  d, sc, q = _symmetric_codes(x, 16, -4, 3, -32, 31)
  meant = (d[:, None] * sc)[..., None] * q.reshape(len(x), 16, 16)
  hmask = _pack_low_bits((q >= 0).astype(np.int64), 1, 32)  # [n, 32]: bit b of byte j = element b*32 + j
  qs = _pack_low_bits(q & 3, 2, 32)  # [n, 64]; q = low2 - 4 * (1 - high bit)
  s6 = sc + 32  # [n, 16] in [0, 63]
  packed = np.zeros((len(x), 12), np.int64)
  packed[:, 0:8] = (s6[:, 0:8] & 15) | ((s6[:, 8:16] & 15) << 4)
  for s in range(4):
    packed[:, 8:12] |= ((s6[:, s * 4:(s + 1) * 4] >> 4) & 3) << (2 * s)
  return np.concatenate([hmask, qs, packed.astype(np.uint8), _f16_bytes(d)], axis=1), meant


def _q4_k(x):
  d, dmin, sc, m, q = _scale_min_codes(x, 32, 15, 63)
  meant = (d[:, None] * sc)[..., None] * q.reshape(len(x), 8, 32) - (dmin[:, None] * m)[..., None]
  qs = _pack_low_bits(q, 4, 32)  # [n, 128]
  return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(sc, m), qs], axis=1), meant


def _q5_k(x):
  d, dmin, sc, m, q = _scale_min_codes(x, 32, 31, 63)
  meant = (d[:, None] * sc)[..., None] * q.reshape(len(x), 8, 32) - (dmin[:, None] * m)[..., None]
  qh = _pack_low_bits(q >> 4, 1, 32)  # [n, 32]
  qs = _pack_low_bits(q & 15, 4, 32)  # [n, 128]
  return (np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(sc, m), qh, qs], axis=1),
          meant)


def _q6_k(x):
  d, sc, q = _symmetric_codes(x, 16, -32, 31, -128, 127)
  meant = (d[:, None] * sc)[..., None] * q.reshape(len(x), 16, 16)
  u = q + 32  # [n, 256] in [0, 63]
  ql = _pack_low_bits(u & 15, 4, 64)  # [n, 128]
  qh = _pack_low_bits(u >> 4, 2, 32)  # [n, 64]
  scales = sc.astype(np.int8).view(np.uint8)  # [n, 16]
  return np.concatenate([ql, qh, scales, _f16_bytes(d)], axis=1), meant


_ENCODERS = {QType.Q2_K: _q2_k, QType.Q3_K: _q3_k, QType.Q4_K: _q4_k, QType.Q5_K: _q5_k,
             QType.Q6_K: _q6_k}


def quantize_k(w: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
  """w [..., C] f32 with C a multiple of 256 -> (blocks [..., C/256 * type_size] uint8,
  meant [..., C] f32: the values those blocks encode)."""
  if qtype not in _ENCODERS:
    raise ValueError(f"{qtype.name} is not a K-quant")
  w = np.asarray(w, np.float32)
  if w.shape[-1] % QK_K:
    raise ValueError(f"{qtype.name}: rows of {w.shape[-1]} values are not a multiple of {QK_K}")
  block, size = GGML_QUANT_SIZES[qtype]
  x = w.reshape(-1, block)
  blocks, meant = _ENCODERS[qtype](x)
  assert blocks.shape == (x.shape[0], size), (blocks.shape, size)
  lead = w.shape[:-1]
  return (blocks.reshape(*lead, w.shape[-1] // block * size),
          meant.reshape(w.shape).astype(np.float32))
