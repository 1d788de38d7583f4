"""The bottom layer: what every other layer may use and which uses none of them.

Checkpoints and weights:
  checkpoint        training checkpoints (Orbax): state + Grain iterator
                    state + config, async saves, the newest readable step
  checkpoint_files  what a committed step holds on disk; the cheap checks run
                    before Orbax reads it
  checkpoint_fit    whether a checkpoint fits the config it is loaded into
  pytree_io         one Orbax item through its handler: replica-split saves,
                    reads onto shardings
  step_walk         the walk over a run's steps every process takes alike
  weights           parameter-only loading (``init_from``, tokenizers,
                    teachers) from any of the folders below
  param_checkpoint  ``DIR/params``: weights alone, with their digest and the
                    config they were converted for
  run_weights       one step's (EMA) weights out of a training run
Runs:
  multihost         decisions process 0 makes for every process
  interrupts        Ctrl-C noted from the entry point's first line
  preemption        stopping cleanly on a signal or a request
  workdir_lock      one run per workdir
  profiling         a window of steps traced with ``jax.profiler``
  overlap           work i + 1 sent to the devices before work i is read
                    back (``ahead``, ``InFlight``)
  settings          the flat JSON records that guard a resume
  files             whole-file writes and reads, local or ``gs://``
  metrics           clu metric writers, progress, image grids
  pixels            pixel ranges (bytes, [0, 1], [-1, 1]) and the official
                    float -> uint8 conversions
  sharding          the device mesh and the one logical-axis rules table
  registry          ``resolve()``: config strings -> the module or function

Modules here import only jax / flax / orbax / clu / etils / numpy and
``genvis_jax.errors``; ``tests/test_structure.py`` checks it.
"""
