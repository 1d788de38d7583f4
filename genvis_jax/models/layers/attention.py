"""The one multi-head attention of every model, and its functions.

:class:`Attention` is self- or cross-attention with a full, causal or windowed
causal mask, fused or separate q/k/v projections, optional QK-norm, rotary
position embeddings and a KV cache. Its parameters are named for what they are
(``qkv`` or ``q``/``k``/``v``, ``q_norm``/``k_norm``, ``out``); the official
PyTorch names are mapped in ``genvis_jax/convert/``.

RAR and FAR decode with a cache in the ``"cache"`` collection
(:func:`update_kv_cache`, read by :func:`cached_attention`; a sampler may
keep it only as long as the filled prefix, :func:`resize_kv_cache`); the
Equivariant generator passes a rolling cache of the last ``window`` positions
in and out (:func:`empty_window_cache`, :func:`rolling_window_attention`) and
computes its cross-attention keys/values once per sample (:meth:`Attention.kv`).
The windowed causal attention of long sequences runs in
``genvis_jax.kernels.windowed_attention`` (Pallas kernels with a pure-JAX
reference beside them); every other path runs :func:`dot_product_attention`
(``genvis_jax.kernels.attention``, the kernels' reference formula). All paths
compute in one precision: fp32 logits and softmax, probabilities rounded to
the values' dtype for the PV product, fp32 accumulation, output in q.dtype.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The kernels' references' own dense attention: one formula (and mask value)
# whichever path a layer takes.
from genvis_jax.kernels.attention import (
    MASK_VALUE, dot_product_attention, weight_values)
from genvis_jax.kernels.windowed_attention import (
    window_mask, windowed_causal_attention)
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype


def causal_mask(n: int):
  """bool (n, n): query i sees keys j <= i."""
  return jnp.tril(jnp.ones((n, n), bool))


def update_kv_cache(module: nn.Module, k, v, pos, length: int, dtype=None):
  """Writes this call's keys/values into ``module``'s ``"cache"`` collection.

  k, v (B, N, H, D) are the tokens at positions ``pos .. pos + N - 1`` (``pos``
  may be traced). The cache (``cached_key`` / ``cached_value``, each
  (B, H, M, D) in ``dtype``, default k.dtype) is created zero with
  M = ``length`` on the first call; a cache passed in keeps its own M (a
  sampler may hand in a shorter one holding only the filled prefix, see
  :func:`resize_kv_cache`), which must exceed ``pos + N - 1``: a Python-int
  ``pos`` past it raises ``ValueError`` (as does a cache of length 0, i.e.
  ``length`` 0 on the first call), a traced one is the caller's to
  keep in range (``dynamic_update_slice`` would clamp it and overwrite the
  last slots; the samplers' chunking guarantees it). Heads lead so
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
  if m == 0:
    raise ValueError("The KV cache has no room: set the attention's cache_len "
                     "(the longest sequence to decode).")
  if isinstance(pos, int) and pos + n > m:
    # dynamic_update_slice would clamp and overwrite the last slots silently.
    raise ValueError(f"Positions {pos}..{pos + n - 1} do not fit a KV cache of "
                     f"{m}; raise cache_len or resize the cache.")
  start = (0, 0, pos, 0)
  ck.value = jax.lax.dynamic_update_slice(
      ck.value, k.swapaxes(1, 2).astype(ck.value.dtype), start)
  cv.value = jax.lax.dynamic_update_slice(
      cv.value, v.swapaxes(1, 2).astype(cv.value.dtype), start)
  mask = jnp.arange(m)[None, :] <= (pos + jnp.arange(n))[:, None]
  return ck.value, cv.value, mask


CACHE_AXIS = 2  # the position axis of cached_key / cached_value (B, H, M, D)


def cached_attention(q, k, v, mask, *, scale: float = 1.0):
  """Attention of a few new queries over a KV cache (the precision of
  :func:`dot_product_attention`).

  q (B, N, H, D); k / v (B, H, M, D) as :func:`update_kv_cache` stores them;
  mask bool (N, M) or broadcastable to (B, H, N, M), True = visible. Returns
  (B, N, H, D) in q.dtype. The cache is the left operand of both matmuls in
  XLA's canonical layout (batch, rows, contraction), so nothing of size M is
  transposed or copied per step; only the N queries are. The logits are
  turned to (B, H, N, M) before the softmax, so it runs along the contiguous
  M axis (for a decode step, N = 1, that turn is free; with logits
  (B, H, M, 1) XLA:CPU ran the softmax element by element, as long as the
  logits matmul itself).
  """
  dims = (((3,), (3,)), ((0, 1), (0, 1)))        # contract D; batch B, H
  qh = q.swapaxes(1, 2).astype(k.dtype)           # (B, H, N, D)
  logits = jax.lax.dot_general(k, qh, dims,
                               preferred_element_type=jnp.float32)  # (B,H,M,N)
  logits = jnp.where(mask, logits.swapaxes(2, 3) * scale,
                     MASK_VALUE)                                   # (B,H,N,M)
  probs = jax.nn.softmax(logits, axis=-1)
  out = weight_values("bhnm,bhmd->bhnd", probs, v)                # (B,H,N,D)
  return out.swapaxes(1, 2).astype(q.dtype)


def resize_kv_cache(cache, length: int):
  """Pads with zeros or truncates every ``cached_key`` / ``cached_value`` leaf
  of a ``"cache"`` collection (sub)tree to ``length`` positions: (B, H, M, D)
  -> (B, H, length, D), dtype kept; other leaves unchanged.

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


def empty_window_cache(batch: int, window: int, num_heads: int, head_dim: int,
                       dtype=jnp.float32):
  """The rolling cache :func:`rolling_window_attention` starts from: keys
  and values ``(k, v)``, zeros, each (batch, window, num_heads, head_dim) in
  ``dtype``."""
  zeros = jnp.zeros((batch, window, num_heads, head_dim), dtype)
  return zeros, zeros


def rolling_window_attention(q, k, v, cache, pos, *, scale: float = 1.0):
  """One new position over a rolling cache of the last W positions.

  q, k, v (B, 1, H, D) of position ``pos`` (int, may be traced); ``scale``
  multiplies the float32 logits; cache ``(ck, cv)`` each (B, W, H, D)
  holding position p at slot ``p % W`` (zeros where nothing was written
  yet). Writes k / v at slot ``pos % W`` and attends every slot whose
  position is >= 0, i.e. keys ``pos - W + 1 .. pos`` (windowed causal
  attention with window W).
  Returns ``(out (B, 1, H, D) in q.dtype, (ck, cv))``. Raises ``ValueError``
  unless q holds exactly one position.
  """
  if q.shape[1] != 1:
    raise ValueError(f"A rolling window cache takes one position per call, got "
                     f"{q.shape[1]}; decode one column at a time.")
  ck, cv = cache
  w = ck.shape[1]
  slot = jnp.mod(pos, w)
  ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), slot, axis=1)
  cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), slot, axis=1)
  # Slot s holds position pos - ((pos - s) mod W); < 0: never written.
  slot_pos = pos - jnp.mod(pos - jnp.arange(w), w)
  out = dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype),
                              slot_pos >= 0, scale=scale)
  return out, (ck, cv)


# --- rotary position embedding (interleaved pairs) -------------------------------

def rope_tables(positions, head_dim: int, base: float = 10000.0):
  """positions (N,) or (B, N) -> (cos, sin), each (..., N, head_dim // 2)
  float32.

  Frequency k is ``base ** (-2k / head_dim)`` (gpt-fast ``precompute_freqs_cis``).
  """
  k = jnp.arange(0, head_dim, 2, dtype=jnp.float32)[: head_dim // 2]
  freqs = 1.0 / (base ** (k / head_dim))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs
  return jnp.cos(angles), jnp.sin(angles)


def rope_tables_2d(grid: int, head_dim: int, base: float = 10000.0,
                   cls_token_num: int = 1):
  """2D RoPE of a raster ``grid x grid`` (LlamaGen ``precompute_freqs_cis_2d``)
  -> (cos, sin), each (cls_token_num + grid**2, head_dim // 2) float32, for
  :func:`apply_rope`.

  Row ``cls_token_num + p`` rotates raster position p = (r, c): its first
  head_dim / 4 pairs by the row index r, the others by the column index c,
  at frequencies ``base ** (-4k / head_dim)``. The class-token rows are
  zeros (cos too: q and k are zeroed there, as in LlamaGen). Computed in
  float64 NumPy and rounded once, as the official table. ``head_dim`` must
  be divisible by 4 (``ValueError`` otherwise).
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}.")
  half = head_dim // 2
  freqs = 1.0 / base ** (np.arange(0, half, 2)[: half // 2] / half)
  f = np.outer(np.arange(grid), freqs)                           # (g, hd/4)
  fg = np.concatenate([np.broadcast_to(f[:, None], (grid, grid, f.shape[1])),
                       np.broadcast_to(f[None, :], (grid, grid, f.shape[1]))], -1)
  fg = fg.reshape(grid * grid, half)
  cls = np.zeros((cls_token_num, half))
  return (jnp.asarray(np.concatenate([cls, np.cos(fg)]), jnp.float32),
          jnp.asarray(np.concatenate([cls, np.sin(fg)]), jnp.float32))


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs (x[2k], x[2k+1]) by the position angle.

  x (B, N, H, D), D even; cos, sin (N, D/2) shared by the batch or
  (B, N, D/2) per example -> (B, N, H, D) in x.dtype (math in fp32).
  """
  xs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  c, s = (t[..., None, :] if t.ndim == 3 else t[None, :, None]
          for t in (cos, sin))
  x0, x1 = xs[..., 0], xs[..., 1]
  out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# --- the attention module ---------------------------------------------------------

MASKS = ("none", "causal", "window")


class FusedQKV(nn.Module):
  """q, k, v of ``x`` (..., d_in) from one ``kernel`` (d_in, 3 dim) and
  ``bias`` (3 dim,): the timm / open_clip layout (q | k | v, heads inside
  each third), each returned as (..., num_heads, dim / num_heads) in
  ``dtype``.

  The kernel is stored as before (``embed`` x ``heads``) and used as
  (d_in, 3, heads, head_dim) with the heads on the ``heads`` axis. Split over
  a mesh's ``tensor`` axis as stored, a device's columns are a block that
  crosses the thirds (q and half of k for 2 devices): a plain matmul then
  split reshuffles the activations q, k, v between devices in every layer
  (collective-permutes forward, all-to-alls backward, batch-sized). The
  view instead gathers the kernel over ``tensor`` once per layer
  (weight-sized, as FSDP gathers over ``fsdp``) and each device computes
  its own heads.
  """
  num_heads: int
  dim: int
  use_bias: bool
  kernel_init: Callable
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    d_in, h = x.shape[-1], self.num_heads
    split = (3, h, self.dim // h)
    kernel = self.param("kernel", layers.named(self.kernel_init, ("embed", "heads")),
                        (d_in, 3 * self.dim), self.param_dtype)
    kernel = nn.with_logical_constraint(kernel.reshape(d_in, *split),
                                        ("embed", None, "heads", None))
    y = jnp.einsum("...d,dthe->...the", x.astype(self.dtype),
                   kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", layers.named(layers.zeros, ("heads",)),
                        (3 * self.dim,), self.param_dtype)
      y = layers.add_bias(y, nn.with_logical_constraint(
          bias.reshape(split), (None, "heads", None)))
    return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]


class Attention(nn.Module):
  """Multi-head attention, ``x (B, N, d) -> (B, N, dim)`` (``dim`` default d).

  Options (fields):
    num_heads: heads; head_dim = d / num_heads (d = ``x.shape[-1]``, or
      ``dim`` when set: the width of q/k/v and of the output).
    fused_qkv: one ``qkv`` projection (``FusedQKV``: d -> 3d, q | k | v,
      heads inside each third, the timm / open_clip layout; split by heads
      under tensor parallelism) instead of ``q``, ``k``, ``v``. Cross
      attention (``context`` given) always uses separate projections.
    qkv_bias, out_bias: biases of the input / output projections.
    qk_norm: LayerNorm (eps ``norm_eps``) of q and k over head_dim
      (``q_norm``, ``k_norm``), before the 1/sqrt(head_dim) scale.
    mask: ``"none"`` (full), ``"causal"``, or ``"window"`` (windowed causal,
      ``window`` columns of ``tokens_per_column`` tokens, through the kernel
      dispatcher ``attn_impl``; dense masked attention when probabilities
      drop out, which the kernels do not do).
    cache_len: with ``cache_pos`` at call time, keys/values go to the
      ``"cache"`` collection (:func:`update_kv_cache`, length ``cache_len``).
      (A rolling window cache is passed in and out instead: ``window_cache``.)
    attn_dropout, proj_dropout: on the probabilities / the output.
    kernel_init, out_init: initialisers of the input / output projections.

  Logits and softmax are fp32 whatever ``dtype``; the PV product takes
  ``dtype`` probabilities and accumulates in fp32, on every path (dense,
  banded, Pallas, cached), so a bf16 layer computes alike on all of them.
  """
  num_heads: int
  dim: int | None = None
  fused_qkv: bool = True
  qkv_bias: bool = True
  out_bias: bool = True
  qk_norm: bool = False
  norm_eps: float = 1e-6
  mask: str = "none"
  window: int = 0
  tokens_per_column: int = 1
  attn_impl: str = "auto"
  cache_len: int = 0
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  kernel_init: Callable = layers.default_kernel_init
  out_init: Callable | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, names, name, use_bias, init):
    return layers.dense(features, names, use_bias=use_bias, kernel_init=init,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

  def _heads(self, t):
    return t.reshape(*t.shape[:-1], self.num_heads, t.shape[-1] // self.num_heads)

  @nn.compact
  def __call__(self, x, context=None, *, rope=None, train: bool = False,
               cache_pos=None, mask=None, kv=None, window_cache=None):
    """Self-attention over ``x`` (B, N, d), or cross-attention of ``x`` over
    ``context`` (B, M, d_c) or its precomputed ``kv`` (no causal mask, no
    cache).

    rope: ``(cos, sin)`` (N, head_dim / 2) or per example (B, N, head_dim / 2)
      rotating q and k (self) or q (cross), :func:`apply_rope`.
    cache_pos: with ``cache_len``, x holds the tokens at positions
      ``cache_pos .. cache_pos + N - 1`` (int, may be traced); queries attend
      every cached position <= their own.
    mask: optional bool, broadcastable to (B, H, N, M), True = visible;
      combined with the ``mask`` field's own.
    kv: ``(k, v)`` from :meth:`kv` (each (B, M, H, head_dim)): cross-attention
      over a context projected once (``context`` unused).
    window_cache: ``(k, v)`` each (B, window, H, head_dim), the rolling cache
      of :func:`rolling_window_attention` (``mask="window"``, one position
      ``cache_pos`` per call, no dropout); the call then returns
      ``(out, window_cache)`` with this position written.
    ``x=None``: returns :meth:`kv` of ``context``.
    Returns (B, N, dim) in ``dtype``.
    Raises ``ValueError`` for a ``mask`` field not in ``MASKS``, ``cache_pos``
    on anything but causal self-attention, ``window_cache`` without
    ``mask="window"``, or a KV cache that cannot hold the positions
    (:func:`update_kv_cache`).
    """
    is_self = context is None and kv is None
    dim = self.dim or (context if x is None else x).shape[-1]
    project = lambda name, t: self._heads(self._dense(
        dim, ("embed", "heads"), name, self.qkv_bias, self.kernel_init)(t))
    norm = lambda name, t: layers.layer_norm(
        self.norm_eps, name=name, dtype=self.dtype,
        param_dtype=self.param_dtype)(t)
    if is_self and self.fused_qkv:
      q, k, v = FusedQKV(self.num_heads, dim, self.qkv_bias, self.kernel_init,
                         self.dtype, self.param_dtype, name="qkv")(x)
    elif kv is None:
      src = x if context is None else context
      k, v = project("k", src), project("v", src)
    if kv is None and self.qk_norm:
      k = norm("k_norm", k)
    if x is None:
      return k.astype(self.dtype), v.astype(self.dtype)
    if kv is not None:
      k, v = kv
    if not (is_self and self.fused_qkv):
      q = project("q", x)
    if self.qk_norm:
      q = norm("q_norm", q)
    if rope is not None:
      q = apply_rope(q, *rope)
      if is_self:
        k = apply_rope(k, *rope)
    q, k, v = (t.astype(self.dtype) for t in (q, k, v))
    if window_cache is not None:
      if self.mask != "window":
        raise ValueError(f"window_cache needs mask='window', got {self.mask!r}.")
      if self.tokens_per_column != 1:
        # The rolling cache counts its window in positions, one per call;
        # columns of several tokens (each seeing its whole column) are not
        # what it decodes.
        raise ValueError(
            "window_cache decodes one token per column; this attention has "
            f"tokens_per_column={self.tokens_per_column}.")
      out, window_cache = rolling_window_attention(
          q, k, v, window_cache, cache_pos, scale=q.shape[-1] ** -0.5)
    else:
      out = self._attend(q, k, v, mask, train, cache_pos, is_self)
    out = self._dense(dim, ("heads", "embed"), "out", self.out_bias,
                      self.out_init or self.kernel_init)(
                          out.reshape(*x.shape[:-1], dim))
    out = nn.Dropout(self.proj_dropout, deterministic=not train)(out)
    return out if window_cache is None else (out, window_cache)

  def kv(self, context):
    """Cross-attention keys and values of ``context`` (B, M, d_c), each
    (B, M, H, head_dim) in ``dtype`` (``k_norm`` applied): project a
    context that does not change once and pass them as ``kv=``. Projects to
    ``dim``, default the context's width: set ``dim`` when the queries'
    width differs (a direct call would default to theirs)."""
    return self(None, context)

  def _attend(self, q, k, v, mask, train, cache_pos, is_self):
    if self.mask not in MASKS:
      raise ValueError(f"Attention mask {self.mask!r} is not one of {MASKS}.")
    # Applied to the float32 logits: q * scale on a bf16 q rounds q again
    # wherever sqrt(head_dim) is no power of two (RAR-XL's 80, RAR-XXL's 88).
    scale = q.shape[-1] ** -0.5
    drop = nn.Dropout(self.attn_dropout, deterministic=not train)
    dropping = train and self.attn_dropout > 0
    n = q.shape[1]
    if cache_pos is not None:
      if not (is_self and self.mask == "causal"):
        raise ValueError(
            "cache_pos (the KV cache) serves causal self-attention; this "
            f"attention has mask={self.mask!r}{'' if is_self else ' over a context'}"
            " (windowed attention decodes with window_cache).")
      k, v, visible = update_kv_cache(self, k, v, cache_pos, self.cache_len,
                                      self.dtype)
      if mask is not None:
        visible = visible & mask
      return cached_attention(q, k, v, visible, scale=scale)
    own = None
    if is_self and self.mask == "causal":
      own = causal_mask(n)
    elif is_self and self.mask == "window":
      if mask is None and not dropping:
        return windowed_causal_attention(
            q, k, v, window=self.window,
            tokens_per_column=self.tokens_per_column, impl=self.attn_impl)
      own = window_mask(n, window=self.window,
                        tokens_per_column=self.tokens_per_column)
    if own is not None:
      mask = own if mask is None else mask & own
    return dot_product_attention(q, k, v, mask, scale=scale,
                                 dropout=drop if dropping else None)
