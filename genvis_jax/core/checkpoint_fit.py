"""Whether a checkpoint fits the config it is loaded into: its parameter
tree (names, shapes) and the model settings saved with it. One
:class:`CheckpointMismatchError` lists every difference and the fix.

It reads no files and imports no Orbax: converted official weights are
checked against the model here too.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from genvis_jax.core import settings as settings_lib
from genvis_jax.errors import UserError


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not fit the model/config it is restored into."""


def key_path(path) -> str:
  """A ``tree_leaves_with_path`` path as ``a/b/kernel`` (the same for a dict,
  a FrozenDict or Orbax's restored tree)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _shape_table(tree) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = key_path(path)
    shape = getattr(leaf, "shape", None)
    out[key] = tuple(shape) if shape is not None else ()
  return out


def _size(table: dict[str, tuple]) -> str:
  """"150.4M parameters in 412 arrays" for a ``_shape_table``."""
  count = sum(int(np.prod(shape)) for shape in table.values())
  n = f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,}"
  return f"{n} parameters in {len(table)} arrays"


def weights_fix(where: str) -> str:
  """``compare_trees``' advice when loading weights named by a setting
  (``where``: " (--config.x)" or ""): a fresh --workdir would not help."""
  setting = where.strip().strip("()")
  return (f"or point {setting or 'it'} at weights of the configured model "
          "(converted or trained with the same model config)")


def compare_trees(expected, found, what: str,
                  fix: str = "or start from a fresh --workdir",
                  advice: str | None = None) -> None:
  """Raises one clear error listing missing, unexpected and mis-shaped keys;
  ``fix`` ends its advice, or ``advice`` replaces it (weights whose fit
  does not hang on a config: LPIPS's two files)."""
  exp, got = _shape_table(expected), _shape_table(found)
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  misshaped = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
  if missing or unexpected or misshaped:
    # The sizes first: another model size or layout shows there at once,
    # where hundreds of key names would bury it.
    lines = [f"{what} does not match the configured model: it holds "
             f"{_size(got)}, the model {_size(exp)}."]
    if missing:
      lines.append(f"  missing ({len(missing)}): " +
                   settings_lib.shorten(missing, 5))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " +
                   settings_lib.shorten(unexpected, 5))
    if misshaped:
      lines.append(f"  mis-shaped ({len(misshaped)}): " + settings_lib.shorten(
          [f"{k} expected {exp[k]} found {got[k]}" for k in misshaped], 5))
    lines.append("  " + (advice or "Check that --config matches the checkpoint "
                         f"(model size, codebook, image size), {fix}."))
    raise CheckpointMismatchError("\n".join(lines))


# How a recorded model section reads with the settings it leaves out at
# their defaults: ``genvis_jax.models.with_defaults``, which that package
# registers when imported (core cannot import it). A record written before
# a config listed a setting then matches a config listing it at its default.
_with_defaults = [lambda section: section]


def register_model_defaults(fn) -> None:
  """Sets how recorded model sections are completed before comparing
  (``genvis_jax.models`` calls it with ``with_defaults``)."""
  _with_defaults[0] = fn


def completed(section):
  """A recorded model section (a dict with ``name``) with the settings it
  leaves out at their defaults (``register_model_defaults``); anything else
  as it is."""
  return _with_defaults[0](section) if isinstance(section, dict) else section


# Keys of the sections holding a model's settings, at any depth of a config:
# config.model, config.disc, config.tokenizer.model, config.stages.X.model.
MODEL_SECTIONS = ("model", "disc")


def completed_config(tree):
  """A recorded config (nested dicts) with every model section
  (``MODEL_SECTIONS``) ``completed``."""
  if not isinstance(tree, dict):
    return tree
  return {k: completed(completed_config(v)) if k in MODEL_SECTIONS
          else completed_config(v) for k, v in tree.items()}


# config.model fields that shape only a run's compute, not its weights or
# what they draw (samplers decode in config.sample.dtype). adaln_table (RAR):
# the same values, computed once; attn_impl (Equivariant): the windowed
# attention's implementations agree to float rounding (tests/
# test_windowed_attention.py), and the cached sampler uses none of them.
COMPUTE_ONLY = ("model.dtype", "model.param_dtype", "model.remat",
                "model.adaln_table", "model.attn_impl")


