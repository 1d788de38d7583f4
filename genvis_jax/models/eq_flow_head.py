"""Rectified-flow head of the Equivariant generator (MAR ``SimpleMLPAdaLN``).

``DiffLoss`` holds ``FlowNet`` as ``net`` (official ``diffloss.net``): an MLP
with adaLN conditioned on ``cond_embed(z) + time_embed(t)`` that maps
``(x_t (..., C), t (...), z (..., d))`` to the velocity ``eps - x`` of
``x_t = t * eps + (1 - t) * x``. Parameter names follow the official model:
``time_embed/mlp_{0,2}``, ``cond_embed``, ``input_proj``,
``res_blocks_{i}/{in_ln, mlp_0, mlp_2, adaLN_modulation_1}``,
``final_layer/{linear, adaLN_modulation_1}``.

The adaLN modulations depend on (t, z) only: ``modulations`` / ``modulated``
split the head there, so a sampler can compute them for all Euler steps of a
column in one matmul (``genvis_jax.sample.eq_generator.euler_flow_hoisted``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype


def dense(features, names, name, dtype, param_dtype,
          kernel_init=layers.xavier_uniform):
  """Linear with the official xavier-uniform init and logical axis ``names``."""
  return layers.dense(features, names, kernel_init=kernel_init, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """t (...) raw times -> (..., dim) float32 ``[cos, sin]`` sinusoidal
  features at frequencies ``max_period ** (-k / (dim // 2))`` (a zero column
  appended for odd ``dim``)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """Flow times -> conditioning vectors: t (...) float -> (..., width).

  Sinusoidal features of t (``timestep_embedding``, (..., frequency_dim)),
  then ``mlp_0`` (frequency_dim -> width), SiLU, ``mlp_2`` (width -> width);
  both Linears N(0, 0.02) as the official ``TimestepEmbedder``.
  """
  width: int
  frequency_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=layers.default_kernel_init)
    h = timestep_embedding(t, self.frequency_dim)
    h = dense(self.width, (None, "embed"), "mlp_0", **kw)(h)
    return dense(self.width, ("mlp", "embed"), "mlp_2", **kw)(nn.silu(h))


class ResBlock(nn.Module):
  """x + gate * MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from y.

  ``modulation(y)`` and ``modulated(x, mod)`` split the block so a sampler can
  compute the adaLN modulations of many flow steps in one matmul (they depend
  on t and z only, not on x); ``__call__`` is their composition.
  """
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.adaLN_modulation_1 = dense(3 * self.width, ("embed", "mlp"), None,
                                    kernel_init=layers.zeros, **kw)
    self.in_ln = layers.layer_norm(1e-6, **kw)
    self.mlp_0 = dense(self.width, ("embed", "mlp"), None, **kw)
    self.mlp_2 = dense(self.width, ("mlp", "embed"), None, **kw)

  def modulation(self, y):
    """y (..., width) -> (..., 3 width) ``[shift, scale, gate]``."""
    return self.adaLN_modulation_1(nn.silu(y))

  def modulated(self, x, mod):
    """x (..., width), mod (..., 3 width) -> (..., width)."""
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = layers.modulate(self.in_ln(x), shift, scale)
    h = self.mlp_2(nn.silu(self.mlp_0(h)))
    return x + gate * h

  def __call__(self, x, y):
    return self.modulated(x, self.modulation(y))


class FinalLayer(nn.Module):
  """adaLN (shift, scale) from y, parameter-free LayerNorm, linear to C:
  x (..., width), y (..., width) -> (..., out_channels) in ``dtype``."""
  width: int
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.adaLN_modulation_1 = dense(2 * self.width, ("embed", "mlp"), None,
                                    kernel_init=layers.zeros, **kw)
    self.norm_final = layers.layer_norm(1e-6, use_scale=False, use_bias=False,
                                        **kw)
    self.linear = dense(self.out_channels, ("embed", None), None,
                        kernel_init=layers.zeros, **kw)

  def modulation(self, y):
    """y (..., width) -> (..., 2 width) ``[shift, scale]``."""
    return self.adaLN_modulation_1(nn.silu(y))

  def modulated(self, x, mod):
    """x (..., width), mod (..., 2 width) -> (..., out_channels)."""
    shift, scale = jnp.split(mod, 2, axis=-1)
    return self.linear(layers.modulate(self.norm_final(x), shift, scale))

  def __call__(self, x, y):
    return self.modulated(x, self.modulation(y))


class FlowNet(nn.Module):
  """(x_t (..., C), t (...), z (..., d)) -> velocity (..., C).

  Split for sampling: ``modulations(t, z)`` -> a tuple of ``depth + 1`` arrays
  (..., 3 width) per res block and (..., 2 width) for the final layer; t and z
  broadcast against each other (e.g. t (S, 1) with z (R, d) gives S x R rows);
  ``modulated(x, mods)`` runs the x path with them. ``__call__`` = both.
  Outputs in ``dtype``.
  """
  channels: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # The head's residual stream is named "embed", its inner axes "mlp".
    self.input_proj = dense(self.width, (None, "embed"), None, **kw)
    self.time_embed = TimestepEmbedder(self.width, **kw)
    self.cond_embed = dense(self.width, (None, "embed"), None, **kw)
    self.res_blocks = [ResBlock(self.width, **kw) for _ in range(self.depth)]
    self.final_layer = FinalLayer(self.width, self.channels, **kw)

  def modulations(self, t, z):
    y = self.time_embed(t) + self.cond_embed(z)
    return tuple(b.modulation(y) for b in self.res_blocks) + (
        self.final_layer.modulation(y),)

  def modulated(self, x, mods):
    x = self.input_proj(x)
    for blk, mod in zip(self.res_blocks, mods):
      x = blk.modulated(x, mod)
    return self.final_layer.modulated(x, mods[-1])

  def __call__(self, x, t, z):
    return self.modulated(x, self.modulations(t, z))


class DiffLoss(nn.Module):
  """Holds the head as ``net`` (official ``diffloss.net``); its methods are
  ``FlowNet``'s (x_t (..., C), t (...), z (..., d) -> velocity (..., C))."""
  channels: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.net = FlowNet(self.channels, self.width, self.depth, self.dtype,
                       self.param_dtype)

  def modulations(self, t, z):
    return self.net.modulations(t, z)

  def modulated(self, x, mods):
    return self.net.modulated(x, mods)

  def __call__(self, x, t, z):
    return self.net(x, t, z)
