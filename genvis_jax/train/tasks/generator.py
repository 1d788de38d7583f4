"""What the class-conditional generators (RAR, FAR, Equivariant) share: the
sample grids of ``config.train.image_every``.

Every ``image_every`` steps each grid (``GeneratorTask.grid_configs``: by
default one, "samples", with ``config.sample``) draws ``grid_size`` samples
of fixed, evenly spread classes from the current weights with the sampling
driver's adapter for ``config.model.name`` (``genvis_jax/sample/<name>.py``,
its ``generate(model, params, labels, rng, sample_config)``), so a grid draws
as ``mode=sample`` would with those settings (``sample.dtype`` included);
``config.tokenizer`` decodes them. Without its checkpoint the grids are off,
with a warning.
"""

from __future__ import annotations

import functools
from types import ModuleType

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from genvis_jax import models
from genvis_jax.core import sharding as shd
from genvis_jax.models import inference
from genvis_jax.sample import common as sample_common
from genvis_jax.sample import labels as labels_lib
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.train.tasks import Task

GRID = 16   # samples per grid


def grid_labels(num_samples: int, num_classes: int) -> jax.Array:
  """(num_samples,) int32 classes spread evenly over 0..num_classes-1 (one
  grid shows the range of classes, not the first few)."""
  step = max(1, num_classes // num_samples)
  return (jnp.arange(num_samples, dtype=jnp.int32) * step) % num_classes


class GeneratorTask(Task):
  """A ``Task`` whose model draws what ``config.tokenizer`` decodes (token
  maps, or latents for the Equivariant generator). Owns the frozen
  tokenizer, its jitted decode and pixel range, and the sample grids;
  subclasses supply the losses and may add grids (``grid_configs``)."""

  grid_size: int = GRID

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)
    self._tokenizer_params = None
    tok = config.get("tokenizer")
    # Pixel range of the sample grids (and of the images a generator that
    # encodes them reads): the tokenizer model's own.
    if tok is not None and tok.get("model", {}).get("name", ""):
      self.value_range = models.value_range(tok.model, config,
                                            ("data", "tokenizer"))
    # With the grids on (``frozen_params``): refused with the task, before
    # the data or any weights load, not at the first grid.
    if (tok is not None and tok.get("checkpoint")
        and config.train.get("image_every")):
      self.check_grids()

  @functools.cached_property
  def sampler(self) -> ModuleType:
    """The sampler adapter for ``config.model.name`` (chosen as
    ``genvis_jax.sample.sampler`` chooses it)."""
    return sampler_lib.sampler_module(self.config.model.name)

  @functools.cached_property
  def tokenizer(self):
    """The tokenizer module in ``config.tokenizer.dtype`` (default fp32, as
    the sampling driver decodes and pretokenize encodes)."""
    return models.build(inference.data_model_config(self.config.tokenizer))

  def frozen_params(self):
    """``{"tokenizer": params}`` when the grids are on (or the task encodes
    its images with the tokenizer, ``encodes_with_tokenizer``), else {}."""
    tok = self.config.get("tokenizer")
    grids = bool(self.config.train.get("image_every"))
    if not (grids or self.encodes_with_tokenizer):
      return {}
    if tok is None or not tok.get("checkpoint"):
      if grids:
        logging.warning(
            "%s sample grids are OFF: config.tokenizer.checkpoint is empty. "
            "Set it to the tokenizer the generator's data came from to see "
            "samples while training (or config.train.image_every=0 to "
            "silence this).", self.config.model.name.upper())
      return {}
    if self._tokenizer_params is None:
      params = models.load_params(
          tok.model, tok.checkpoint, setting="--config.tokenizer.checkpoint")
      # What the grids' decode (and a step's encode) read, no more.
      self._tokenizer_params = inference.decoder_params(
          self.tokenizer, inference.data_model_config(tok), params,
          encode=self.encodes_with_tokenizer)
    return {"tokenizer": self._tokenizer_params}

  def frozen_axes(self):
    """The tokenizer's (the Equivariant tokenizer's: 0.80 of its 0.97 GiB
    in fp32) split as trained weights are, where the step encodes with it;
    one read by the grids alone stays whole (decoder weights only: FQGAN
    dual 0.16 GiB), as the grids decode with it whole."""
    if self._tokenizer_params is None or not self.encodes_with_tokenizer:
      return {}
    model = self.config.tokenizer.model
    return {"tokenizer": jax.eval_shape(
        lambda k: models.init_params(model, k, boxed=True), jax.random.key(0))}

  @functools.cached_property
  def _decode(self):
    """Jitted ``decode(tokenizer_params, codes)`` -> images (B, H, W, 3) in
    ``value_range``; the params are an argument (not a constant baked
    into the program); one compile per code shape."""
    return jax.jit(lambda p, c: self.tokenizer.apply({"params": p}, c,
                                                     method="decode"))

  def check_grids(self) -> None:
    """Refuses what the grids would not draw as configured, as
    ``mode=sample`` does before any weights load: a generator drawing codes
    its tokenizer cannot decode (``inference.check_codes_fit``) and
    ``config.sample`` settings the sampler refuses or would not apply as
    given: guidance, temperature, filters (``sample.common.check_configured``).
    ``__init__`` calls it when the grids are on (``image_every`` and a
    tokenizer checkpoint).

    Raises:
      inference.CodebookSizeError: codebook_size > the tokenizer's num_codes.
      ConfigError: a sampling setting, naming its value.
    """
    inference.check_codes_fit(self.config)
    sample_common.check_configured(self.sampler, self.config.sample)

  def grid_configs(self, batch) -> tuple[tuple[str, object], ...]:
    """``(name, sample_config)`` of each grid: ``config.sample`` as
    "samples". ``batch``: the visual batch, the same on every process
    (``grids.visual_batch``)."""
    del batch
    return (("samples", self.config.sample),)

  def visualize(self, params, frozen, batch, rng):
    """Each grid of ``grid_configs``: ``grid_size`` samples of evenly spread
    classes (``grid_labels``), decoded: ``{name: uint8 (grid_size, H, W,
    3)}``; {} without the tokenizer. Every grid draws with ``rng`` (the
    same noise per class): the Equivariant wide grid starts from the narrow
    grid's noise, so the two show how one draw continues past the training
    width."""
    if "tokenizer" not in frozen:
      return {}
    labels = grid_labels(self.grid_size, self.model.num_classes)
    weights, labels = placed_as_sampling(params["model"], labels)
    # Decoded as mode=sample decodes: whole weights (a tokenizer split for
    # the step's encode decoded a split grid in 4-6x the temporaries, with
    # activation gathers), no training rules.
    tokenizer = whole_on_mesh(frozen["tokenizer"])
    out = {}
    for name, sample_config in self.grid_configs(batch):
      codes = self.draw(weights, labels, rng, sample_config)
      with nn.logical_axis_rules(()):
        images = self._decode(tokenizer, codes)
      out[name] = self.grid_uint8(images)[:self.grid_size]
    return out

  def draw(self, weights, labels, rng, sample_config):
    """One grid's codes: ``sample_config``'s draw as ``mode=sample`` traces
    it, without the training rules' activation constraints (with them, under
    fsdp, RAR-B's decode loops resharded their activations: 1.75 GiB of
    temporaries per device against 0.34)."""
    with nn.logical_axis_rules(()):
      return self.sampler.generate(self.model, weights, labels, rng,
                                   sample_config)


