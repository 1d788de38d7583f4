"""Equivariant generator sampling: column by column, rectified flow per column.

For each column ``c`` the transformer gives a conditioning vector z (cond and,
with CFG, uncond from the null class); the flow head integrates
``num_steps`` Euler steps from t = 1 (noise) to t = 0:
``x <- x - v(x, t, z) / num_steps`` at ``t = i / num_steps``, i = N..1.
With CFG both branches share the noise and the state; the velocity is
``u + s_c (c - u)`` with the linear per-column ramp
``s_c = 1 + (cfg - 1) * (c + 1) / num_columns`` (official ``cfg_schedule``
"linear"); ``cfg == 1`` runs no uncond branch.

``sample`` feeds each finished column into a per-layer rolling KV cache
(``EqGenerator.prefill`` / ``decode_step``): constant memory and time per
column, so the width (``num_columns``) may be many times the training width.
``sample_uncached`` is the official algorithm (re-run the full windowed
forward over the whole sequence for every column); with the same key both give
the same latents. Each is one jitted function. Column ``c`` draws its noise
from ``fold_in(rng, c)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cfg_scale(column, num_columns: int, cfg):
  """Linear CFG ramp ``1 + (cfg - 1) * (column + 1) / num_columns``."""
  return 1.0 + (cfg - 1.0) * (jnp.asarray(column, jnp.float32) + 1.0) / num_columns


def euler_flow(velocity_fn, z, noise, scale, num_steps: int, use_cfg: bool):
  """Integrates the flow head from t = 1 to 0 with Euler steps.

  Args:
    velocity_fn: (x (B', C), t (B',), z (B', d)) -> v (B', C).
    z: (B, d), or (2B, d) ``[cond; uncond]`` with CFG.
    noise: (B, C) starting point at t = 1.
    scale: CFG scale (traced scalar).
  Returns the sample at t = 0, (B, C) float32.
  """
  def body(i, x):
    t = (num_steps - i).astype(jnp.float32) / num_steps
    if use_cfg:
      xx = jnp.concatenate([x, x])
      v = velocity_fn(xx, jnp.full((xx.shape[0],), t), z)
      c, u = jnp.split(v, 2)
      v = u + scale * (c - u)
    else:
      v = velocity_fn(x, jnp.full((x.shape[0],), t), z)
    return x - v / num_steps

  return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def _labels2(model, labels, use_cfg):
  if not use_cfg:
    return labels
  return jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])


def _column(model, params, z, rng, col, num_columns, num_steps, cfg, use_cfg):
  b = z.shape[0] // (2 if use_cfg else 1)
  noise = jax.random.normal(jax.random.fold_in(rng, col), (b, model.token_dim))
  vel = lambda x, t, zz: model.apply({"params": params}, x, t, zz,
                                     method="velocity")
  return euler_flow(vel, z, noise, cfg_scale(col, num_columns, cfg), num_steps,
                    use_cfg)


def _cached_impl(model, use_cfg, num_columns, num_steps, params, labels, rng,
                 cfg):
  labels2 = _labels2(model, labels, use_cfg)
  twice = (lambda x: jnp.concatenate([x, x])) if use_cfg else (lambda x: x)
  z, cache = model.apply({"params": params}, labels2, method="prefill")
  b = labels.shape[0]
  latents = jnp.zeros((b, num_columns, model.token_dim), jnp.float32)
  conds = jnp.zeros((z.shape[0], num_columns, z.shape[-1]), z.dtype)

  def body(col, carry):
    z, cache, latents, conds = carry
    x = _column(model, params, z, rng, col, num_columns, num_steps, cfg, use_cfg)
    latents = jax.lax.dynamic_update_index_in_dim(latents, x, col, axis=1)
    conds = jax.lax.dynamic_update_index_in_dim(conds, z, col, axis=1)
    z, cache = model.apply({"params": params}, twice(x), col, cache,
                           method="decode_step")
    return z, cache, latents, conds

  _, _, latents, conds = jax.lax.fori_loop(0, num_columns, body,
                                           (z, cache, latents, conds))
  return latents, conds


def _uncached_impl(model, use_cfg, num_columns, num_steps, params, labels, rng,
                   cfg):
  labels2 = _labels2(model, labels, use_cfg)
  twice = (lambda x: jnp.concatenate([x, x])) if use_cfg else (lambda x: x)
  b = labels.shape[0]
  latents = jnp.zeros((b, num_columns, model.token_dim), jnp.float32)
  conds = jnp.zeros((labels2.shape[0], num_columns, model.hidden_size),
                    jnp.float32)

  def body(col, carry):
    latents, conds = carry
    # Full forward; columns >= col are placeholders the causal window hides.
    z_all = model.apply({"params": params}, twice(latents), labels2,
                        method="condition")
    z = jax.lax.dynamic_index_in_dim(z_all, col, axis=1, keepdims=False)
    x = _column(model, params, z, rng, col, num_columns, num_steps, cfg, use_cfg)
    latents = jax.lax.dynamic_update_index_in_dim(latents, x, col, axis=1)
    conds = jax.lax.dynamic_update_index_in_dim(conds, z.astype(conds.dtype),
                                                col, axis=1)
    return latents, conds

  return jax.lax.fori_loop(0, num_columns, body, (latents, conds))


@functools.lru_cache(maxsize=32)
def _compiled(impl, model, use_cfg: bool, num_columns: int, num_steps: int):
  return jax.jit(functools.partial(impl, model, use_cfg, num_columns, num_steps))


def _run(impl, model, params, labels, rng, num_columns, cfg, num_steps,
         return_conditions):
  if int(num_columns) < 1:
    raise ValueError(f"num_columns must be >= 1, got {num_columns}.")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a 1-D class array, got shape {labels.shape}.")
  use_cfg = float(cfg) != 1.0
  fn = _compiled(impl, model, use_cfg, int(num_columns), int(num_steps))
  latents, conds = fn(params, labels, rng, jnp.asarray(cfg, jnp.float32))
  return (latents, conds) if return_conditions else latents


def sample(model, params, labels, rng, *, num_columns: int, cfg: float = 1.0,
           num_steps: int = 100, return_conditions: bool = False):
  """Class-conditional column-by-column sampling with the rolling KV cache.

  Args:
    model: an ``EqGenerator``; params: its parameters.
    labels: int (B,) classes (``model.null_label`` = unconditional).
    rng: PRNG key; column c uses ``fold_in(rng, c)``.
    num_columns: image width in tokens (any value, e.g. 8x the training width).
    cfg: guidance scale (1 = none), ramped linearly over the columns.
    num_steps: Euler steps of the flow head per column.
    return_conditions: also return the conditioning vectors fed to the head.
  Returns:
    latents (B, num_columns, token_dim) float32 in the generator's (scaled)
    latent space; with ``return_conditions`` also z (B or 2B, num_columns, d)
    (``[cond; uncond]`` rows with CFG).
  """
  return _run(_cached_impl, model, params, labels, rng, num_columns, cfg,
              num_steps, return_conditions)


def sample_uncached(model, params, labels, rng, *, num_columns: int,
                    cfg: float = 1.0, num_steps: int = 100,
                    return_conditions: bool = False):
  """``sample`` without a cache: re-runs the full forward every column
  (official algorithm; quadratic in the width). Same contract and numbers."""
  return _run(_uncached_impl, model, params, labels, rng, num_columns, cfg,
              num_steps, return_conditions)


def latents_to_images(tokenizer, tokenizer_params, latents,
                      latent_scale: float = 0.05493):
  """Generator latents (B, W', C) -> images (B, H, 16 W', 3) in [-1, 1].

  Runs ``tokenizer`` in its own dtype (training grids). Sampling for data
  (``mode=sample``) decodes through ``driver.make_decode_fn`` instead: fp32
  tokenizer (``config.tokenizer.dtype``) and the official "round" uint8
  conversion (``images.to_uint8``)."""
  return tokenizer.apply({"params": tokenizer_params}, latents / latent_scale,
                         method="decode")


def generate(model, params, labels, rng, s):
  """Sampling-driver adapter (``genvis_jax.sample.driver``): ``config.sample``
  fields (cfg, num_steps, num_columns, latent_scale) -> tokenizer latents for
  ``decode`` (generator latents / latent_scale)."""
  lat = sample(model, params, labels, rng, num_columns=int(s.num_columns),
               cfg=float(s.cfg), num_steps=int(s.num_steps))
  return lat / float(s.latent_scale)
