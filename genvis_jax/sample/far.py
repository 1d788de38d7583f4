"""FAR sampling: raster positions, and within each the k sub-tokens in turn.

``sample`` is one jitted function: the shared KV-cache loop of
``genvis_jax.sample.ar`` (prefill with the class token, then chunks of raster
positions whose backbone cache holds only the filled prefix); per position one
KV-cached backbone step and the k KV-cached head steps, each sub-token sampled
before the next is fed to the head (official ``generate_fq``).
``sample_uncached`` is the reference that reruns the full teacher-forced
forward for every sub-token; with the same key both draw the same codes.
Sub-token i of position t uses the key ``fold_in(fold_in(rng, t), i)``. The
batch may be sharded along a mesh axis: everything is per-example except the
(replicated) parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import errors
from genvis_jax.models.layers.attention import resize_kv_cache
from genvis_jax.sample import ar
from genvis_jax.sample import common


@dataclasses.dataclass(frozen=True)
class Options(ar.Options):
  """``ar.Options`` + the logit filters (``ar.top_k_top_p``; 0 / 1.0 = off)."""
  top_k: int = 0
  top_p: float = 1.0


def pick(logits, rng, t, i, g, temp, use_cfg, top_k, top_p):
  """``ar.draw`` of sub-token i of position t, key ``fold_in(fold_in(rng,
  t), i)``: (B, V) logits, or (2B, V) in ``common.cfg_labels`` order ->
  (B,) int32."""
  key = jax.random.fold_in(jax.random.fold_in(rng, t), i)
  return ar.draw(logits, key, g, temp, use_cfg, top_k, top_p)


def _resize_backbone(cache, kv_len):
  """Fits the backbone caches (``layers_*``) to a chunk; the head cache
  (length k, rewritten at every position) stays."""
  return {name: resize_kv_cache(c, kv_len) if name.startswith("layers_") else c
          for name, c in cache.items()}


def _cached_impl(model, opts, params, labels, rng, g, temp):
  use_cfg = opts.use_cfg
  b, k, n = labels.shape[0], model.num_codebooks, model.seq_len
  params = common.cast_params(params, opts.dtype)
  twice = functools.partial(common.twice, use_cfg=use_cfg)
  labels2 = common.batch_labels(labels, model.null_label, use_cfg)
  draw = functools.partial(pick, rng=rng, g=g, temp=temp, use_cfg=use_cfg,
                           top_k=opts.top_k, top_p=opts.top_p)

  def head(cache, h, t):
    """k head steps for position t -> (cache, codes (B, k))."""
    z, out = None, []
    for i in range(k):
      variables = {"params": params, "cache": cache}
      logits, state = model.apply(variables, h, None if z is None else twice(z),
                                  i, method="head_step", mutable=["cache"])
      cache = state["cache"]
      z = draw(logits, t=t, i=i)
      out.append(z)
    return cache, jnp.stack(out, axis=1)

  def prefill():
    h, state = model.apply({"params": params}, labels2, method="prefill",
                           mutable=["cache"])
    cache, z0 = head(state["cache"], h, 0)   # also creates the head cache
    return cache, jnp.zeros((b, k, n), jnp.int32).at[:, :, 0].set(z0)

  def step(cache, ctx, prev, t):
    del ctx
    h, state = model.apply({"params": params, "cache": cache}, twice(prev),
                           t - 1, method="backbone_step", mutable=["cache"])
    return head(state["cache"], h, t)

  return ar.decode(prefill, step, num_steps=n, pos_offset=1,
                   bucket=opts.bucket, resize=_resize_backbone)


def _uncached_impl(model, opts, params, labels, rng, g, temp):
  use_cfg, top_k, top_p = opts.use_cfg, opts.top_k, opts.top_p
  b, k, n = labels.shape[0], model.num_codebooks, model.seq_len
  twice = functools.partial(common.twice, use_cfg=use_cfg)
  labels2 = common.batch_labels(labels, model.null_label, use_cfg)

  def body(t, codes):
    # Full forward per sub-token; codes not yet sampled are zeros that the
    # causal masks hide from logits[:, i, t].
    for i in range(k):
      logits = model.apply({"params": params}, twice(codes), labels2)[:, i]
      logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
      z = pick(logits, rng, t, i, g, temp, use_cfg, top_k, top_p)
      codes = codes.at[:, i].set(
          jax.lax.dynamic_update_index_in_dim(codes[:, i], z, t, axis=1))
    return codes

  return jax.lax.fori_loop(0, n, body, jnp.zeros((b, k, n), jnp.int32))


def check_filters(top_k, top_p) -> None:
  """Refuses a ``top_k`` that is not an integer >= 0 (1.7 ran as 1, NaN
  failed in ``int()``) or a ``top_p`` outside (0, 1] (``ConfigError``
  naming ``config.sample.top_k`` / ``top_p``)."""
  whole = isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
  if not (whole or (isinstance(top_k, float) and top_k.is_integer())):
    raise errors.ConfigError(
        f"top_k={top_k!r} (config.sample.top_k) must be a whole number of "
        "codes, >= 0 (0 disables it).")
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise errors.ConfigError(
        f"need top_k >= 0 and 0 < top_p <= 1 (config.sample.top_k / "
        f"config.sample.top_p), got top_k={top_k}, top_p={top_p} (0 / 1.0 "
        "disable them).")


def sampler_fn(model, *, cached: bool = True, use_cfg: bool = True,
               top_k: int = 0, top_p: float = 1.0, dtype=None,
               bucket: int | None = None):
  """The jitted ``f(params, labels, rng, g, temperature) -> codes`` that
  ``sample`` / ``sample_uncached`` call (for AOT ``lower().compile()``).
  Raises ``ConfigError`` for top_k < 0 or top_p outside (0, 1]."""
  check_filters(top_k, top_p)
  opts = ar.options(Options, cached=cached, use_cfg=use_cfg, dtype=dtype,
                    bucket=bucket, top_k=int(top_k), top_p=float(top_p))
  return common.compiled(_cached_impl if cached else _uncached_impl, model,
                         opts)


def check_guidance(scale) -> float:
  """``common.check_guidance`` of FAR: a finite scale of at least 1.0 (1.0 =
  no guidance). The official sampler applies CFG only when the scale is > 1,
  so 0 or -1 would draw as 1.0 while the run records them."""
  return common.check_guidance(scale, no_guidance=1.0, minimum=1.0)


def check_arguments(guidance_scale, temperature, top_k, top_p) -> bool:
  """The scalar arguments ``sample`` takes, checked (``ConfigError``);
  returns whether they guide (official: CFG only when the scale is > 1)."""
  common.check_temperature(temperature)
  check_filters(top_k, top_p)
  return check_guidance(guidance_scale) > 1.0


def check_settings(s) -> None:
  """``config.sample`` (what ``generate`` passes) through the checks
  ``sample`` makes, before anything loads (``common.check_configured``)."""
  check_arguments(s.guidance_scale, s.temperature, s.get("top_k", 0),
                  s.get("top_p", 1.0))


def _run(cached, model, params, labels, rng, guidance_scale, temperature, top_k,
         top_p, dtype=None, bucket=None):
  labels = common.check_labels(labels, model.null_label)
  use_cfg = check_arguments(guidance_scale, temperature, top_k, top_p)
  fn = sampler_fn(model, cached=cached, use_cfg=use_cfg, top_k=top_k,
                  top_p=top_p, dtype=dtype, bucket=bucket)
  return common.call(fn, params, labels, rng, guidance_scale, temperature)


def sample(model, params, labels, rng, *, guidance_scale: float = 2.0,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           dtype=None, bucket: int | None = None):
  """Class-conditional FAR sampling with KV caches (backbone and head).

  Args:
    model: a ``genvis_jax.models.far.FAR`` module.
    params: its parameter pytree (replicated or sharded).
    labels: int (B,) classes 0..num_classes-1, or num_classes (the null
      class) for unconditional samples (may be sharded along the batch).
    rng: PRNG key.
    guidance_scale: CFG scale applied to every sub-token, >= 1; CFG (a
      doubled batch with the null class) only when > 1, as in the official
      sampler (``check_guidance``).
    temperature: divides the guided logits before filtering.
    top_k, top_p: optional filters (0 / 1.0 = off).
    dtype: None or '' computes in ``model.dtype`` with the parameters as
      given; 'float32' in fp32 (the reference codes); 'bfloat16' casts the
      parameters once and runs matmuls and the KV caches in bf16, logits and
      sampling in fp32 (for accelerators).
    bucket: kv_len granularity of the backbone decode chunks (default
      ``ar.DEFAULT_BUCKET``; 0 = one chunk over the full cache).
  Returns:
    int32 (B, k, grid**2) codes, sub-token maps in the tokenizer's order,
    each raster order (reshape to (B, k, grid, grid) for ``decode``).
  Raises:
    ConfigError: labels not 1-D or out of range (``common.check_labels``),
      a guidance_scale below 1 or not finite, a temperature that is not a
      finite number > 0, top_k < 0, top_p outside (0, 1], or a dtype other
      than float32 / bfloat16.
  """
  return _run(True, model, params, labels, rng, guidance_scale,
              temperature, top_k, top_p, dtype, bucket)


def sample_uncached(model, params, labels, rng, *, guidance_scale: float = 2.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Same contract as ``sample``, recomputing the whole forward for every
  sub-token (reference for tests and the KV-cache benchmark)."""
  return _run(False, model, params, labels, rng, guidance_scale,
              temperature, top_k, top_p)


def to_code_maps(codes, grid: int) -> tuple:
  """(B, k, grid**2) -> k (B, grid, grid) maps: the FQ tokenizer's ``decode``
  input (a tuple in the decoder's concatenation order)."""
  b, k, _ = codes.shape
  return tuple(codes[:, i].reshape(b, grid, grid) for i in range(k))


def generate(model, params, labels, rng, s):
  """Sampler adapter (``genvis_jax.sample.sampler``): ``config.sample``
  fields -> tokenizer code maps, a tuple of k int32 (B, grid, grid)
  (``to_code_maps``). Raises what ``sample`` raises."""
  codes = sample(model, params, labels, rng, guidance_scale=s.guidance_scale,
                 temperature=s.temperature, top_k=s.get("top_k", 0),
                 top_p=s.get("top_p", 1.0), dtype=common.config_dtype(s))
  return to_code_maps(codes, model.grid)
