"""Windowed causal flash attention as Pallas TPU (Mosaic) kernels.

Same structure as ``jax.experimental.pallas.ops.tpu.flash_attention`` (a grid
of (batch, head, q block, kv step), VMEM scratch for the online-softmax state,
logsumexp saved for the backward pass, separate dk/dv and dq kernels) but the
last grid axis only walks the key blocks inside the window band: step ``j`` of
query block ``i`` reads key block ``first(i) + j`` (``reference.kv_block_span``),
so the grid has ``N / block_q * max_kv_blocks`` steps: O(N x W), not O(N^2).
Steps past a block's own count are skipped with ``pl.when`` and their index
map repeats the last block, so no DMA is issued for them.

Works on padded ``(B, H, Np, D)`` arrays (``Np`` a multiple of both block
sizes); ``__init__.windowed_causal_attention`` pads and transposes, and
differentiates ``forward`` through ``backward`` (one ``jax.custom_vjp`` for
both kernel files). On CPU it
runs with ``interpret=True`` (tested) and its Mosaic lowering is tested by
exporting for TPU. On a real TPU blocks must be multiples of 8 (128 is the
efficient size). As upstream, softmax statistics and the saved logsumexp are
lane-replicated ``(..., 128)`` fp32 arrays (TPU vector layout); the residual
costs ``B * H * Np * 512`` bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from genvis_jax.kernels.windowed_attention import reference as ref

LANES = 128  # softmax statistics are kept lane-replicated: (rows, 128)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


Geometry = ref.Geometry   # nothing TPU-specific to add


def _lanes(x, n):
  """(rows, 128) lane-replicated stats -> (rows, n)."""
  if n <= LANES:
    return x[:, :n]
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _tile(g: Geometry, q_block, k_block, shape):
  return ref.tile_mask(q_block * g.block_q, k_block * g.block_k, shape,
                       window=g.window, tokens_per_column=g.tokens_per_column)


def _probs(g, q, k, lse, q_block, k_block):
  """Recomputed probabilities p = exp(s - lse) of one tile, 0 off the band."""
  s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
  mask = _tile(g, q_block, k_block, s.shape)
  return jnp.where(mask, jnp.exp(s * g.scale - _lanes(lse, s.shape[1])), 0.0)


def _clamped(first, count, j):
  return first + jnp.minimum(j, count - 1)


# ----------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                g: Geometry, steps: int):
  qi, j = pl.program_id(2), pl.program_id(3)
  first, count = ref.kv_block_span(qi, **g.band())

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, ref.MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < count)
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
    mask = _tile(g, qi, first + j, s.shape)
    s = jnp.where(mask, s * g.scale, ref.MASK_VALUE)
    m_prev, l_prev = m_sc[...], l_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Zeroing masked p keeps a fully masked tile from adding exp(0) = 1.
    p = jnp.where(mask, jnp.exp(s - _lanes(m_next, s.shape[1])), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    m_sc[...] = m_next
    l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * _lanes(alpha, v.shape[1]) + pv

  @pl.when(j == steps - 1)
  def _finish():
    l = l_sc[...]  # > 0: every query sees at least itself
    o_ref[...] = (acc_sc[...] / _lanes(l, o_ref.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def forward(q, k, v, g: Geometry):
  """q, k, v: (B, H, Np, D) -> (out (B, H, Np, D) in q.dtype, lse (B, H, Np,
  128) fp32, natural log, lane-replicated)."""
  b, h, n, d = q.shape
  steps = ref.max_kv_blocks(**g.band())
  grid = (b, h, n // g.block_q, steps)

  def kv_map(bi, hi, qi, j):
    first, count = ref.kv_block_span(qi, **g.band())
    return bi, hi, _clamped(first, count, j), 0

  q_map = lambda bi, hi, qi, j: (bi, hi, qi, 0)
  q_spec = pl.BlockSpec((None, None, g.block_q, d), q_map)
  kv_spec = pl.BlockSpec((None, None, g.block_k, d), kv_map)
  lse_spec = pl.BlockSpec((None, None, g.block_q, LANES), q_map)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, g=g, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid,
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=[q_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((g.block_q, LANES), jnp.float32),
                          pltpu.VMEM((g.block_q, LANES), jnp.float32),
                          pltpu.VMEM((g.block_q, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, n, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      interpret=g.interpret, name="windowed_attention_fwd",
  )(q, k, v)


# ----------------------------------------------------------------------------
# Backward: dk/dv walks the query blocks of each key block, dq the key blocks
# of each query block; both recompute p from the saved logsumexp.


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, g: Geometry, steps: int):
  ki, j = pl.program_id(2), pl.program_id(3)
  first, count = ref.q_block_span(ki, **g.band())

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(j < count)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(g, q, k, lse_ref[...], first + j, ki)  # (bq, bk)
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, TN,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], dp.shape[1])) * g.scale
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, TN,
                                      preferred_element_type=jnp.float32)

  @pl.when(j == steps - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *,
               g: Geometry, steps: int):
  qi, j = pl.program_id(2), pl.program_id(3)
  first, count = ref.kv_block_span(qi, **g.band())

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < count)
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(g, q, k, lse_ref[...], qi, first + j)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], dp.shape[1])) * g.scale
    dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k,
                              preferred_element_type=jnp.float32)

  @pl.when(j == steps - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def backward(q, k, v, out, lse, do, g: Geometry):
  """Gradients (dq, dk, dv), each (B, H, Np, D) in its operand's dtype, of
  ``forward``'s output."""
  b, h, n, d = q.shape
  di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  di = jnp.broadcast_to(di[..., None], lse.shape)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dk, dv: grid over key blocks, inner steps over the query blocks that see them.
  steps = ref.max_q_blocks(**g.band())

  def q_map(bi, hi, ki, j):
    first, count = ref.q_block_span(ki, **g.band())
    return bi, hi, _clamped(first, count, j), 0

  own = lambda bi, hi, ki, j: (bi, hi, ki, 0)
  q_spec = pl.BlockSpec((None, None, g.block_q, d), q_map)
  st_spec = pl.BlockSpec((None, None, g.block_q, LANES), q_map)
  k_spec = pl.BlockSpec((None, None, g.block_k, d), own)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(b, h, n // g.block_k, steps),
          in_specs=[q_spec, k_spec, k_spec, q_spec, st_spec, st_spec],
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((g.block_k, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=g.interpret,
      name="windowed_attention_dkv",
  )(q, k, v, do, lse, di)

  # dq: grid over query blocks, inner steps over their key blocks.
  steps = ref.max_kv_blocks(**g.band())

  def kv_map(bi, hi, qi, j):
    first, count = ref.kv_block_span(qi, **g.band())
    return bi, hi, _clamped(first, count, j), 0

  own = lambda bi, hi, qi, j: (bi, hi, qi, 0)
  q_spec = pl.BlockSpec((None, None, g.block_q, d), own)
  st_spec = pl.BlockSpec((None, None, g.block_q, LANES), own)
  kv_spec = pl.BlockSpec((None, None, g.block_k, d), kv_map)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, g=g, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(b, h, n // g.block_q, steps),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((g.block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=g.interpret,
      name="windowed_attention_dq",
  )(q, k, v, do, lse, di)
  return dq, dk, dv
