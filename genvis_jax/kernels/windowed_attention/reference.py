"""Windowed causal attention over columns: exact semantics and XLA versions.

Layout: ``q, k, v`` are ``(batch, seq, heads, head_dim)``; ``seq = columns *
tokens_per_column`` (``T``) tokens in column order, so token ``i`` lies in
column ``c_i = i // T``.

Rule (``window`` = ``W`` columns, the current one included): query ``i`` may
attend key ``j`` iff ``c_i - W < c_j <= c_i``. With ``T = 1`` this is the
official EquivariantModeling mask ``j in [i - cond_length, i]``
(``generator/equ_modeling.py``: ``tril`` minus ``triu(-cond_length)``), i.e.
``window = cond_length + 1``: the paper's "window 3" (keys i-3 .. i) is
``window=4``. The official generator has one token per column, so it says
nothing about ``T > 1``; we make every token of the current column visible
(block-causal, as for a column-level AR model that predicts a whole column
from the previous ones). ``W >= columns`` is plain causal attention over
columns.

This file holds
  * the band geometry (token spans, block spans, tile masks) that the Pallas
    kernels use for their grids and masks, as pure functions on Python ints or
    traced int32 scalars, and ``Geometry``, the kernels' static problem
    description;
  * ``dense_attention``: O(N^2) masked softmax attention, the spec in code:
    the models' own dense attention (``kernels/attention.py``) under the
    band mask;
  * ``banded_attention``: an O(N x W) blocked XLA version (CPU fallback).
Every version keeps the precision rules of ``kernels/attention.py``: fp32
softmax, probabilities rounded to the values' dtype for the PV product,
fp32 accumulation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax.kernels.attention import (
    MASK_VALUE, dot_product_attention, weight_values)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static problem description of a kernel call (hashable): the band
  (``window`` columns of ``tokens_per_column`` tokens), the tiles, the padded
  sequence length, the softmax scale and Pallas interpret mode. A kernel file
  may subclass it for its backend's compiler settings."""
  window: int
  tokens_per_column: int
  block_q: int
  block_k: int
  padded_len: int
  scale: float
  interpret: object = False

  def band(self) -> dict:
    """The keyword arguments of the span functions below."""
    return dict(window=self.window, tokens_per_column=self.tokens_per_column,
                block_q=self.block_q, block_k=self.block_k,
                padded_len=self.padded_len)


def _is_int(*xs) -> bool:
  return all(isinstance(x, (int, np.integer)) for x in xs)


def _max(a, b):
  return max(a, b) if _is_int(a, b) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if _is_int(a, b) else jnp.minimum(a, b)


def _div(a, b: int):
  """a // b for a >= 0; traced values use lax.div (truncation), which Mosaic
  lowers without the sign() that jnp.floor_divide needs (TPU-only lowering)."""
  if _is_int(a) or isinstance(a, np.ndarray):
    return a // b
  return jax.lax.div(a, jnp.asarray(b, a.dtype))


def column_of(i, tokens_per_column: int):
  """Column of token index ``i`` (int, numpy or traced int32, ``i >= 0``).

  A power-of-two ``T`` uses a shift so kernels need no vector integer divide.
  """
  t = tokens_per_column
  if t == 1:
    return i
  if t & (t - 1) == 0 and not (_is_int(i) or isinstance(i, np.ndarray)):
    return jax.lax.shift_right_logical(i, jnp.asarray(t.bit_length() - 1,
                                                      i.dtype))
  return _div(i, t)


# ----------------------------------------------------------------------------
# Band geometry.


def key_span(i, *, window: int, tokens_per_column: int):
  """Inclusive token range ``(lo, hi)`` of keys visible to query ``i``."""
  t = tokens_per_column
  c = column_of(i, t)
  return _max((c - window + 1) * t, 0), (c + 1) * t - 1


def query_span(j, *, window: int, tokens_per_column: int):
  """Inclusive token range ``(lo, hi)`` of queries that see key ``j``."""
  t = tokens_per_column
  c = column_of(j, t)
  return c * t, (c + window) * t - 1


def kv_block_span(q_block, *, window, tokens_per_column, block_q, block_k,
                  padded_len):
  """Key blocks a query block needs: ``(first, count)``.

  The keys seen by queries ``[qs, qs + block_q)`` form one interval (the band
  is a monotone staircase), so the blocks are ``first .. first + count - 1``;
  nothing outside the band is visited. ``padded_len`` (a multiple of both
  block sizes) clamps the interval.
  """
  kw = dict(window=window, tokens_per_column=tokens_per_column)
  lo, _ = key_span(q_block * block_q, **kw)
  _, hi = key_span(q_block * block_q + block_q - 1, **kw)
  hi = _min(hi, padded_len - 1)
  first = _div(lo, block_k)
  return first, _div(hi, block_k) - first + 1


