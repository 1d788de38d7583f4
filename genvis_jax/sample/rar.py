"""RAR sampling: raster-order decoding with classifier-free guidance.

``sample`` runs the whole decode loop as one jitted function: the shared
KV-cache loop of ``genvis_jax.sample.ar`` (prefill, then chunks of one-token
steps whose cache holds only the filled prefix). The adaLN modulation, which
depends only on (class, position), is computed once per chunk for the B
classes (sharded with the batch) and the null class, and each step takes its
rows, so a step reads the attention/MLP weights, the filled cache prefix and
a few table rows.
``sample_uncached`` is the reference that recomputes the full sequence every
step; with the same key both draw the same tokens. The batch may be sharded
along a mesh axis: everything is per-example except the (replicated)
parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax.models.rar import PREFIX
from genvis_jax.sample import ar
from genvis_jax.sample import common

# Largest per-chunk modulation table on one device (bytes, for its share of
# a batch split over devices); above it each step computes the modulation of
# its own position (the same arithmetic, once per condition, but the adaLN
# weights, a third of a block's, are read every step instead of once per
# chunk). The tables pay off where a step is bound by reading weights: small
# per-device batches, and bf16 on accelerators at larger ones.
TABLE_BYTES = 1 << 30


def cfg_scale(step, seq_len: int, guidance_scale, guidance_pow):
  """Power-cosine guidance ``1 + (g-1) * (1 - cos(pi * (t/L)**pow)) / 2``.

  ``t`` is the 0-based step and ``L`` the model's sequence length (official
  ``generate``: ``t / 256``), so a positive ``pow`` starts at 1 (no guidance)
  and ``pow = 0`` gives the constant ``g``. Returns a float32 scalar (or
  ``step``'s shape).
  """
  frac = (jnp.asarray(step, jnp.float32) / seq_len) ** guidance_pow
  return 1.0 + (guidance_scale - 1.0) * (1.0 - jnp.cos(jnp.pi * frac)) / 2.0


def pick(logits, step, rng, seq_len, g, pw, temperature, use_cfg):
  """``ar.draw`` at ``step`` with key ``fold_in(rng, step)`` and the guidance
  scale of ``cfg_scale(step, seq_len, g, pw)`` (``seq_len``: the model's).

  logits (B, V), or (2B, V) in ``common.cfg_labels`` order when
  ``use_cfg``.
  Returns int32 (B,).
  """
  return ar.draw(logits, jax.random.fold_in(rng, step),
                 cfg_scale(step, seq_len, g, pw), temperature, use_cfg)


@dataclasses.dataclass(frozen=True)
class Options(ar.Options):
  """``ar.Options`` + seq_len: tokens to generate (1..model.seq_len), and
  batch_shards: devices the batch is split over (the tables' size limit
  counts one device's rows)."""
  seq_len: int = 0
  batch_shards: int = 1


def table_bytes(model, conditions: int, length: int, dtype=None) -> int:
  """Bytes of the modulation tables of ``conditions`` rows x ``length``
  positions (every block's 6d in ``dtype`` + the head's fp32 2d)."""
  item = jnp.dtype(dtype or model.dtype).itemsize
  d = model.hidden_size
  return conditions * length * (model.depth * 6 * d * item + 2 * d * 4)


def _cached_impl(model, opts, params, labels, rng, g, pw, temp):
  use_cfg, seq_len = opts.use_cfg, opts.seq_len
  b = labels.shape[0]
  params = common.cast_params(params, opts.dtype)
  null = jnp.full((1,), model.null_label, labels.dtype)
  # The schedule runs over the model's length: a shorter run is a prefix.
  draw = functools.partial(pick, rng=rng, seq_len=model.seq_len, g=g, pw=pw,
                           temperature=temp, use_cfg=use_cfg)

  def tables(start, n, classes=labels):
    """Modulation of cache positions start..start+n-1: the B classes' rows
    and, under CFG, the null class's once (None without)."""
    mod = lambda l: model.apply({"params": params}, l, start, n,
                                method="decode_modulation")
    return mod(classes), (mod(null) if use_cfg else None)

  def per_row(own, nul):
    """The modulation of each sequence of the (CFG-doubled) batch."""
    return jax.tree_util.tree_map(common.cfg_rows, own, nul) if use_cfg else own

  def prefill():
    logits, state = model.apply(
        {"params": params},
        common.batch_labels(labels, model.null_label, use_cfg),
        per_row(*tables(0, PREFIX)),
        method="prefill_modulated", mutable=["cache"])
    codes = jnp.zeros((b, 1, seq_len), jnp.int32)
    return state["cache"], codes.at[:, 0, 0].set(draw(logits, 0))

  def chunk_setup(start, stop, codes):
    rows = -(-b // opts.batch_shards)    # this device's classes
    if table_bytes(model, rows + use_cfg, stop - start) > TABLE_BYTES:
      return None
    # Beside the chunk before (ar.decode), not all chunks' at the start.
    return start, tables(start - 1 + PREFIX, stop - start,
                         ar.after(labels, codes))

  def step(cache, ctx, prev, t):
    if ctx is None:                       # modulation of this position only
      own, nul = tables(t - 1 + PREFIX, 1)
    else:                                 # one position of the chunk's tables
      start, chunk = ctx
      own, nul = jax.tree_util.tree_map(
          lambda m: jax.lax.dynamic_slice_in_dim(m, t - start, 1, axis=1), chunk)
    logits, state = model.apply(
        {"params": params, "cache": cache}, common.twice(prev[:, 0], use_cfg),
        per_row(own, nul), t - 1, method="decode_step_modulated",
        mutable=["cache"])
    return state["cache"], draw(logits, t)[:, None]

  codes = ar.decode(prefill, step, num_steps=seq_len, pos_offset=PREFIX,
                    bucket=opts.bucket, chunk_setup=chunk_setup)
  return codes[:, 0]


def _uncached_impl(model, opts, params, labels, rng, g, pw, temp):
  use_cfg, seq_len = opts.use_cfg, opts.seq_len
  b = labels.shape[0]
  labels2 = common.batch_labels(labels, model.null_label, use_cfg)

  def body(t, tokens):
    # Full causal forward; positions > t hold placeholders the mask hides.
    logits = model.apply({"params": params}, common.twice(tokens, use_cfg),
                         labels2)
    logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
    tok = pick(logits, t, rng, model.seq_len, g, pw, temp, use_cfg)
    return jax.lax.dynamic_update_index_in_dim(tokens, tok, t, axis=1)

  tokens = jnp.zeros((b, model.seq_len), jnp.int32)
  return jax.lax.fori_loop(0, seq_len, body, tokens)[:, :seq_len]


def _check_len(model, seq_len):
  seq_len = model.seq_len if seq_len is None else int(seq_len)
  if not 1 <= seq_len <= model.seq_len:
    raise errors.ConfigError(f"seq_len={seq_len} must be in 1..{model.seq_len} "
                             "(config.model.seq_len).")
  return seq_len


def sampler_fn(model, *, cached: bool = True, use_cfg: bool = True,
               seq_len: int | None = None, dtype=None,
               bucket: int | None = None, batch_shards: int = 1):
  """The jitted ``f(params, labels, rng, g, pow, temperature) -> tokens`` that
  ``sample`` / ``sample_uncached`` call (for AOT ``lower().compile()``);
  ``dtype`` and ``bucket`` as in ``sample``; ``batch_shards``: devices the
  labels will be split over (``common.batch_shards(labels)``); all three
  apply to the cached decoder only. Raises ``ConfigError`` for a seq_len
  outside 1..model.seq_len or a dtype ``common.check_dtype`` rejects."""
  extra = {"batch_shards": max(1, int(batch_shards))} if cached else {}
  opts = ar.options(Options, cached=cached, use_cfg=use_cfg, dtype=dtype,
                    bucket=bucket, seq_len=_check_len(model, seq_len), **extra)
  return common.compiled(_cached_impl if cached else _uncached_impl, model,
                         opts)


def check_guidance(scale) -> float:
  """``common.check_guidance`` of RAR: any finite scale (0 = no guidance;
  the official sampler applies every other value, below 1 included)."""
  return common.check_guidance(scale, no_guidance=0.0)


def check_guidance_pow(guidance_pow) -> float:
  """The cosine schedule's power as a float: a finite number >= 0 (a
  negative one is ``0 ** pow`` = inf at step 0: NaN logits). Raises
  ``ConfigError``."""
  if not 0.0 <= common.as_number(guidance_pow,
                                 "config.sample.guidance_pow") < math.inf:
    raise errors.ConfigError(
        f"guidance_pow={guidance_pow} (config.sample.guidance_pow) must be a "
        "finite number >= 0; 0 keeps the scale constant.")
  return float(guidance_pow)


def check_arguments(guidance_scale, guidance_pow, temperature) -> bool:
  """The scalar arguments ``sample`` takes, checked (``ConfigError``);
  returns whether they guide (official: a scale of 0 disables CFG)."""
  common.check_temperature(temperature)
  check_guidance_pow(guidance_pow)
  return check_guidance(guidance_scale) != 0.0


def check_settings(s) -> None:
  """``config.sample`` (what ``generate`` passes) through the checks
  ``sample`` makes, before anything loads (``common.check_configured``)."""
  check_arguments(s.guidance_scale, s.guidance_pow, s.temperature)


def _run(cached, model, params, labels, rng, guidance_scale, guidance_pow,
         temperature, seq_len, dtype=None, bucket=None):
  labels = common.check_labels(labels, model.null_label)
  use_cfg = check_arguments(guidance_scale, guidance_pow, temperature)
  fn = sampler_fn(model, cached=cached, use_cfg=use_cfg, seq_len=seq_len,
                  dtype=dtype, bucket=bucket,
                  batch_shards=common.batch_shards(labels))
  return common.call(fn, params, labels, rng, guidance_scale, guidance_pow,
                     temperature)


def sample(model, params, labels, rng, *, guidance_scale: float,
           guidance_pow: float, temperature: float, seq_len: int | None = None,
           dtype=None, bucket: int | None = None):
  """Class-conditional raster-order sampling with a KV cache.

  Args:
    model: a ``genvis_jax.models.rar.RAR`` module.
    params: its parameter pytree (replicated or sharded).
    labels: int (B,) classes 0..num_classes-1, or num_classes (the null
      class) for unconditional samples (may be sharded along the batch).
    rng: PRNG key; step t uses ``fold_in(rng, t)``.
    guidance_scale: CFG scale g; 0 disables CFG (no doubled batch).
    guidance_pow: power of the cosine schedule (0 = constant g).
    temperature: divides the (guided) logits before full softmax sampling.
    seq_len: tokens to generate (default ``model.seq_len``): the first
      ``seq_len`` tokens of the full run with the same key (the guidance
      schedule runs over ``model.seq_len``).
    dtype: None or '' computes in ``model.dtype`` with the parameters as
      given; 'float32' computes in fp32 (the reference tokens); 'bfloat16'
      casts the parameters once to bf16 and runs matmuls and the KV cache in
      bf16, logits and sampling in fp32 (for accelerators; tokens then differ
      from fp32 in a few positions).
    bucket: kv_len granularity of the decode chunks (default
      ``ar.DEFAULT_BUCKET``; 0 = one chunk over the full cache, fastest compile).
  Returns:
    int32 (B, seq_len) image codes in raster order.
  Raises:
    ConfigError: labels not 1-D or out of range (``common.check_labels``),
      a guidance_scale that is not finite, a guidance_pow that is negative
      or not finite, a temperature that is not a finite number > 0, seq_len
      outside 1..model.seq_len, or a dtype other than float32 / bfloat16.
  """
  return _run(True, model, params, labels, rng, guidance_scale, guidance_pow,
              temperature, seq_len, dtype, bucket)


def sample_uncached(model, params, labels, rng, *, guidance_scale: float,
                    guidance_pow: float, temperature: float,
                    seq_len: int | None = None):
  """Same contract as ``sample`` but recomputes the whole sequence every step
  (reference for tests and the KV-cache benchmark)."""
  return _run(False, model, params, labels, rng, guidance_scale, guidance_pow,
              temperature, seq_len)


def generate(model, params, labels, rng, s):
  """Sampler adapter (``genvis_jax.sample.sampler``): ``config.sample``
  fields -> int32 (B, side, side) token maps (side = sqrt(model.seq_len))
  for the tokenizer's ``decode``. Raises what ``sample`` raises."""
  tokens = sample(model, params, labels, rng, guidance_scale=s.guidance_scale,
                  guidance_pow=s.guidance_pow, temperature=s.temperature,
                  dtype=common.config_dtype(s))
  side = int(round(tokens.shape[1] ** 0.5))
  return tokens.reshape(tokens.shape[0], side, side)
