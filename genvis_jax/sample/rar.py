"""RAR sampling: raster-order decoding with classifier-free guidance.

``sample`` runs the whole decode loop as one jitted function (prefill + a
``fori_loop`` of KV-cached single-token steps). ``sample_uncached`` is the
reference that recomputes the full sequence every step; with the same key both
draw the same tokens. The batch may be sharded along a mesh axis: everything is
per-example except the (replicated) parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cfg_scale(step, seq_len: int, guidance_scale, guidance_pow):
  """Power-cosine guidance ``1 + (g-1) * (1 - cos(pi * (t/L)**pow)) / 2``.

  ``t`` is the 0-based step (official ``generate``), so a positive ``pow``
  starts at 1 (no guidance) and ``pow = 0`` gives the constant ``g``.
  """
  frac = (jnp.asarray(step, jnp.float32) / seq_len) ** guidance_pow
  return 1.0 + (guidance_scale - 1.0) * (1.0 - jnp.cos(jnp.pi * frac)) / 2.0


def pick(logits, step, rng, seq_len, g, pw, temperature, use_cfg):
  """Guided, tempered categorical draw at ``step`` with key ``fold_in(rng, step)``.

  logits (B, V), or (2B, V) in ``cfg_labels`` order when ``use_cfg``.
  Returns int32 (B,).
  """
  logits = logits.astype(jnp.float32)
  if use_cfg:
    pairs = logits.reshape(-1, 2, logits.shape[-1])
    cond, uncond = pairs[:, 0], pairs[:, 1]
    logits = uncond + (cond - uncond) * cfg_scale(step, seq_len, g, pw)
  key = jax.random.fold_in(rng, step)
  return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def cfg_labels(labels, null_label: int):
  """(B,) -> (2B,) ``[l0, null, l1, null, ...]``: each example's cond/uncond
  rows sit next to each other, so a batch-sharded array needs no resharding."""
  null = jnp.full_like(labels, null_label)
  return jnp.stack([labels, null], axis=1).reshape(-1)


def _twice(x):
  return jnp.repeat(x, 2, axis=0)


def _cached_impl(model, use_cfg, seq_len, params, labels, rng, g, pw, temp):
  b = labels.shape[0]
  labels2 = cfg_labels(labels, model.num_classes) if use_cfg else labels
  twice = _twice if use_cfg else (lambda t: t)
  logits, state = model.apply({"params": params}, labels2, method="prefill",
                              mutable=["cache"])
  tokens = jnp.zeros((b, seq_len), jnp.int32)
  tokens = tokens.at[:, 0].set(
      pick(logits, 0, rng, seq_len, g, pw, temp, use_cfg))

  def body(t, carry):
    cache, tokens = carry
    prev = jax.lax.dynamic_index_in_dim(tokens, t - 1, axis=1, keepdims=False)
    logits, state = model.apply({"params": params, "cache": cache}, twice(prev),
                                labels2, t - 1, method="decode_step",
                                mutable=["cache"])
    tok = pick(logits, t, rng, seq_len, g, pw, temp, use_cfg)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, t, axis=1)
    return state["cache"], tokens

  _, tokens = jax.lax.fori_loop(1, seq_len, body, (state["cache"], tokens))
  return tokens


def _uncached_impl(model, use_cfg, seq_len, params, labels, rng, g, pw, temp):
  b = labels.shape[0]
  labels2 = cfg_labels(labels, model.num_classes) if use_cfg else labels
  twice = _twice if use_cfg else (lambda t: t)

  def body(t, tokens):
    # Full causal forward; positions > t hold placeholders the mask hides.
    logits = model.apply({"params": params}, twice(tokens), labels2)
    logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
    tok = pick(logits, t, rng, seq_len, g, pw, temp, use_cfg)
    return jax.lax.dynamic_update_index_in_dim(tokens, tok, t, axis=1)

  tokens = jnp.zeros((b, model.seq_len), jnp.int32)
  return jax.lax.fori_loop(0, seq_len, body, tokens)[:, :seq_len]


@functools.lru_cache(maxsize=32)
def _compiled(impl, model, use_cfg: bool, seq_len: int):
  # Cached: training-time sample grids call this repeatedly (one compile).
  return jax.jit(functools.partial(impl, model, use_cfg, seq_len))


def _check_len(model, seq_len):
  seq_len = model.seq_len if seq_len is None else int(seq_len)
  if not 1 <= seq_len <= model.seq_len:
    raise ValueError(f"seq_len={seq_len} must be in 1..{model.seq_len} "
                     "(config.model.seq_len).")
  return seq_len


def sampler_fn(model, *, cached: bool = True, use_cfg: bool = True,
               seq_len: int | None = None):
  """The jitted ``f(params, labels, rng, g, pow, temperature) -> tokens`` that
  ``sample`` / ``sample_uncached`` call (for AOT ``lower().compile()``)."""
  impl = _cached_impl if cached else _uncached_impl
  return _compiled(impl, model, bool(use_cfg), _check_len(model, seq_len))


def _run(impl, model, params, labels, rng, guidance_scale, guidance_pow,
         temperature, seq_len):
  seq_len = _check_len(model, seq_len)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a 1-D class array, got shape {labels.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  use_cfg = float(guidance_scale) != 0.0  # official: g == 0 disables CFG
  fn = _compiled(impl, model, use_cfg, seq_len)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return fn(params, jnp.asarray(labels, jnp.int32), rng, f32(guidance_scale),
            f32(guidance_pow), f32(temperature))


def sample(model, params, labels, rng, *, guidance_scale: float,
           guidance_pow: float, temperature: float, seq_len: int | None = None):
  """Class-conditional raster-order sampling with a KV cache.

  Args:
    model: a ``genvis_jax.models.rar.RAR`` module.
    params: its parameter pytree (replicated or sharded).
    labels: int (B,) classes 0..num_classes-1 (may be sharded along the batch).
    rng: PRNG key; step t uses ``fold_in(rng, t)``.
    guidance_scale: CFG scale g; 0 disables CFG (no doubled batch).
    guidance_pow: power of the cosine schedule (0 = constant g).
    temperature: divides the (guided) logits before full softmax sampling.
    seq_len: tokens to generate (default ``model.seq_len``).
  Returns:
    int32 (B, seq_len) image codes in raster order.
  """
  return _run(_cached_impl, model, params, labels, rng, guidance_scale,
              guidance_pow, temperature, seq_len)


def sample_uncached(model, params, labels, rng, *, guidance_scale: float,
                    guidance_pow: float, temperature: float,
                    seq_len: int | None = None):
  """Same contract as ``sample`` but recomputes the whole sequence every step
  (reference for tests and the KV-cache benchmark)."""
  return _run(_uncached_impl, model, params, labels, rng, guidance_scale,
              guidance_pow, temperature, seq_len)
