"""The bottom layer: what every other layer may use and which uses none of them.

  checkpoint  Orbax checkpoints (training state, parameter-only checkpoints,
              validation, fallback to the newest readable step)
  pytree_io   one Orbax item through its handler: replica-split saves, reads
              onto shardings
  step_walk   the walk over a run's steps every process takes alike (resume,
              loading a run's weights)
  workdir_lock  one training run per workdir
  metrics     clu metric writers, progress, image grids
  sharding    the device mesh and the one logical-axis rules table
  registry    ``resolve()``: config strings -> the module or function they name

Modules here import only jax / flax / orbax / clu / numpy and
``genvis_jax.errors``; ``tests/test_structure.py`` checks it.
"""
