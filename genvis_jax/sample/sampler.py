"""The sampler objects of ``mode=sample`` and of notebooks: a generator's
weights and its tokenizer's decoder, loaded once, as a callable.

``make_sample_fn(config, mesh)`` -> ``(Sampler, batch_sharding)``: the
generator of ``config.model`` at ``config.init_from`` and the tokenizer's
decoder (``make_decode_fn``, at ``config.tokenizer.checkpoint``); a call
``sampler(labels, rng)`` draws one batch of uint8 images, and
``sampler.with_options(...)`` draws with other ``config.sample`` settings on
the same weights. The sampling run that writes them to files is
``genvis_jax.sample.driver``.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import dtypes
from genvis_jax.core import pixels
from genvis_jax.core import registry
from genvis_jax.core import sharding
from genvis_jax.models import inference
from genvis_jax.sample import common
from genvis_jax.sample import images as images_lib


def sampler_module(name: str):
  """``genvis_jax/sample/<config.model.name>.py``: its ``generate(model,
  params, labels, rng, sample_config)`` returns codes in the tokenizer's
  ``decode`` format; its optional ``RUN_KEYS`` maps sampling settings to the
  run settings they must equal (``trained_with.check_trained_with``), its
  optional ``check_settings(sample_config)`` refuses the settings its ``generate``
  would refuse (or not apply as given) before anything loads. See
  ``genvis_jax.core.registry``."""
  return registry.module("genvis_jax.sample", name, ("generate",),
                         setting="config.model.name (the generator)")


def host_uint8(images: jax.Array, value_range, method: str) -> jax.Array:
  """Float images (sharded over the batch) -> uint8 with the same sharding.

  Each addressable shard is converted in numpy (``pixels.to_uint8``, the
  official bytes) and put back on its device, so multi-host callers gather a
  global uint8 array as before."""
  shards = [jax.device_put(pixels.to_uint8(np.asarray(s.data), value_range,
                                           method), s.device)
            for s in images.addressable_shards]
  return jax.make_array_from_single_device_arrays(images.shape, images.sharding,
                                                  shards)


class NonFiniteSamplesError(errors.UserError, FloatingPointError):
  """A sampled batch holds NaN / Inf: nothing of it is written."""


class Decoder:
  """A tokenizer's decode for sampling: ``dispatch(codes)`` -> (float32
  images (B, H, W, 3), whether the batch is finite) on the devices
  (asynchronous), ``to_uint8(decoded)`` -> uint8 images with the same
  sharding (the official conversion, on the host; waits for them); calling
  it does both.

  A batch with a NaN / Inf image, or a code a token sampler drew from NaN
  logits (-1, ``genvis_jax.sample.ar.draw``), raises
  ``NonFiniteSamplesError`` in ``to_uint8``: NaN converts to black pixels
  and NaN logits to code 0, so a damaged or diverged checkpoint would
  otherwise give 50,000 plausible files and an FID. The flag is one
  replicated scalar: every process of a job reads the same value and raises
  together."""

  def __init__(self, decode_float, params, value_range, method: str):
    self._decode_float, self._params = decode_float, params
    self._value_range, self._method = value_range, method

  def dispatch(self, codes) -> tuple[jax.Array, jax.Array]:
    return self._decode_float(self._params, codes)

  def to_uint8(self, decoded: tuple[jax.Array, jax.Array]) -> jax.Array:
    images, finite = decoded
    if not bool(finite):
      raise NonFiniteSamplesError(
          "A sampled batch holds NaN or Inf (in the generator's logits or the "
          "decoded images): the weights are damaged or diverged "
          "(config.init_from, config.tokenizer.checkpoint), or the sampling "
          "dtype overflows (config.sample.dtype, config.tokenizer.dtype; "
          "float32 is the default).")
    return host_uint8(images, self._value_range, self._method)

  def __call__(self, codes) -> jax.Array:
    return self.to_uint8(self.dispatch(codes))


def make_decode_fn(tok, mesh) -> Decoder:
  """``config.tokenizer`` -> a ``Decoder`` (``f(codes) -> uint8 (B, H, W,
  3)``, a jax array sharded like the decoded images): decode in
  ``inference.data_model_config`` (fp32 by default), then the official uint8
  conversion (``uint8_method``). It holds the weights decode reads
  (``inference.decoder_params``), replicated over ``mesh``."""
  mesh = sharding.auto_axes(mesh)
  model_cfg = inference.data_model_config(tok)
  method = images_lib.uint8_method(tok)
  tok_model = models.build(model_cfg)
  # Read on the host; only what decode reads goes to the devices.
  tok_params = inference.decoder_params(tok_model, model_cfg, models.load_params(
      model_cfg, tok.checkpoint, setting="--config.tokenizer.checkpoint"))
  if mesh is not None:
    tok_params = sharding.put_replicated(tok_params, mesh)
  value_range = models.value_range(tok.model, {"tokenizer": tok},
                                   ("tokenizer",))
  return Decoder(functools.partial(_decode_float, tok_model), tok_params,
                 value_range, method)


# One program per tokenizer module (static: equal modules share it), so a
# notebook that builds its sampler again (a re-run cell, a draw() per call)
# does not compile the decoder again. The weights are an argument, not a
# closed-over constant: a constant is copied into the lowered program
# (seconds of lowering per 100 MB).
@functools.partial(jax.jit, static_argnums=0)
def _decode_float(tok_model, params, codes):
  images = tok_model.apply({"params": params}, codes, method="decode")
  finite = jnp.all(jnp.isfinite(images))
  # -1: drawn from NaN logits (codes: an array, or FQGAN's one per branch).
  for c in jax.tree_util.tree_leaves(codes):
    if jnp.issubdtype(c.dtype, jnp.integer):
      finite &= jnp.all(c >= 0)
  return images.astype(jnp.float32), finite


# config.sample's settings of a mode=sample run, not of the sampler itself.
RUN_SETTINGS = ("num_samples", "batch_size", "seed", "labels", "classes",
                "allow_model_changes")


class Sampler:
  """``sampler(labels (B,), rng)`` -> uint8 (B, H, W, 3), a jax array
  sharded over the batch. ``sampler.dispatch(labels, rng)`` starts the same
  batch (generate, then decode) and returns at once a ``finish()`` that
  waits for it and gives those images: the driver dispatches the next batch
  before it finishes and writes this one, so the host's uint8 conversion and
  file writes overlap the devices' work. ``sampler.with_options(...)``: the
  same weights with other ``config.sample`` settings."""

  def __init__(self, generate, decode: Decoder, precision=None, options=None,
               check=None):
    """``generate(labels, rng, options)`` -> codes for ``decode``;
    ``options``: the ``config.sample`` it is called with; ``check(options)``
    refuses settings ``generate`` cannot take (``with_options`` calls it);
    ``precision()``: the context both run in (jit traces under it),
    ``dtypes.matmul_precision(config, inference=True)``; default XLA's."""
    self._generate, self._decode = generate, decode
    self._precision = precision or contextlib.nullcontext
    self.options, self._check = options, check or (lambda _: None)

  def dispatch(self, labels, rng):
    with self._precision():
      decoded = self._decode.dispatch(
          self._generate(labels, rng, self.options))
    return functools.partial(self._decode.to_uint8, decoded)

  def __call__(self, labels, rng) -> jax.Array:
    return self.dispatch(labels, rng)()

  def with_options(self, **changes) -> Sampler:
    """This sampler with ``config.sample`` settings changed, on the weights
    and decoder it holds (nothing is read again): e.g.
    ``num_columns=8 * 16`` for Equivariant images 8x the training width,
    ``guidance_scale``, ``temperature``, ``num_steps``. Each new setting of
    a program's static options compiles the generator once.

    Raises:
      KeyError: ``config.sample`` has no such setting (it lists those it has).
      TypeError: a value of another type than the setting's.
      ConfigError: a setting of the sampling run the sampler does not read
        (``RUN_SETTINGS``), or a value the generator refuses (its
        ``check_settings``).
    """
    unread = sorted(set(changes) & set(RUN_SETTINGS))
    if unread:
      raise errors.ConfigError(
          f"{', '.join(unread)}: settings of a mode=sample run (which images "
          "to draw, how many at a time), which a sampler does not read: pass "
          "the labels and the key to its call instead.")
    options = copy.deepcopy(self.options)
    options.lock()   # a misspelt setting raises, as in a config file
    options.update(changes)
    self._check(options)
    return Sampler(self._generate, self._decode, self._precision, options,
                   self._check)


def make_sample_fn(config, mesh):
  """Returns ``(sampler, batch_sharding)``: the ``Sampler`` (``f(labels (B,),
  rng) -> uint8 (B, H, W, 3)``) of ``config`` and the sharding of its
  batches over ``mesh``. Raises ``inference.CodebookSizeError`` before any
  weights load, and what the weight loads raise."""
  inference.check_codes_fit(config)   # before any weights are read
  mesh = sharding.auto_axes(mesh)
  gen_model = models.build(config.model)
  gen_params = models.load_params(
      config.model, config.init_from, mesh, setting="--config.init_from")
  decode = make_decode_fn(config.tokenizer, mesh)
  module = sampler_module(config.model.name)

  # At config.matmul_precision also where a notebook calls it directly.
  sample_fn = Sampler(
      lambda labels, rng, s: module.generate(gen_model, gen_params, labels,
                                             rng, s),
      decode, precision=lambda: dtypes.matmul_precision(config, True),
      options=config.sample,
      check=lambda s: common.check_configured(module, s))
  return sample_fn, sharding.batch_sharding(mesh)
