"""Equivariant generator sampling: column by column, rectified flow per column.

For each column ``c`` the transformer gives a conditioning vector z (cond and,
with CFG, uncond from the null class); the flow head integrates
``num_steps`` Euler steps from t = 1 (noise) to t = 0:
``x <- x - v(x, t, z) / num_steps`` at ``t = i / num_steps``, i = N..1.
With CFG both branches share the noise and the state; the velocity is
``u + s_c (c - u)`` with the linear per-column ramp
``s_c = 1 + (guidance_scale - 1) * (c + 1) / num_columns`` (official
``--cfg`` with ``cfg_schedule`` "linear"); ``guidance_scale == 1`` runs no
uncond branch. The doubled batch interleaves each example's cond/uncond
rows (``common.cfg_labels``), so a batch sharded over devices stays sharded:
each device draws its own examples.

``sample`` feeds each finished column into a per-layer rolling KV cache
(``EqGenerator.prefill`` / ``decode_step``): constant memory and time per
column, so the width (``num_columns``) may be many times the training width.
``sample_uncached`` is the official algorithm (re-run the full windowed
forward over the whole sequence for every column); with the same key both give
the same latents. Each is one jitted function. Column ``c`` draws its noise
from ``fold_in(rng, c)``. ``column_stepper`` / ``sample_stepwise`` run the
same column loop in jitted chunks of columns (to time columns far into a wide
image).

Hoisted head modulations: the head's adaLN modulations (about 60% of its
weights) depend on (t, z) only, and the Euler times are fixed, so each column
computes them for all its steps in one matmul (``euler_flow_hoisted``; chunks
of steps when batch x steps is large) and each Euler step reads only the x-path
weights (input_proj, mlp_0/mlp_2 per block, final linear). Same arithmetic as
the per-step head (``euler_flow``) up to float rounding of the larger matmul.

Compiled programs and the decoding dtype are those of every sampler
(``genvis_jax.sample.common``): one jitted program per ``Options`` value
(``common.compiled``); there is no KV-cache decode loop to chunk. With
``dtype="bfloat16"`` the cached sampler casts the parameters once inside its
program and computes in bf16, while velocities, the Euler state x, the CFG
combination and the returned latents stay float32; the uncached reference
runs in the model's configured dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax.errors import ConfigError
from genvis_jax.sample import common

# The sampling settings that must equal the generator run's
# (``trained_with.check_trained_with``): it modelled latents times this scale.
RUN_KEYS = {"sample.latent_scale": "latents.scale"}

# Rows (Euler steps x head batch rows) of one batched adaLN matmul: bounds the
# modulation buffer (rows x (3 depth + 2) x head_width floats; S: 2048 rows =
# 300 MB fp32) while batch 1 with CFG still hoists all 100 steps at once.
HOIST_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class Options(common.Options):
  """``common.Options`` plus the flow sampler's static options, named after
  ``sampler_fn``'s arguments: the image width in columns, Euler steps per
  column, hoisted head modulations, devices the batch is split over (sizes
  the hoisted chunks), whether the conditioning vectors are returned, and
  the columns per ``column_stepper`` chunk (0: the whole loop in one
  program)."""
  num_columns: int = 1
  num_steps: int = 100
  hoist_modulations: bool = True
  batch_shards: int = 1
  return_conditions: bool = False
  chunk: int = 0


def cfg_scale(column, num_columns: int, guidance_scale):
  """Linear CFG ramp ``1 + (guidance_scale - 1) * (column + 1) /
  num_columns`` (float32; 0-based ``column``, so the last column gets the
  full scale)."""
  frac = (jnp.asarray(column, jnp.float32) + 1.0) / num_columns
  return 1.0 + (guidance_scale - 1.0) * frac


def euler_flow(velocity_fn, z, noise, scale, num_steps: int, use_cfg: bool):
  """Integrates the flow head from t = 1 to 0 with Euler steps.

  Args:
    velocity_fn: (x (B', C), t (B',), z (B', d)) -> v (B', C).
    z: (B, d), or (2B, d) with CFG, each example's cond/uncond rows next to
      each other (``common.cfg_labels`` order).
    noise: (B, C) starting point at t = 1.
    scale: CFG scale (traced scalar).
  Returns the sample at t = 0, (B, C) float32.
  """
  def body(i, x):
    t = (num_steps - i).astype(jnp.float32) / num_steps
    xx = common.twice(x, use_cfg)
    v = common.guide(velocity_fn(xx, jnp.full((xx.shape[0],), t), z), scale,
                     use_cfg)
    return x - v / num_steps

  return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def step_times(num_steps: int):
  """(num_steps,) float32 Euler times t_i = (num_steps - i) / num_steps,
  i = 0..num_steps-1 (the values ``euler_flow`` computes in its loop)."""
  return (num_steps - jnp.arange(num_steps, dtype=jnp.int32)).astype(
      jnp.float32) / num_steps


def steps_per_chunk(num_steps: int, rows: int, max_rows: int = HOIST_ROWS):
  """How many steps' modulations one batched matmul computes (``rows``: one
  device's head rows): the fewest chunks of at most ``max_rows // rows``
  steps (>= 1), balanced, so k = ceil(num_steps / chunks); the last chunk
  may be shorter (``over_chunks``), so a prime ``num_steps`` hoists too."""
  cap = max(1, max_rows // max(1, rows))
  chunks = -(-num_steps // cap)
  return -(-num_steps // chunks)


def over_chunks(chunk, times, k: int, x):
  """``x = chunk(t, x)`` over ``times`` (S,) in order, ``t`` its next k
  values ((k,); the last chunk the S % k left, if any): one ``fori_loop``
  over the full chunks, then the shorter one (a second, smaller program)."""
  n, rest = divmod(times.shape[0], k)
  full = times[:n * k].reshape(n, k)
  x = jax.lax.fori_loop(
      0, n, lambda c, x: chunk(jax.lax.dynamic_index_in_dim(
          full, c, keepdims=False), x), x)
  return chunk(times[n * k:], x) if rest else x


def euler_flow_hoisted(model, params, z, noise, scale, num_steps: int,
                       use_cfg: bool, max_rows: int = HOIST_ROWS,
                       batch_shards: int = 1):
  """``euler_flow`` with the head's modulations hoisted out of the steps.

  model / params: an ``EqGenerator`` (its ``head_modulations`` /
  ``head_velocity``); z (R, d) with R = B, or 2B with CFG (``euler_flow``'s
  order); noise (B, C). Per chunk of k steps (``steps_per_chunk`` of one
  device's R / ``batch_shards`` rows; the last chunk may be shorter) one
  matmul gives the modulations of k x R rows; then k Euler steps run the x
  path only.
  Returns (B, C) float32.
  """
  rows = -(-z.shape[0] // max(1, batch_shards))   # inside jit: the global R
  k = steps_per_chunk(num_steps, rows, max_rows)
  apply = functools.partial(model.apply, {"params": params})

  def chunk(t, x):
    mods = apply(t[:, None], z, method="head_modulations")   # each (k, R, .)

    def step(j, x):
      m = tuple(jax.lax.dynamic_index_in_dim(a, j, keepdims=False) for a in mods)
      v = apply(common.twice(x, use_cfg), m, method="head_velocity")
      return x - common.guide(v, scale, use_cfg) / num_steps

    return jax.lax.fori_loop(0, t.shape[0], step, x)

  return over_chunks(chunk, step_times(num_steps), k, noise.astype(jnp.float32))


def _column(model, opts, params, z, rng, col, guidance_scale):
  b = z.shape[0] // (2 if opts.use_cfg else 1)
  noise = jax.random.normal(jax.random.fold_in(rng, col), (b, model.token_dim))
  scale = cfg_scale(col, opts.num_columns, guidance_scale)
  if opts.hoist_modulations:
    return euler_flow_hoisted(model, params, z, noise, scale, opts.num_steps,
                              opts.use_cfg, batch_shards=opts.batch_shards)
  vel = lambda x, t, zz: model.apply({"params": params}, x, t, zz,
                                     method="velocity")
  return euler_flow(vel, z, noise, scale, opts.num_steps, opts.use_cfg)


def _cached_init(model, opts, params, labels):
  """Prefill -> state (z of the next column, cache, latents, conds); conds
  is None unless ``opts.return_conditions``."""
  params = common.cast_params(params, opts.dtype)
  z, cache = model.apply({"params": params},
                         common.batch_labels(labels, model.null_label,
                                             opts.use_cfg),
                         method="prefill")
  latents = jnp.zeros((labels.shape[0], opts.num_columns, model.token_dim),
                      jnp.float32)
  conds = (jnp.zeros((z.shape[0], opts.num_columns, z.shape[-1]), jnp.float32)
           if opts.return_conditions else None)
  return z, cache, latents, conds


def _cached_columns(model, opts, params, state, start, rng, guidance_scale):
  """Columns start .. start + opts.chunk - 1 (start may be traced) -> new
  state."""
  params = common.cast_params(params, opts.dtype)   # once, not per column
  twice = functools.partial(common.twice, use_cfg=opts.use_cfg)

  def body(i, carry):
    col = start + i
    z, cache, latents, conds = carry
    x = _column(model, opts, params, z, rng, col, guidance_scale)
    latents = jax.lax.dynamic_update_index_in_dim(latents, x, col, axis=1)
    if conds is not None:
      conds = jax.lax.dynamic_update_index_in_dim(
          conds, z.astype(conds.dtype), col, axis=1)
    # The next column's condition, after the last column too (unused): a
    # lax.cond skipping it would cost a device-to-host sync per column on
    # GPU (XLA reads a conditional's predicate on the host), more than the
    # one backbone step per image it saves.
    z, cache = model.apply({"params": params}, twice(x), col, cache,
                           method="decode_step")
    return z, cache, latents, conds

  return jax.lax.fori_loop(0, opts.chunk, body, state)


def _cached_impl(model, opts, params, labels, rng, guidance_scale):
  state = _cached_init(model, opts, params, labels)
  whole = dataclasses.replace(opts, chunk=opts.num_columns)
  _, _, latents, conds = _cached_columns(model, whole, params, state, 0, rng,
                                         guidance_scale)
  return latents, conds


def _uncached_impl(model, opts, params, labels, rng, guidance_scale):
  num_columns = opts.num_columns
  labels2 = common.batch_labels(labels, model.null_label, opts.use_cfg)
  twice = functools.partial(common.twice, use_cfg=opts.use_cfg)
  b = labels.shape[0]
  latents = jnp.zeros((b, num_columns, model.token_dim), jnp.float32)
  conds = (jnp.zeros((labels2.shape[0], num_columns, model.hidden_size),
                     jnp.float32) if opts.return_conditions else None)

  def body(col, carry):
    latents, conds = carry
    # Full forward; columns >= col are placeholders the causal window hides.
    z_all = model.apply({"params": params}, twice(latents), labels2,
                        method="condition")
    z = jax.lax.dynamic_index_in_dim(z_all, col, axis=1, keepdims=False)
    x = _column(model, opts, params, z, rng, col, guidance_scale)
    latents = jax.lax.dynamic_update_index_in_dim(latents, x, col, axis=1)
    if conds is not None:
      conds = jax.lax.dynamic_update_index_in_dim(
          conds, z.astype(conds.dtype), col, axis=1)
    return latents, conds

  return jax.lax.fori_loop(0, num_columns, body, (latents, conds))


def check_guidance(scale) -> float:
  """``common.check_guidance`` of the Equivariant sampler: any finite scale
  (1.0 = no guidance; the official sampler applies every other value)."""
  return common.check_guidance(scale, no_guidance=1.0)


def check_settings(s) -> None:
  """``config.sample`` (what the driver passes) through the checks
  ``sample`` makes, before anything loads (``common.check_configured``). A
  guidance scale below 1.0 is warned about: the ramp (``cfg_scale``) then
  guides away from the class, to the unconditional draw at 0 (where RAR's
  0.0 means no guidance)."""
  _check_counts(s.num_columns, s.num_steps, "config.sample.")
  if check_guidance(s.guidance_scale) < 1.0:
    logging.warning(
        "config.sample.guidance_scale=%s is below 1.0: the Equivariant "
        "sampler ramps the scale from about 1 to it across the columns, "
        "guiding away from the class (0 draws the last column "
        "unconditionally). 1.0 means no guidance.", s.guidance_scale)


def _check_counts(num_columns, num_steps, prefix: str = "") -> None:
  for name, value in (("num_columns", num_columns), ("num_steps", num_steps)):
    try:
      whole = operator.index(value)   # ints and numpy ints, not 2.7 -> 2
    except TypeError:
      raise ConfigError(f"{prefix}{name}={value!r} must be a whole number."
                        ) from None
    if whole < 1:
      raise ConfigError(f"{prefix}{name}={value} must be at least 1.")


def _check(model, labels, num_columns, num_steps, guidance_scale):
  _check_counts(num_columns, num_steps)
  labels = common.check_labels(labels, model.null_label)
  return labels, check_guidance(guidance_scale) != 1.0


def _options(*, cached, use_cfg, num_columns, num_steps, hoist_modulations,
             batch_shards, return_conditions=False, dtype=None, chunk=0):
  return common.options(Options, cached=cached, use_cfg=use_cfg, dtype=dtype,
                        num_columns=int(num_columns), num_steps=int(num_steps),
                        hoist_modulations=bool(hoist_modulations),
                        batch_shards=max(1, int(batch_shards)),
                        return_conditions=bool(return_conditions),
                        chunk=int(chunk))


def sampler_fn(model, *, num_columns: int, use_cfg: bool = True,
               num_steps: int = 100, cached: bool = True,
               hoist_modulations: bool = True, batch_shards: int = 1,
               return_conditions: bool = False, dtype=None):
  """The jitted ``f(params, labels, rng, guidance_scale) -> (latents,
  conds)`` that ``sample`` (``cached``) / ``sample_uncached`` call (for AOT
  ``lower().compile()``; pass guidance_scale as a float32 array, as
  ``common.call`` does: a Python float compiles a second program).
  ``batch_shards``: devices the labels will be split over
  (``common.batch_shards(labels)``; sizes the hoisted modulation chunks); conds
  is None unless ``return_conditions`` (no buffer is kept then); ``dtype``
  as in ``sample`` (cached only). Raises ``ConfigError`` for a dtype
  ``common.check_dtype`` rejects."""
  opts = _options(cached=cached, use_cfg=use_cfg, num_columns=num_columns,
                  num_steps=num_steps, hoist_modulations=hoist_modulations,
                  batch_shards=batch_shards,
                  return_conditions=return_conditions, dtype=dtype)
  return common.compiled(_cached_impl if cached else _uncached_impl, model,
                         opts)


def _run(cached, model, params, labels, rng, num_columns, guidance_scale,
         num_steps, return_conditions, dtype, hoist):
  labels, use_cfg = _check(model, labels, num_columns, num_steps,
                           guidance_scale)
  fn = sampler_fn(model, num_columns=num_columns, use_cfg=use_cfg,
                  num_steps=num_steps, cached=cached, hoist_modulations=hoist,
                  batch_shards=common.batch_shards(labels),
                  return_conditions=return_conditions, dtype=dtype)
  latents, conds = common.call(fn, params, labels, rng, guidance_scale)
  return (latents, conds) if return_conditions else latents


def sample(model, params, labels, rng, *, num_columns: int,
           guidance_scale: float = 1.0,
           num_steps: int = 100, return_conditions: bool = False,
           dtype=None, hoist_modulations: bool = True):
  """Class-conditional column-by-column sampling with the rolling KV cache.

  Args:
    model: an ``EqGenerator``; params: its parameters.
    labels: int (B,) classes (``model.null_label`` = unconditional).
    rng: PRNG key; column c uses ``fold_in(rng, c)``.
    num_columns: image width in tokens (any value, e.g. 8x the training width).
    guidance_scale: guidance scale (1 = none), ramped linearly over the columns.
    num_steps: Euler steps of the flow head per column.
    return_conditions: also return the conditioning vectors fed to the head.
    dtype: None / "" (the model's configured compute dtype), "float32" or
      "bfloat16" (``common.check_dtype``: parameters cast once in the program).
    hoist_modulations: False runs the whole head every step (``euler_flow``,
      the official loop; for comparison only).
  Returns:
    latents (B, num_columns, token_dim) float32 in the generator's (scaled)
    latent space; with ``return_conditions`` also z (B or 2B, num_columns, d)
    (with CFG each example's cond and uncond rows in turn,
    ``common.cfg_labels`` order), float32.
  Raises ``ConfigError`` for num_columns or num_steps < 1, labels not 1-D or
  out of range (``common.check_labels``), a guidance_scale that is not
  finite, or an unsupported dtype.
  """
  return _run(True, model, params, labels, rng, num_columns, guidance_scale,
              num_steps, return_conditions, dtype, hoist_modulations)


def sample_uncached(model, params, labels, rng, *, num_columns: int,
                    guidance_scale: float = 1.0, num_steps: int = 100,
                    return_conditions: bool = False, dtype=None,
                    hoist_modulations: bool = True):
  """``sample`` without a cache: re-runs the full forward every column
  (official algorithm; quadratic in the width). Same contract and numbers,
  except that it runs in the model's configured dtype whatever ``dtype``
  says (the reference, as for RAR / FAR)."""
  return _run(False, model, params, labels, rng, num_columns, guidance_scale,
              num_steps, return_conditions, dtype, hoist_modulations)


def column_stepper(model, params, labels, rng, *, num_columns: int,
                   guidance_scale: float = 1.0, num_steps: int = 100,
                   chunk: int = 1,
                   dtype=None, hoist_modulations: bool = True):
  """The column loop of ``sample`` in jitted chunks of ``chunk`` columns.

  Returns ``(state, advance)``: the state after the prefill and
  ``advance(state, start)`` -> the state after columns start .. start +
  chunk - 1 (pure: a chunk can be re-run from the same state, e.g. to time
  it). ``state`` is ``(z, cache, latents, conds)``: the conditioning vector
  of the next column (B or 2B, d), the per-layer rolling KV cache, the
  latents as ``sample`` returns them (columns not yet run are zero) and
  None (no conditions are kept). Raises ``ConfigError`` if ``chunk`` does not divide
  ``num_columns``, or for the arguments ``sample`` rejects.
  """
  labels, use_cfg = _check(model, labels, num_columns, num_steps,
                           guidance_scale)
  try:
    whole = operator.index(chunk)   # not 1.5 -> 1
  except TypeError:
    whole = 0
  if whole < 1 or int(num_columns) % whole:
    raise ConfigError(f"chunk must be a whole number >= 1 dividing "
                      f"num_columns ({num_columns}); got {chunk!r}.")
  opts = _options(cached=True, use_cfg=use_cfg, num_columns=num_columns,
                  num_steps=num_steps, hoist_modulations=hoist_modulations,
                  batch_shards=common.batch_shards(labels), dtype=dtype,
                  chunk=chunk)
  # Cast here once: each chunk is its own program (the cast inside is then
  # a no-op).
  params = common.cast_params(params, opts.dtype)
  init = common.compiled(_cached_init, model,
                         dataclasses.replace(opts, chunk=0))
  cols = common.compiled(_cached_columns, model, opts)
  guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
  advance = lambda state, start: cols(params, state, jnp.int32(start), rng,
                                      guidance_scale)
  return init(params, labels), advance


def sample_stepwise(model, params, labels, rng, *, num_columns: int,
                    guidance_scale: float = 1.0, num_steps: int = 100,
                    chunk: int = 1,
                    dtype=None, hoist_modulations: bool = True):
  """``sample`` as jitted chunks of ``chunk`` columns (``column_stepper``).

  Returns an iterator yielding ``(next_column, latents)`` after each chunk
  (latents as in ``sample``, columns >= next_column still zero; not blocked,
  so a caller can time each chunk with ``jax.block_until_ready``). The last
  yield equals ``sample(...)`` with the same arguments (same column function
  and keys). Raises at the call what ``column_stepper`` raises.
  """
  state, advance = column_stepper(
      model, params, labels, rng, num_columns=num_columns,
      guidance_scale=guidance_scale,
      num_steps=num_steps, chunk=chunk, dtype=dtype,
      hoist_modulations=hoist_modulations)
  return _chunks(state, advance, int(num_columns), int(chunk))


def _chunks(state, advance, num_columns, chunk):
  for start in range(0, num_columns, chunk):
    state = advance(state, start)
    yield start + chunk, state[2]


def generate(model, params, labels, rng, s):
  """Sampler adapter (``genvis_jax.sample.sampler``): ``config.sample``
  fields (guidance_scale, num_steps, num_columns, latent_scale, dtype) ->
  float32 tokenizer latents (B, num_columns, token_dim) for ``decode``
  (generator latents / latent_scale). Raises what ``sample`` raises."""
  lat = sample(model, params, labels, rng, num_columns=int(s.num_columns),
               guidance_scale=float(s.guidance_scale),
               num_steps=int(s.num_steps),
               dtype=common.config_dtype(s))
  return lat / float(s.latent_scale)
