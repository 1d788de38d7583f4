"""What every class-conditional sampler shares (RAR, FAR, Equivariant).

* classifier-free guidance as a doubled batch: ``cfg_rows`` / ``cfg_labels``
  interleave each example's cond/null rows (a batch-sharded array stays
  sharded), ``twice`` feeds both rows the same input, ``guide`` mixes them;
* the decoding dtype (``config.sample.dtype``): ``config_dtype``,
  ``check_dtype``, ``cast_params``, ``decoding_model``, ``for_decoding``;
* one compiled program per static ``Options`` value (``options``,
  ``compiled``, ``call``);
* the per-call checks (``check_labels``, ``check_temperature``,
  ``check_guidance``; ``check_configured`` runs a sampler's
  ``check_settings`` on ``config.sample``) and the batch's device split
  (``batch_shards``).

The KV-cache decode loop of the token samplers is ``genvis_jax.sample.ar``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import errors
from genvis_jax.core import dtypes
from genvis_jax.core import sharding


def cfg_rows(own, null):
  """Per-example values (B, ...) and the null class's ((1, ...) or (B, ...))
  -> the rows of the CFG batch, (2B, ...) ``[own_0, null_0, own_1, null_1,
  ...]``.

  Each example's cond/uncond rows sit next to each other and the null row is
  broadcast, not gathered: a batch-sharded ``own`` stays sharded, so no
  device computes or holds another device's examples.
  """
  null = jnp.broadcast_to(null, own.shape).astype(own.dtype)
  return jnp.stack([own, null], 1).reshape((-1,) + own.shape[1:])


def cfg_labels(labels, null_label: int):
  """int (B,) -> (2B,) ``[l0, null, l1, null, ...]`` in the labels' dtype
  (``cfg_rows`` of the labels)."""
  return cfg_rows(labels, jnp.full((1,), null_label, labels.dtype))


def batch_labels(labels, null_label: int, use_cfg: bool):
  """The labels of the decoded batch: (2B,) ``cfg_labels`` under CFG, else
  the (B,) labels."""
  return cfg_labels(labels, null_label) if use_cfg else labels


def twice(x, use_cfg: bool):
  """(B, ...) -> (2B, ...) with each row repeated (cond, null) under CFG."""
  return jnp.repeat(x, 2, axis=0) if use_cfg else x


def guide(logits, scale, use_cfg: bool):
  """fp32 (B, V) guided logits ``u + (c - u) * scale`` from (2B, V) rows in
  ``cfg_labels`` order; without CFG just the fp32 logits."""
  logits = logits.astype(jnp.float32)
  if not use_cfg:
    return logits
  pairs = logits.reshape(-1, 2, logits.shape[-1])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return uncond + (cond - uncond) * scale


def cast_params(params, dtype):
  """Floating leaves cast to ``dtype`` (once, before the loop reads them
  every step); None / float32 returns params unchanged."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return params
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      params)


# config.sample.dtype when unset: inference that produces data runs in fp32.
DEFAULT_DTYPE = "float32"


def config_dtype(sample_config) -> str:
  """``config.sample.dtype`` as every sampler resolves it (``DEFAULT_DTYPE``
  when unset; "" keeps the model's compute dtype)."""
  return sample_config.get("dtype", DEFAULT_DTYPE)


def check_dtype(dtype):
  """None or '' (the model's configured compute dtype, parameters as given),
  'float32' or 'bfloat16' (or jnp dtypes) -> a jnp dtype or None. Raises
  ``ConfigError`` naming config.sample.dtype for another dtype."""
  return dtypes.parse(
      dtype, "config.sample.dtype", ("float32", "bfloat16"),
      " ('float32': parity with the official code; 'bfloat16': weights, "
      "matmuls and caches in bf16; norms' outputs, logits, velocities and "
      "the sampling state float32)")


def decoding_model(model, dtype=None):
  """The module a cached sampler runs: no remat (nothing is differentiated)
  and, when ``dtype`` (a ``check_dtype`` result) is set, that compute dtype;
  ``model`` itself when it is already so."""
  fields = {"remat": "none", **({} if dtype is None else {"dtype": dtype})}
  if all(getattr(model, k) == v for k, v in fields.items()):
    return model
  return model.clone(**fields)


