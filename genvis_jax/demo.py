"""Runs the stages of ``configs/demo.py`` in order (``config.mode == "demo"``)."""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import re
import time

import ml_collections
from absl import logging

from genvis_jax import errors
from genvis_jax import models
from genvis_jax import modes
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import files
from genvis_jax.core import hints
from genvis_jax.core import settings as settings_lib
from genvis_jax.modes import resolve
from genvis_jax.sample import trained_with


def _format(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Replaces ``{workdir}`` in every string field, in place."""
  with cfg.unlocked():
    for key, value in cfg.items():
      if isinstance(value, ml_collections.ConfigDict):
        _format(value, workdir)
      elif isinstance(value, str) and "{workdir}" in value:
        cfg[key] = value.replace("{workdir}", workdir)


def stage_config(config, name: str, workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config.stages[name]`` with ``{workdir}`` (the demo's
  workdir) filled in: what the stage runs with; locked, as the config files'
  ``get_config()`` (a misspelt key raises)."""
  stage = ml_collections.ConfigDict(config.stages[name].to_dict())
  _format(stage, workdir)
  stage.lock()
  return stage


# A config field named in a message: "--config.a.b" or "config.a.b" (not
# "configs/..." or a longer word ending in "config").
_FIELD = re.compile(r"(?<![\w.])(--)?config\.((?:\w+\.)*\w+)(=\w+)?")


def _has(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
  for part in dotted.split("."):
    if not isinstance(cfg, ml_collections.ConfigDict) or part not in cfg:
      return False
    cfg = cfg[part]
  return True


def as_demo_fields(message: str, stage: str, config) -> str:
  """``message`` of an error raised in demo stage ``stage`` with the fields it
  names as the demo's flags: ``config.x.y`` -> ``config.stages.S.x.y``,
  ``--config.mode=M`` -> ``--config.only=S`` for the one stage S of mode M.

  S is the stage the message last sent the user to, if it holds ``x.y``
  (``re-run --config.mode=pretokenize with --config.pretokenize.overwrite=
  True`` names the pretokenize stage's flag), else ``stage``. Names the stage
  does not hold (``config.json``) stay as they are.
  """
  target = [stage]

  def field(m: re.Match) -> str:
    dashes, key, value = m.group(1) or "", m.group(2), m.group(3) or ""
    if key == "mode" and value:
      owners = [s for s in config.stage_order
                if config.stages[s].mode == value[1:]]
      if len(owners) != 1:
        return m[0]
      target.insert(0, owners[0])
      return f"{dashes}config.only={owners[0]}"
    owner = next((s for s in target if _has(config.stages[s], key)), None)
    return m[0] if owner is None else (
        f"{dashes}config.stages.{owner}.{key}{value}")
  return _FIELD.sub(field, message)


def unheld_fields(message: str, stage: str, config) -> list[str]:
  """The settings ``message`` names (``config.x.y``) that demo stage
  ``stage`` lacks though it has section ``x``: an evaluation kind's own
  settings after ``--config.stages.fid.evaluate.kind=generation``. A demo
  stage's config is locked, so no flag can add them."""
  keys = {m.group(2) for m in _FIELD.finditer(message)}
  held = config.stages[stage]
  return sorted(k for k in keys if "." in k and not _has(held, k)
                and _has(held, k.split(".", 1)[0]))


# A stage's settings that name another stage's output ("{workdir}/<stage>"),
# and the section of its config that describes that output's model.
READS = (("tokenizer.checkpoint", "tokenizer.model"), ("init_from", "model"),
         ("evaluate.checkpoint", "model"),
         ("evaluate.classifier_checkpoint", "model"))
# Model settings that leave the weights and what they draw as they are (a
# stage decodes in fp32), as the samplers' own check has them.
_SAME_WEIGHTS = tuple(k.split(".", 1)[1] for k in fit.COMPUTE_ONLY)


def check_stage_models(config, stages) -> None:
  """Refuses, before any stage runs, a stage of ``stages`` (or one reading
  it) whose config describes another stage's model otherwise than that
  stage trains it: an override of one stage's model (e.g.
  ``--config.stages.tokenizer.model.num_codes=128``) not repeated where the
  others read it stopped the demo after the first stage had trained.

  Raises:
    ConfigError: naming each differing setting on both sides.
  """
  found = []
  plain = {name: json.loads(config.stages[name].to_json_best_effort())
           for name in config.stage_order}
  for reader in config.stage_order:
    cfg = plain[reader]
    # Named on purpose where the reading stage samples (as sampling does).
    allowed = trained_with.allowed_changes(cfg)
    for ref, section in READS:
      path = settings_lib.get(cfg, ref)
      if not (isinstance(path, str) and path.startswith("{workdir}/")):
        continue
      writer = path[len("{workdir}/"):].split("/")[0]
      if writer not in plain or not {reader, writer} & set(stages):
        continue
      model = plain[writer].get("model")
      read = settings_lib.get(cfg, section)
      if model is None or read is None:
        continue
      a, b = settings_lib.flatten(model), settings_lib.flatten(read)
      found += [
          f"--config.stages.{writer}.model.{k}={a.get(k)!r} but "
          f"--config.stages.{reader}.{section}.{k}={b.get(k)!r}"
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in _SAME_WEIGHTS
          and f"{section}.{k}" not in allowed
          and not models.is_dropout(f"model.{k}")]
  if found:
    raise errors.ConfigError(
        "The demo's stages describe one model two ways, so a stage would "
        "fail on the weights another writes (after that one trained): give "
        "each setting the same value in both stages.\n  " + "\n  ".join(found))


@contextlib.contextmanager
def _demo_flags_in_logs(stage: str, config):
  """A stage's log lines name the demo's flags, as its errors do
  (``as_demo_fields``): "Raise --config.train.num_steps" failed as given."""

  class Rewrite(std_logging.Filter):

    def filter(self, record):
      text = record.getMessage()
      demo_text = as_demo_fields(text, stage, config)
      if demo_text != text:
        record.msg, record.args = demo_text, None
      return True

  rewrite, logger = Rewrite(), logging.get_absl_logger()
  logger.addFilter(rewrite)
  try:
    yield
  finally:
    logger.removeFilter(rewrite)


@contextlib.contextmanager
def _log_errors_only():
  """absl's warnings and info held back (said again when the stage runs)."""
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@contextlib.contextmanager
def _demo_errors(name: str, config, order):
  """A ``UserError`` raised in stage ``name`` names the demo's flags
  (``as_demo_fields``), and the stages ``config.only`` left out where it is
  a missing file one of them writes."""
  try:
    yield
  except errors.UserError as e:
    # The stage's advice names its own config's flags; say the demo's.
    if e.args and isinstance(e.args[0], str):
      msg = as_demo_fields(e.args[0], name, config)
      unheld = unheld_fields(e.args[0], name, config)
      if unheld:
        msg += (f"\nThe demo's {name} stage has no "
                f"{' or '.join(unheld)} setting (a demo stage takes only the "
                "settings its config lists): run this step as its own python "
                "-m genvis_jax.main --config.mode=... job, as the README "
                "gives each mode's command.")
      skipped = [s for s in config.stage_order[:config.stage_order.index(name)]
                 if s not in order]
      if skipped and isinstance(e, FileNotFoundError):
        # Most likely what an earlier stage, left out by config.only, writes.
        msg += (f"\nThe demo's earlier stages {', '.join(skipped)} were left "
                "out by --config.only, and they write what this stage "
                "reads: run them first (--config.only="
                f"{','.join(skipped + [name])}) in the same --workdir, or "
                "leave --config.only out.")
      e.args = (msg, *e.args[1:])
    raise


def run(config, workdir: str) -> dict:
  """Runs every stage (or those named in ``config.only``, comma-separated, in
  the config's order); returns {stage: its result}. Every stage's names and
  start-up checks (``modes.check_config``) run before the first stage, so a
  later stage's bad setting costs no training. Raises ``ConfigError`` for a
  remote (``gs://``) workdir: the stages pre-tokenize into it, which writes
  local files only."""
  if files.is_remote(workdir):   # before any stage, not at the 4th
    raise errors.ConfigError(
        f"The demo runs on one machine and pre-tokenizes into its workdir, "
        f"which must be local: --workdir={workdir} is remote. Use a local "
        "folder (copy it to the bucket afterwards if you like).")
  os.makedirs(workdir, exist_ok=True)
  order = list(config.stage_order)
  if config.get("only"):
    only = [s.strip() for s in config.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in config.stages]
    if unknown:
      raise errors.ConfigError(f"Unknown demo stage(s) {unknown} in config.only; "
                       f"stages: {order}.")
    order = [s for s in order if s in only]
  check_stage_models(config, order)
  for name in order:   # each stage's own start-up checks, before any runs
    # Their warnings are said when the stage runs, in the demo's flags.
    with _demo_errors(name, config, order), _log_errors_only():
      stage = stage_config(config, name, workdir)
      modes.check_names(stage)
      modes.check_config(stage, os.path.join(workdir, name))
  results, start = {}, time.perf_counter()
  for name in order:
    stage = stage_config(config, name, workdir)
    t0 = time.perf_counter()
    logging.info("=== demo stage %s (mode=%s) ===", name, stage.mode)
    with _demo_errors(name, config, order):
      # A stage's last line names no next command: the demo runs it (and
      # its flags are the demo's, --config.stages.<stage>.*).
      with hints.quiet(), _demo_flags_in_logs(name, config):
        results[name] = resolve(stage.mode)(stage, os.path.join(workdir, name))
    logging.info("=== demo stage %s done in %.1f s ===", name,
                 time.perf_counter() - t0)
    print(f"[demo] stage {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
  print(f"[demo] done in {time.perf_counter() - start:.0f} s: each stage's "
        f"outputs are in {os.path.join(workdir, '<stage>')} ({', '.join(order)}); "
        f"logs: tensorboard --logdir {workdir}", flush=True)
  return results