@functools.lru_cache(maxsize=4)
def _gather(mesh):
  return jax.jit(lambda tree: tree, out_shardings=shd.replicated(mesh))


def placed_as_sampling(weights, labels):
  """A grid's inputs placed as ``mode=sample`` places them, on the mesh and
  rules of the trainer's context (``grids.write_visuals`` draws under it):
  the split weights gathered once (a whole copy on every device) and the
  classes split over the batch axes, repeated to a multiple of the split
  (``visualize`` keeps the first ``grid_size`` images). Trained with
  ``fsdp``, the sampler's decode loops otherwise each gathered the sharded
  weights for themselves, every copy live at once, and every device drew
  the whole grid: RAR-XL at fsdp=8 took 23 GiB of temporaries per device
  (its train step 10). Unchanged outside a mesh context."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return weights, labels
  rows, sharding = grid_placement(len(labels), mesh,
                                  nn.get_logical_axis_rules() or None)
  return _whole(weights, mesh), labels_lib.global_labels(
      np.resize(np.asarray(labels), rows), sharding)


def whole_on_mesh(weights):
  """``weights`` whole on every device of the context's mesh (``_whole``);
  unchanged outside a mesh context."""
  mesh = jax.sharding.get_mesh()
  return weights if mesh.empty else _whole(weights, mesh)


def grid_placement(num_labels: int, mesh, rules):
  """``(rows, sharding)``: a grid's ``num_labels`` classes repeated to a
  multiple of the batch split of ``mesh`` under ``rules``, and the sharding
  that splits them (``placed_as_sampling``; ``bench/plan_memory.py``
  plans the same)."""
  split = shd.num_batch_shards(mesh, rules)
  return -(-num_labels // split) * split, shd.batch_sharding(mesh, rules)


def _whole(weights, mesh):
  """``weights`` with a whole copy of each on every device of ``mesh``: the
  split ones gathered (one program), the others as they are (a data-only
  mesh's: no second copy of the state's weights)."""
  leaves, tree = jax.tree_util.tree_flatten(weights)
  split = [i for i, x in enumerate(leaves)   # host arrays: placed whole
           if not (isinstance(x, jax.Array) and x.sharding.is_fully_replicated)]
  if split:
    for i, x in zip(split, _gather(mesh)([leaves[i] for i in split])):
      leaves[i] = x
  return jax.tree_util.tree_unflatten(tree, leaves)
