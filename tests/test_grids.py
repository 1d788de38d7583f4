"""The generators' training sample grids (``GeneratorTask.visualize``, drawn
by ``grids.write_visuals`` under the trainer's mesh and rules)."""

import jax
import ml_collections
import numpy as np

from configs import rar_b
from genvis_jax.train import trainer as trainer_lib
from genvis_jax.train.tasks import generator as generator_lib


def test_grids_draw_as_sampling_does_on_an_fsdp_mesh(monkeypatch):
  """Trained with fsdp, a grid handed the sampler the fsdp-sharded weights
  and the whole grid on every device: each decode loop gathered the weights
  for itself, every copy live at once (RAR-XL at fsdp=8: 23 GiB of
  temporaries per device, twice its train step's peak). The sampler now
  gets one gathered copy and the classes split over the batch axes, as
  ``mode=sample`` gives them (6 classes repeated to 8), and draws the same
  images."""
  c = rar_b.get_config("runlocal")
  c.mesh.shape = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
  c.train.image_every = 0
  mesh, task = trainer_lib.setup(c)
  grid_size = 6   # not a multiple of the 8 batch shards
  monkeypatch.setattr(task, "grid_size", grid_size)
  tr = trainer_lib.Trainer(c, mesh=mesh, task=task)
  params = tr.init_state().params
  assert any(len(x.sharding.device_set) == 8 and not
             x.sharding.is_fully_replicated
             for x in jax.tree_util.tree_leaves(params["model"]))
  seen = []
  generate = task.sampler.generate

  def spy(model, weights, labels, rng, s):
    seen.append((weights, labels))
    return generate(model, weights, labels, rng, s)
  monkeypatch.setattr(task.sampler, "generate", spy)
  # Codes as images: what was drawn, row by row.
  decoded_with = []

  def decode(tokenizer, codes):
    decoded_with.append(tokenizer)
    return jax.numpy.repeat(codes[:, :, None, None] / c.model.codebook_size,
                            3, -1)
  monkeypatch.setattr(task, "_decode", decode)
  rng = jax.random.key(3)
  # A tokenizer split for a step's encode (the Equivariant generator's) is
  # decoded whole, as mode=sample decodes.
  split_tokenizer = {"kernel": jax.device_put(
      np.arange(32.0).reshape(8, 4), jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("fsdp")))}
  with tr.context():
    grid = task.visualize(params, {"tokenizer": split_tokenizer}, {},
                          rng)["samples"]
  (tokenizer,) = decoded_with
  assert tokenizer["kernel"].sharding.is_fully_replicated
  # Host weights (a notebook's task.frozen_params()) are placed whole too.
  with tr.context():
    host = generator_lib.whole_on_mesh({"w": np.ones(3, np.float32)})["w"]
  assert isinstance(host, jax.Array) and host.sharding.is_fully_replicated
  np.testing.assert_array_equal(tokenizer["kernel"],
                                np.arange(32.0).reshape(8, 4))
  weights, labels = seen.pop()
  assert all(x.sharding.is_fully_replicated
             for x in jax.tree_util.tree_leaves(weights))
  # Weights already whole (norms, biases; every weight of a data-only mesh)
  # are passed as they are, not copied.
  whole = [(a, b) for a, b in zip(jax.tree_util.tree_leaves(weights),
                                  jax.tree_util.tree_leaves(params["model"]))
           if b.sharding.is_fully_replicated]
  assert whole and all(a is b for a, b in whole)
  assert labels.shape == (-(-grid_size // 8) * 8,)
  assert labels.sharding.shard_shape(labels.shape)[0] == labels.shape[0] // 8
  np.testing.assert_array_equal(
      np.asarray(labels)[:grid_size],
      generator_lib.grid_labels(grid_size, c.model.num_classes))
  unplaced = task.visualize(params, {"tokenizer": {}}, {}, rng)["samples"]
  assert grid.shape == unplaced.shape == (grid_size,) + grid.shape[1:]
  np.testing.assert_array_equal(grid, unplaced)
