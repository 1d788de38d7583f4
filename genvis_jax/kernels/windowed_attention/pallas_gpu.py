"""Windowed causal flash attention as Pallas GPU (Triton) kernels.

Same structure as ``jax.experimental.pallas.ops.gpu.attention``: one program
per (query block, batch, head) that keeps its query tile in registers and loops
over key blocks with an online softmax (exp2 domain), then separate dk/dv and
dq kernels that recompute probabilities from the saved logsumexp. The loops run
only over the blocks inside the window band (``reference.kv_block_span`` /
``q_block_span``): O(N x W) work instead of O(N^2).

Works on padded ``(B, Np, H, D)`` arrays: ``Np`` a multiple of both block
sizes and ``D`` a power of two (``__init__.windowed_causal_attention`` pads,
and differentiates ``forward`` through ``backward`` with one ``jax.custom_vjp``
for both kernel files).
On a real GPU use power-of-two blocks >= 16 (Triton ``dot``). On CPU it runs
with ``interpret=True`` (tested); Triton lowering is tested by exporting for
CUDA, which needs no GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from genvis_jax.kernels.windowed_attention import reference as ref

LOG2E = math.log2(math.e)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Geometry(ref.Geometry):
  """``reference.Geometry`` + Triton's warps and pipeline stages."""
  num_warps: int | None = None
  num_stages: int = 2

  def params(self, head_dim):
    """Triton compiler parameters: ``num_warps`` (default 4 for head_dim <=
    64, else 8) and ``num_stages``."""
    warps = self.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


def _mask(g, q_block, k_block, shape):
  return ref.tile_mask(q_block * g.block_q, k_block * g.block_k, shape,
                       window=g.window, tokens_per_column=g.tokens_per_column)


def _rows(ref_, block, size):
  return ref_[pl.ds(pl.multiple_of(block * size, size), size)]


def _logits2(g, q, k):
  """Scaled logits in the base-2 domain: exp2(s2) == exp(scale * q.k)."""
  s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
  return s * (g.scale * LOG2E)


# ----------------------------------------------------------------------------
# Forward: grid (q blocks, batch, heads).


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, g: Geometry):
  qi = pl.program_id(0)
  first, count = ref.kv_block_span(qi, **g.band())
  q = q_ref[...]
  bq, d = q.shape

  def body(t, carry):
    acc, m_prev, l_prev = carry
    kj = first + t
    k, v = _rows(k_ref, kj, g.block_k), _rows(v_ref, kj, g.block_k)
    mask = _mask(g, qi, kj, (bq, g.block_k))
    s = jnp.where(mask, _logits2(g, q, k), ref.MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
    alpha = jnp.exp2(m_prev - m_next)
    pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (acc * alpha[:, None] + pv, m_next,
            alpha * l_prev + jnp.sum(p, axis=1))

  init = (jnp.zeros((bq, d), jnp.float32),
          jnp.full((bq,), ref.MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, count, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # l > 0: i sees i
  lse_ref[...] = m + jnp.log2(l)  # base 2


def forward(q, k, v, g: Geometry):
  """q, k, v: (B, Np, H, D) -> (out (B, Np, H, D) in q.dtype, lse2 (B, H, Np)
  fp32, base 2)."""
  b, n, h, d = q.shape
  tile = pl.BlockSpec((None, g.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  full = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  stat = pl.BlockSpec((None, None, g.block_q), lambda i, bi, hi: (bi, hi, i))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, g=g),
      grid=(n // g.block_q, b, h),
      in_specs=[tile, full, full],
      out_specs=[tile, stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
      compiler_params=g.params(d), interpret=g.interpret,
      name="windowed_attention_fwd",
  )(q, k, v)


# ----------------------------------------------------------------------------
# Backward.


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                *, g: Geometry):
  ki = pl.program_id(0)
  first, count = ref.q_block_span(ki, **g.band())
  k, v = k_ref[...], v_ref[...]
  bk, d = k.shape

  def body(t, carry):
    dk, dv = carry
    qj = first + t
    q, do = _rows(q_ref, qj, g.block_q), _rows(do_ref, qj, g.block_q)
    lse, di = _rows(lse_ref, qj, g.block_q), _rows(di_ref, qj, g.block_q)
    mask = _mask(g, qj, ki, (g.block_q, bk))
    p = jnp.where(mask, jnp.exp2(_logits2(g, q, k) - lse[:, None]), 0.0)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, TN,
                                  preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di[:, None]) * g.scale
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, TN,
                                  preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, count, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *,
               g: Geometry):
  qi = pl.program_id(0)
  first, count = ref.kv_block_span(qi, **g.band())
  q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
  bq, d = q.shape

  def body(t, dq):
    kj = first + t
    k, v = _rows(k_ref, kj, g.block_k), _rows(v_ref, kj, g.block_k)
    mask = _mask(g, qi, kj, (bq, g.block_k))
    p = jnp.where(mask, jnp.exp2(_logits2(g, q, k) - lse[:, None]), 0.0)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di[:, None]) * g.scale
    return dq + jax.lax.dot(ds.astype(k.dtype), k,
                            preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, count, body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def backward(q, k, v, out, lse, do, g: Geometry):
  """Gradients (dq, dk, dv), each (B, Np, H, D) in its operand's dtype, of
  ``forward``'s output; ``lse`` is ``forward``'s base-2 lse2."""
  b, n, h, d = q.shape
  di = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32),
                  do.astype(jnp.float32))
  full = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  full_st = pl.BlockSpec((None, None, n), lambda i, bi, hi: (bi, hi, 0))
  tile_k = pl.BlockSpec((None, g.block_k, None, d),
                        lambda i, bi, hi: (bi, i, hi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g),
      grid=(n // g.block_k, b, h),
      in_specs=[full, tile_k, tile_k, full, full_st, full_st],
      out_specs=[tile_k, tile_k],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=g.params(d), interpret=g.interpret,
      name="windowed_attention_dkv",
  )(q, k, v, do, lse, di)

  tile_q = pl.BlockSpec((None, g.block_q, None, d),
                        lambda i, bi, hi: (bi, i, hi, 0))
  tile_st = pl.BlockSpec((None, None, g.block_q), lambda i, bi, hi: (bi, hi, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, g=g),
      grid=(n // g.block_q, b, h),
      in_specs=[tile_q, full, full, tile_q, tile_st, tile_st],
      out_specs=tile_q,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=g.params(d), interpret=g.interpret,
      name="windowed_attention_dq",
  )(q, k, v, do, lse, di)
  return dq, dk, dv