def q_block_span(k_block, *, window, tokens_per_column, block_q, block_k,
                 padded_len):
  """Query blocks that see a key block: ``(first, count)`` (see above)."""
  kw = dict(window=window, tokens_per_column=tokens_per_column)
  lo, _ = query_span(k_block * block_k, **kw)
  _, hi = query_span(k_block * block_k + block_k - 1, **kw)
  hi = _min(hi, padded_len - 1)
  first = _div(lo, block_q)
  return first, _div(hi, block_q) - first + 1


def max_kv_blocks(**geom) -> int:
  """Grid width of the forward / dq kernels: most key blocks any q block needs."""
  n_q = geom["padded_len"] // geom["block_q"]
  return max(kv_block_span(b, **geom)[1] for b in range(n_q))


def max_q_blocks(**geom) -> int:
  """Grid width of the dk/dv kernel: most query blocks any key block feeds."""
  n_k = geom["padded_len"] // geom["block_k"]
  return max(q_block_span(b, **geom)[1] for b in range(n_k))


def tile_mask(q_start, k_start, shape, *, window: int, tokens_per_column: int):
  """Band mask of the ``shape = (rows, cols)`` tile at token offsets."""
  rows = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  cq = column_of(rows, tokens_per_column)
  ck = column_of(cols, tokens_per_column)
  return (ck <= cq) & (cq - ck < window)


def window_mask(seq_len: int, *, window: int, tokens_per_column: int = 1):
  """Boolean ``(seq_len, seq_len)`` numpy mask, ``[i, j]`` = query i sees key j
  (the band rule of the module docstring)."""
  c = np.arange(seq_len) // tokens_per_column
  return (c[None, :] <= c[:, None]) & (c[:, None] - c[None, :] < window)


# ----------------------------------------------------------------------------
# XLA implementations.


def dense_attention(q, k, v, *, window: int, tokens_per_column: int = 1,
                    scale: float | None = None):
  """O(N^2) masked attention. q, k, v: (B, N, H, D) -> (B, N, H, D) in
  q.dtype; ``scale`` defaults to ``1 / sqrt(D)``."""
  n, d = q.shape[1], q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  mask = window_mask(n, window=window, tokens_per_column=tokens_per_column)
  return dot_product_attention(q, k, v, mask, scale=scale)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def banded_chunk(seq_len: int, *, window: int, tokens_per_column: int,
                 chunk: int | None = None) -> int:
  """Query chunk length of ``banded_attention``.

  A chunk holds whole columns and is at least the look-back ``(W - 1) * T``,
  so each chunk only needs keys from itself and the chunk before.
  """
  t = tokens_per_column
  c = max((window - 1) * t, chunk or 32, t)
  return min(_round_up(c, t), seq_len)


def banded_attention(q, k, v, *, window: int, tokens_per_column: int = 1,
                     scale: float | None = None, chunk: int | None = None):
  """O(N x W) blocked attention in XLA. q, k, v: (B, N, H, D) -> (B, N, H, D)
  in q.dtype; ``scale`` defaults to ``1 / sqrt(D)``.

  Queries are cut into chunks of ``C`` tokens (``banded_chunk``); chunk ``c``
  attends the ``2C`` keys of chunks ``c-1`` and ``c`` under the band mask, so
  work and memory are ``N x 2C`` with ``C ~ max((W - 1) * T, chunk)``.
  """
  b, n, h, d = q.shape
  t = tokens_per_column
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  c = banded_chunk(n, window=window, tokens_per_column=t, chunk=chunk)
  n_pad = _round_up(n, c)
  nc = n_pad // c
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))
  q, k, v = (pad(x).reshape(b, nc, c, h, d) for x in (q, k, v))
  with_prev = lambda x: jnp.concatenate(
      [jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1], x], 2)
  k, v = with_prev(k), with_prev(v)  # (B, nc, 2C, H, D)

  # Static mask: query token s*c + a against key token (s-1)*c + e.
  qi = np.arange(nc)[:, None, None] * c + np.arange(c)[None, :, None]
  kj = np.arange(nc)[:, None, None] * c - c + np.arange(2 * c)[None, None, :]
  cq, ck = qi // t, np.floor_divide(kj, t)
  mask = (kj >= 0) & (ck <= cq) & (cq - ck < window)  # (nc, C, 2C)

  logits = jnp.einsum("bsqhd,bskhd->bshqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[None, :, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = weight_values("bshqk,bskhd->bsqhd", probs, v)
  return out.reshape(b, n_pad, h, d)[:, :n].astype(q.dtype)