def for_decoding(model, params, dtype):
  """(model, params) as a cached sampler with ``dtype`` (``check_dtype``)
  runs them, for code that drives a model step by step (benchmarks): the
  ``decoding_model`` and the floating parameters cast once (``cast_params``;
  bf16 halves the bytes each step reads). None / '' keeps the configured
  compute dtype. Samplers keep logits, velocities and the sampling state in
  float32. Raises ``ConfigError`` for another dtype."""
  dt = check_dtype(dtype)
  return decoding_model(model, dt), cast_params(params, dt)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static sampler options (hashable: one compiled program per value).

  cached: the fast (cached) sampler, else the full-recompute reference;
  use_cfg: a doubled batch with the null class; dtype: ``check_dtype``
  result (cached only; None for the reference). A sampler subclasses it for
  its own static options.
  """
  cached: bool
  use_cfg: bool
  dtype: Any = None


def options(cls=Options, *, cached: bool, use_cfg: bool, dtype=None,
            **fields):
  """``cls`` with checked, normalized fields: dtype applies to the cached
  sampler only, so every reference call shares one compiled program. Raises
  ``ConfigError`` for a dtype ``check_dtype`` rejects."""
  dtype = check_dtype(dtype)   # refused on the reference path too
  if not cached:
    return cls(cached=False, use_cfg=bool(use_cfg), **fields)
  return cls(cached=True, use_cfg=bool(use_cfg), dtype=dtype, **fields)


def compiled(impl, model, opts: Options):
  """``jit(impl(model, opts, *args))``, cached: training-time sample grids call
  a sampler repeatedly with one compile. The cached sampler runs the model
  without remat and, when ``opts.dtype`` is set, in that compute dtype.

  The program's scalars (guidance, temperature, ...) are best passed as
  float32 arrays (``call`` does): a Python float is weakly typed and compiles
  a second program."""
  if (opts.dtype is not None and jnp.dtype(opts.dtype) == jnp.float32
      and jnp.dtype(model.dtype) == jnp.float32):
    # "float32" on a float32 model: the same program as None, compiled once.
    opts = dataclasses.replace(opts, dtype=None)
  return _compiled(impl, model, opts)


@functools.lru_cache(maxsize=64)   # RAR, FAR and Equivariant programs
def _compiled(impl, model, opts: Options):
  if opts.cached:
    model = decoding_model(model, opts.dtype)
  return jax.jit(functools.partial(impl, model, opts))


compiled.cache_clear = _compiled.cache_clear   # e.g. tests counting compiles


def call(fn, params, labels, rng, *scalars):
  """Calls a ``compiled`` sampler with traced fp32 scalars (guidance,
  temperature, ...), so changing them does not recompile; returns what the
  sampler returns."""
  return fn(params, labels, rng, *(jnp.asarray(v, jnp.float32) for v in scalars))


def _concrete_values(x) -> list[np.ndarray] | None:
  """The values of ``x`` this process holds (each addressable shard of a
  jax array), or None for a tracer (not known until the program runs)."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array):
    return [np.asarray(s.data) for s in x.addressable_shards]
  return [np.asarray(x)]


def check_image_size(config) -> None:
  """Raises ``ConfigError`` when ``config.data.image_size`` of a generator
  trained on images (the Equivariant one encodes them) is not the size the
  tokenizer decodes: sampling draws at the tokenizer's size and reads no
  ``data.*`` setting, so a 64 px request drew 32 px images without a word.
  (Token data carries no image size: its ``data.image_size`` is unread.)"""
  tok = (config.get("tokenizer") or {}).get("model") or {}
  key = next((k for k in ("image_size", "resolution") if tok.get(k)), None)
  data = config.get("data") or {}
  asked = data.get("image_size") if data.get("source") != "tokens" else None
  if key and asked and asked != tok[key]:
    width = (" (the width: config.sample.num_columns)"
             if "num_columns" in config.sample else "")
    raise errors.ConfigError(
        f"config.data.image_size={asked}, but the tokenizer decodes "
        f"{tok[key]} px images (config.tokenizer.model.{key}): samples are "
        f"drawn at the size the models were trained at{width}. Leave "
        f"config.data.image_size at {tok[key]}.")


