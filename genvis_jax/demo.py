"""Runs the stages of ``configs/demo.py`` in order (``config.mode == "demo"``)."""

from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from genvis_jax import errors
from genvis_jax.modes import resolve


def _format(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Replaces ``{workdir}`` in every string field, in place."""
  with cfg.unlocked():
    for key, value in cfg.items():
      if isinstance(value, ml_collections.ConfigDict):
        _format(value, workdir)
      elif isinstance(value, str) and "{workdir}" in value:
        cfg[key] = value.replace("{workdir}", workdir)


def run(config, workdir: str) -> dict:
  """Runs every stage (or those named in ``config.only``, comma-separated, in
  the config's order); returns {stage: its result}."""
  os.makedirs(workdir, exist_ok=True)
  order = list(config.stage_order)
  if config.get("only"):
    only = [s.strip() for s in config.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in config.stages]
    if unknown:
      raise errors.ConfigError(f"Unknown demo stage(s) {unknown} in config.only; "
                       f"stages: {order}.")
    order = [s for s in order if s in only]
  results = {}
  for name in order:
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    _format(stage, workdir)
    t0 = time.perf_counter()
    logging.info("=== demo stage %s (mode=%s) ===", name, stage.mode)
    results[name] = resolve(stage.mode)(stage, os.path.join(workdir, name))
    logging.info("=== demo stage %s done in %.1f s ===", name,
                 time.perf_counter() - t0)
    print(f"[demo] stage {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
  return results
