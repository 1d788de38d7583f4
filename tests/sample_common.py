"""A stand-in sampler for the sampling driver's tests (no model runs)."""

import numpy as np

from genvis_jax.core import sharding
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.sample import trained_with


class PassThroughDecoder:
  """A ``sampler_lib.Decoder`` stand-in: what the generator drew, unchanged."""
  dispatch = staticmethod(lambda codes: codes)
  to_uint8 = staticmethod(lambda decoded: decoded)


def stand_in_sampler(monkeypatch, num_samples):
  """RAR-B's runlocal config drawing ``num_samples`` in batches of 8 with a
  stand-in sampler (images (4, 6) whose pixels are their labels); the list
  of the batches it draws (their first index)."""
  import jax
  from configs import rar_b
  config = rar_b.get_config("runlocal")
  config.sample.num_samples, config.sample.batch_size = num_samples, 8
  drawn = []

  def dispatch(labels, key):
    drawn.append([b for b in range(0, 64, 8) if np.array_equal(
        jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(
            jax.random.key(config.sample.seed), b)))][0])
    images = jax.numpy.broadcast_to(
        labels.astype(jax.numpy.uint8)[:, None, None, None], (8, 4, 6, 3))
    return lambda: images

  mesh = sharding.data_mesh(jax.devices())
  sampler = sampler_lib.Sampler(None, None)
  sampler.dispatch = dispatch
  monkeypatch.setattr(sampler_lib, "make_sample_fn", lambda *_: (
      sampler, jax.sharding.NamedSharding(mesh,
                                          jax.sharding.PartitionSpec("data"))))
  monkeypatch.setattr(trained_with, "pin_weights", lambda c: c)
  monkeypatch.setattr(trained_with, "pinned_sources", lambda _: {
      "weights.generator": "g", "weights.tokenizer": "t"})
  return config, drawn