def check_labels(labels, null_label: int):
  """int (B,) class labels -> int32 (B,) (a jax array keeps its sharding, on
  Auto axes: ``_on_auto_axes``).

  Valid labels are the classes 0..null_label - 1 and ``null_label`` itself
  (the null class: unconditional samples). Out of range, a label would read
  past the class table (NaN, or an image-code embedding for a negative
  one) and give garbage images without an error, so concrete labels are
  checked (one small read per call; traced ones are not). Raises
  ``ConfigError`` (a ``ValueError``) for labels that are not integers, not
  1-D or out of range.
  """
  dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    # A cast would truncate 1.7 to class 1 without a word.
    raise errors.ConfigError(f"labels must be integer classes, got {dtype}.")
  values = _concrete_values(labels)
  labels = _on_auto_axes(jnp.asarray(labels, jnp.int32))
  if labels.ndim != 1:
    raise errors.ConfigError(
        f"labels must be a 1-D class array, got shape {labels.shape}.")
  bad = (np.unique(np.concatenate([v.ravel() for v in values]))
         if values else np.zeros((0,), np.int64))
  bad = bad[(bad < 0) | (bad > null_label)]
  if bad.size:
    raise errors.ConfigError(
        f"labels {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are not "
        f"classes of this model: use 0..{null_label - 1} "
        f"(config.model.num_classes={null_label}), or {null_label} (the null "
        "class) for unconditional samples.")
  return labels


def _on_auto_axes(labels):
  """Labels sharded on a mesh with Explicit axes (``jax.make_mesh``'s
  default) moved to the same mesh with Auto axes (``sharding.auto_axes``):
  the samplers' shardings are chosen for GSPMD, and the class-table gather
  failed in tracing ("Use ``.at[...].get(out_sharding=)``")."""
  s = getattr(labels, "sharding", None)
  if not isinstance(s, jax.sharding.NamedSharding) or isinstance(
      labels, jax.core.Tracer):
    return labels
  mesh = sharding.auto_axes(s.mesh)
  if mesh is s.mesh:
    return labels
  return jax.device_put(labels, jax.sharding.NamedSharding(mesh, s.spec))


def as_number(value, setting: str) -> float:
  """``float(value)``, or ``ConfigError`` naming ``setting`` where it is no
  number (None, a string: a bare TypeError / ValueError before)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    raise errors.ConfigError(
        f"{setting}={value!r} must be a number.") from None


def check_temperature(temperature) -> float:
  """A token sampler's temperature as a float: a finite number > 0 (NaN
  would draw from NaN logits: noise, no error). Raises ``ConfigError``."""
  if not 0.0 < as_number(temperature, "config.sample.temperature") < math.inf:
    raise errors.ConfigError(
        f"temperature must be a finite number > 0, got {temperature} "
        "(config.sample.temperature; 1.0 = the model's distribution).")
  return float(temperature)


def check_guidance(scale, *, no_guidance: float,
                   minimum: float | None = None) -> float:
  """A sampler's guidance scale (``config.sample.guidance_scale``) as a
  float, refused where the draw would not be what the setting records.

  Args:
    scale: the classifier-free guidance scale, a concrete number.
    no_guidance: the sampler's scale for "no guidance", which the message
      names (RAR 0.0, FAR and Equivariant 1.0).
    minimum: the smallest scale the sampler applies as given, or None for
      any finite scale. FAR's official sampler guides only above 1.0, so
      a lower scale would draw exactly as 1.0 does.
  Returns:
    ``float(scale)``.
  Raises:
    ConfigError: NaN or infinite (every guided logit or velocity would be
      NaN: noise images, no error), or below ``minimum``.
  """
  value = as_number(scale, "config.sample.guidance_scale")
  if math.isfinite(value) and (minimum is None or value >= minimum):
    return value
  want = "a finite number" if minimum is None else f"at least {minimum}"
  raise errors.ConfigError(
      f"guidance_scale={value} (config.sample.guidance_scale) must be {want}; "
      f"{no_guidance} means no guidance.")


def check_configured(sampler, sample_config) -> None:
  """``config.sample`` through the ``check_settings(sample_config)`` of
  ``sampler`` (a ``genvis_jax.sample.<name>`` module), if it has one: the
  checks its Python API makes on the values the driver passes (guidance,
  temperature, filters), run by ``mode=sample`` and the training grids
  before any weights load. Raises what that check raises (ConfigError)."""
  check = getattr(sampler, "check_settings", None)
  if check is not None:
    check(sample_config)


def batch_shards(x) -> int:
  """How many ways the leading (batch) axis of ``x`` is split across devices:
  1 for host arrays, single-device arrays and tracers (their sharding is not
  known until the program is compiled)."""
  try:
    rows = x.sharding.shard_shape(x.shape)[0]
  except AttributeError:
    return 1
  return max(1, x.shape[0] // max(rows, 1))
