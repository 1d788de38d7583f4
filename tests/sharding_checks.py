"""A batch-sharded sampler keeps each device on its own examples."""

import re

import jax
import jax.numpy as jnp
import numpy as np

_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|collective-permute|"
                         r"reduce-scatter)\b")


def run_batch_sharded(fn, params, labels, key, *scalars):
  """Compiles ``fn`` (a sampler's ``sampler_fn``) for ``labels`` sharded over
  8 devices along "data" and runs it. Asserts that the program exchanges
  nothing between devices (each draws only its own examples, as on a pod)
  and that its outputs are sharded like the batch; returns them."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  labels = jax.device_put(labels, sharding)
  scalars = [jnp.asarray(v, jnp.float32) for v in scalars]
  compiled = fn.lower(params, labels, key, *scalars).compile()
  found = sorted(set(_COLLECTIVE.findall(compiled.as_text())))
  assert not found, f"the sampler exchanges data between devices: {found}"
  out = compiled(params, labels, key, *scalars)
  for leaf in jax.tree_util.tree_leaves(out):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding
  return out
