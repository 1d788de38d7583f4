"""Rectified-flow head of the Equivariant generator (MAR ``SimpleMLPAdaLN``).

``DiffLoss`` holds ``FlowNet`` as ``net`` (official ``diffloss.net``): an MLP
with adaLN conditioned on ``cond_embed(z) + time_embed(t)`` that maps
``(x_t (..., C), t (...), z (..., d))`` to the velocity ``eps - x`` of
``x_t = t * eps + (1 - t) * x``. Parameter names follow the official model:
``time_embed/mlp_{0,2}``, ``cond_embed``, ``input_proj``,
``res_blocks_{i}/{in_ln, mlp_0, mlp_2, adaLN_modulation_1}``,
``final_layer/{linear, adaLN_modulation_1}``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax.models import layers

Dtype = Any
xavier = nn.initializers.xavier_uniform()
normal02 = nn.initializers.normal(0.02)


def dense(features, names, name, dtype, param_dtype, kernel_init=xavier):
  """Linear with the official xavier-uniform init and logical axis ``names``."""
  return layers.dense(features, names, kernel_init=kernel_init, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """t (...) raw times -> (..., dim) ``[cos, sin]`` sinusoidal features."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


def _modulate(x, shift, scale):
  return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
  width: int
  frequency_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=normal02)
    h = timestep_embedding(t, self.frequency_dim)
    h = dense(self.width, (None, "embed"), "mlp_0", **kw)(h)
    return dense(self.width, ("mlp", "embed"), "mlp_2", **kw)(nn.silu(h))


class ResBlock(nn.Module):
  """x + gate * MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from y."""
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = dense(3 * self.width, ("embed", "mlp"), "adaLN_modulation_1",
                 kernel_init=layers.zeros, **kw)(nn.silu(y))
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = _modulate(layers.layer_norm(1e-6, name="in_ln", **kw)(x), shift, scale)
    h = dense(self.width, ("embed", "mlp"), "mlp_0", **kw)(h)
    h = dense(self.width, ("mlp", "embed"), "mlp_2", **kw)(nn.silu(h))
    return x + gate * h


class FinalLayer(nn.Module):
  width: int
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = dense(2 * self.width, ("embed", "mlp"), "adaLN_modulation_1",
                 kernel_init=layers.zeros, **kw)(nn.silu(y))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = layers.layer_norm(1e-6, use_scale=False, use_bias=False,
                          name="norm_final", **kw)(x)
    return dense(self.out_channels, ("embed", None), "linear",
                  kernel_init=layers.zeros, **kw)(_modulate(x, shift, scale))


class FlowNet(nn.Module):
  """(x_t (..., C), t (...), z (..., d)) -> velocity (..., C)."""
  channels: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # The head's residual stream is named "embed", its inner axes "mlp".
    x = dense(self.width, (None, "embed"), "input_proj", **kw)(x)
    y = TimestepEmbedder(self.width, name="time_embed", **kw)(t)
    y = y + dense(self.width, (None, "embed"), "cond_embed", **kw)(z)
    for i in range(self.depth):
      x = ResBlock(self.width, name=f"res_blocks_{i}", **kw)(x, y)
    return FinalLayer(self.width, self.channels, name="final_layer", **kw)(x, y)


class DiffLoss(nn.Module):
  """Holds the head as ``net`` (official ``diffloss.net``)."""
  channels: int
  width: int
  depth: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, z):
    return FlowNet(self.channels, self.width, self.depth, self.dtype,
                   self.param_dtype, name="net")(x, t, z)