# How messages name the side a recorded config belongs to, by how the
# weights were made (``core.weights.recorded_config``).
SIDE = {"trained": "run", "converted": "weights"}


def model_settings_note(saved: dict | None, model_config,
                        made: str = "trained") -> str:
  """Names the ``config.model`` fields a run was trained with (``saved``,
  its recorded config; ``made="converted"``: the config a parameter
  checkpoint was converted for) that differ from ``model_config``: why its
  weights do not fit, in the settings' terms (e.g. ``model.num_codebooks``)
  rather than the parameter names. "" where none was recorded or none
  differ."""
  if not saved or not saved.get("model") or model_config is None:
    return ""
  now = json.loads(model_config.to_json_best_effort())
  side = SIDE[made]
  lead = ("The run was trained with" if made == "trained"
          else "They were converted for")
  diffs = settings_lib.differences({"model": completed(saved["model"])},
                                   {"model": completed(now)},
                                   ignore=COMPUTE_ONLY, names=(side, "config"))
  if not diffs:
    return ""
  return (f"\n  {lead} other model settings:\n    " +
          settings_lib.shorten(diffs, 10, "\n    "))


# Settings besides config.model that decide the saved state's tree: the EMA
# copy (ema_decay > 0) and the optimizer's state.
_STATE_SETTINGS = ("optimizer", "train.ema_decay")


def state_settings_note(saved: dict | None, config) -> str:
  """Names the optimizer / EMA settings that differ from the checkpoint's
  config (a state-tree mismatch with the model unchanged comes from them)."""
  if not saved or config is None:
    return ""
  now = json.loads(config.to_json_best_effort())
  diffs = settings_lib.differences(
      {k: settings_lib.get(saved, k) for k in _STATE_SETTINGS},
      {k: settings_lib.get(now, k) for k in _STATE_SETTINGS},
      names=("checkpoint", "config"))
  if not diffs:
    return ""
  return ("\n  The run's config differs from the checkpoint's in optimizer / "
          "EMA settings, which may shape the saved state:\n    " +
          settings_lib.shorten(diffs, 10, "\n    ") +
          "\n  Resume with the checkpoint's values, or start a fresh --workdir "
          "(--config.init_from=DIR keeps the parameters).")


def check_config_matches(saved: dict | None, config) -> None:
  """Refuses to resume a workdir written with a different model config
  (``config.model``, and ``config.disc`` where both have one), naming the
  settings that differ (``model.ndf: checkpoint 16 vs config 8``)."""
  if not saved or "model" not in saved:
    return
  current = json.loads(config.model.to_json_best_effort())
  if saved["model"].get("name") != current.get("name"):
    # Another model altogether: its differing fields say nothing more, and
    # its weights cannot start this one.
    raise CheckpointMismatchError(
        f"The workdir holds a checkpoint of model "
        f"{saved['model'].get('name')!r}, and this config trains "
        f"{current.get('name')!r}: a workdir is one job's. Use a fresh "
        "--workdir.")
  # Every model section both sides have: a discriminator of another size
  # failed in Orbax's restore, blaming the optimizer settings.
  sections = [k for k in MODEL_SECTIONS
              if isinstance(saved.get(k), dict) and k in config]
  old = {k: completed(saved[k]) for k in sections}
  new = {k: completed(json.loads(config[k].to_json_best_effort()))
         for k in sections}
  # Not the model's shape: how it computes, the discriminator's optimizer
  # (a resume with a lower disc lr is the divergence advice), and where a
  # frozen part's weights are read from (a moved file).
  paths = [k for k in {**settings_lib.flatten(old), **settings_lib.flatten(new)}
           if k.rsplit(".", 1)[-1] == "path" or k.endswith("_path")]
  diffs = settings_lib.differences(
      old, new, names=("checkpoint", "config"),
      ignore=tuple(f"{k}.{f}" for k in sections
                   for f in ("dtype", "remat", "optimizer")) + tuple(paths))
  if diffs:
    raise CheckpointMismatchError(
        "The workdir holds a checkpoint of a different model config:\n  " +
        settings_lib.shorten(diffs, 12, "\n  ") +
        "\nUse a fresh --workdir, or load the weights with --config.init_from.")
