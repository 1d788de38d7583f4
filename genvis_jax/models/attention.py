"""Dense attention and the KV cache shared by the autoregressive generators.

RAR and FAR decode with a full-length cache in the ``"cache"`` collection
(:func:`update_kv_cache`); the Equivariant generator keeps its own rolling
window cache but attends through the same :func:`dot_product_attention`.
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
  (B, length, H, D) in ``dtype``, default k.dtype) is created zero on the
  first call. Returns ``(keys, values, mask)``: the whole cache and the bool
  (N, length) mask of the cached positions each query may see (<= its own).
  """
  b, n, h, d = k.shape
  dtype = k.dtype if dtype is None else dtype
  ck = module.variable("cache", "cached_key", jnp.zeros, (b, length, h, d), dtype)
  cv = module.variable("cache", "cached_value", jnp.zeros, (b, length, h, d),
                       dtype)
  start = (0, pos, 0, 0)
  ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(dtype), start)
  cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(dtype), start)
  mask = jnp.arange(length)[None, :] <= (pos + jnp.arange(n))[:, None]
  return ck.value, cv.value, mask
