"""``config.mode`` -> the importable function that runs it."""

from __future__ import annotations

from genvis_jax.core import registry

# mode -> "module:function(config, workdir)"
MODES = {
    "train": "genvis_jax.train.trainer:train_and_evaluate",
    "demo": "genvis_jax.demo:run",
    "sample": "genvis_jax.sample.driver:sample_and_save",
    "pretokenize": "genvis_jax.data.pretokenize:pretokenize",
    "evaluate": "genvis_jax.evaluate.driver:run",
}


def resolve(mode: str):
  if mode not in MODES:
    raise ValueError(f"Unknown config.mode {mode!r}; choose one of {sorted(MODES)}.")
  return registry.function(MODES[mode])


def run(config, workdir: str):
  """Runs ``config.mode`` on ``config`` (what ``python -m genvis_jax.main`` does)."""
  return resolve(config.mode)(config, workdir)
