"""Dense attention and the KV cache shared by the autoregressive generators.

RAR and FAR decode with a cache in the ``"cache"`` collection
(:func:`update_kv_cache`, read by :func:`cached_attention`; a sampler may
keep it only as long as the filled prefix, :func:`resize_kv_cache`); the
Equivariant generator keeps its own rolling window cache but attends through
the same :func:`dot_product_attention`.
The windowed causal attention of long sequences lives in
``genvis_jax.kernels.windowed_attention``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -1e30  # masked logit; exp underflows to exactly 0 in fp32


def causal_mask(n: int):
  """bool (n, n): query i sees keys j <= i."""
  return jnp.tril(jnp.ones((n, n), bool))


def dot_product_attention(q, k, v, mask=None, *, scale: float = 1.0,
                          dropout: Callable | None = None):
  """Softmax attention with fp32 logits.

  q (B, N, H, D), k / v (B, M, H, D); ``mask`` bool broadcastable to
  (B, H, N, M), True = visible; ``scale`` multiplies the logits (pass 1.0
  when q is already scaled); ``dropout`` is applied to the probabilities.
  Returns (B, N, H, D) in v.dtype.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k,
                      preferred_element_type=jnp.float32)
  if scale != 1.0:
    logits = logits * scale
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhnm,bmhd->bnhd", probs.astype(v.dtype), v)


def update_kv_cache(module: nn.Module, k, v, pos, length: int, dtype=None):
  """Writes this call's keys/values into ``module``'s ``"cache"`` collection.

  k, v (B, N, H, D) are the tokens at positions ``pos .. pos + N - 1`` (``pos``
  may be traced). The cache (``cached_key`` / ``cached_value``, each
  (B, H, M, D) in ``dtype``, default k.dtype) is created zero with
  M = ``length`` on the first call; a cache passed in keeps its own M (a
  sampler may hand in a shorter one holding only the filled prefix, see
  :func:`resize_kv_cache`), which must exceed ``pos + N - 1``. Heads lead so
  the decode matmuls read the cache in place (no per-step transpose).
  Returns ``(keys, values, mask)``: the whole cache and the bool (N, M) mask
  of the cached positions each query may see (<= its own).
  """
  b, n, h, d = k.shape
  dtype = k.dtype if dtype is None else dtype
  ck = module.variable("cache", "cached_key", jnp.zeros, (b, h, length, d), dtype)
  cv = module.variable("cache", "cached_value", jnp.zeros, (b, h, length, d),
                       dtype)
  m = ck.value.shape[CACHE_AXIS]
  start = (0, 0, pos, 0)
  ck.value = jax.lax.dynamic_update_slice(
      ck.value, k.swapaxes(1, 2).astype(ck.value.dtype), start)
  cv.value = jax.lax.dynamic_update_slice(
      cv.value, v.swapaxes(1, 2).astype(cv.value.dtype), start)
  mask = jnp.arange(m)[None, :] <= (pos + jnp.arange(n))[:, None]
  return ck.value, cv.value, mask


CACHE_AXIS = 2  # the position axis of cached_key / cached_value (B, H, M, D)


def cached_attention(q, k, v, mask, *, scale: float = 1.0):
  """Attention of a few new queries over a KV cache, fp32 logits.

  q (B, N, H, D); k / v (B, H, M, D) as :func:`update_kv_cache` stores them;
  mask bool (N, M), True = visible. Returns (B, N, H, D) in q.dtype. The
  cache is the left operand of both matmuls in XLA's canonical layout
  (batch, rows, contraction), so nothing of size M is transposed or copied
  per step; only the N queries are.
  """
  dims = (((3,), (3,)), ((0, 1), (0, 1)))        # contract D; batch B, H
  qh = q.swapaxes(1, 2).astype(k.dtype)           # (B, H, N, D)
  logits = jax.lax.dot_general(k, qh, dims,
                               preferred_element_type=jnp.float32)  # (B,H,M,N)
  logits = jnp.where(mask.T, logits * scale, NEG_INF)
  probs = jax.nn.softmax(logits, axis=2).astype(v.dtype)
  out = jax.lax.dot_general(probs, v, (((2,), (2,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32)  # (B,H,N,D)
  return out.swapaxes(1, 2).astype(q.dtype)


def resize_kv_cache(cache, length: int):
  """Pads with zeros or truncates every ``cached_key`` / ``cached_value`` leaf
  of a ``"cache"`` collection (sub)tree to ``length`` positions.

  A decode loop that runs positions in chunks keeps the cache only as long as
  the chunk needs (the attention then reads the filled prefix, not the whole
  sequence); one copy per chunk.
  """
  def fit(path, x):
    if getattr(path[-1], "key", None) not in ("cached_key", "cached_value"):
      return x
    m = x.shape[CACHE_AXIS]
    if length <= m:
      return jax.lax.slice_in_dim(x, 0, length, axis=CACHE_AXIS)
    pad = [(0, 0)] * x.ndim
    pad[CACHE_AXIS] = (0, length - m)
    return jnp.pad(x, pad)
  return jax.tree_util.tree_map_with_path(fit, cache)
