"""The settings records that guard a resume: one comparison for all of them."""

from genvis_jax.core import settings


def test_differences_flatten_skip_and_name_both_sides():
  old = {"model": {"depth": 12, "dtype": "float32"}, "lr": 1e-4, "gone": 1}
  new = {"model": {"depth": 24, "dtype": "bfloat16"}, "lr": 1e-4, "added": {"a": 2}}
  assert settings.differences(old, new) == [
      "added.a: (absent) -> 2", "gone: 1 -> (absent)", "model.depth: 12 -> 24",
      "model.dtype: 'float32' -> 'bfloat16'"]
  # A prefix skips its subtree, an exact key only itself.
  assert settings.differences(old, new, ignore=("model", "gone", "added.a")) == []
  assert settings.differences(old, new, ignore=("model.dtype", "mod")) == [
      "added.a: (absent) -> 2", "gone: 1 -> (absent)", "model.depth: 12 -> 24"]
  assert settings.differences(None, {"x": 1}, names=("checkpoint", "config")) == [
      "x: checkpoint (absent) vs config 1"]
  # Absent and None are the same setting (a record older than the key).
  assert settings.differences({"x": None}, {}) == []
  assert settings.differences({"a": {"b": 1}}, {"a": {"b": 1}}) == []
  # An empty section vs none still shows as a difference.
  assert settings.differences({"a": {}, "b": 1}, {"b": 1}) == ["a: {} -> (absent)"]
  assert settings.differences({"a": {}, "b": 1}, {"b": 1}, ignore=("a",)) == []


def test_shorten_and_get():
  lines = [str(i) for i in range(7)]
  assert settings.shorten(lines, 5) == "0, 1, 2, 3, 4, ... 2 more"
  assert settings.shorten(lines[:2], 5) == "0, 1"
  tree = {"train": {"ema_decay": 0.9}}
  assert settings.get(tree, "train.ema_decay") == 0.9
  assert settings.get(tree, "train.missing.deeper") is None
  assert settings.flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}


def test_mismatch_messages_lead_with_the_model_and_say_what_is_cut():
  import ml_collections
  import numpy as np
  import pytest
  from genvis_jax.core import checkpoint_fit as fit
  saved = {"model": {"name": "fqgan", **{f"a{i:02d}": i for i in range(25)}}}
  config = ml_collections.ConfigDict({"model": {"name": "far"}})
  with pytest.raises(fit.CheckpointMismatchError) as e:
    fit.check_config_matches(saved, config)
  # Another model: its name alone, not its 25 other differing fields.
  assert str(e.value) == (
      "The workdir holds a checkpoint of model 'fqgan', and this config "
      "trains 'far': a workdir is one job's. Use a fresh --workdir.")
  # The same model: the first 12 differences, then how many more.
  config.model.name = "fqgan"
  with pytest.raises(fit.CheckpointMismatchError,
                     match=r"model\.a11: checkpoint 11 vs config \(absent\)\n  \.\.\. 13 "
                           r"more\nUse a fresh --workdir"):
    fit.check_config_matches(saved, config)
  expected = {f"k{i:02d}": np.zeros((2, 3)) for i in range(25)}
  with pytest.raises(fit.CheckpointMismatchError,
                     match=r"it holds 0 parameters in 0 arrays, the model 150 "
                           r"parameters in 25 arrays\.\n  missing \(25\): "
                           r"k00, .*, k04, \.\.\. 20 more"):
    fit.compare_trees(expected, {}, "A checkpoint")


def test_a_resume_names_a_discriminator_of_another_size():
  """A tokenizer run resumed with another ``disc.ndf`` failed in Orbax's
  restore ("mis-shaped opt_state/disc/..."), blaming the optimizer / EMA
  settings that runlocal derives from the step count."""
  import json
  import pytest
  from configs import demo
  from genvis_jax.core import checkpoint_fit as fit
  config = demo.tokenizer_config()
  saved = json.loads(config.to_json_best_effort())
  fit.check_config_matches(saved, config)
  # Not the discriminator's shape: its optimizer (the divergence advice is
  # to lower its lr and resume), how it computes.
  config.disc.optimizer.lr = config.disc.optimizer.lr / 10
  config.disc.dtype = "bfloat16"
  fit.check_config_matches(saved, config)
  config.disc.ndf = config.disc.ndf // 2
  with pytest.raises(fit.CheckpointMismatchError) as e:
    fit.check_config_matches(saved, config)
  assert str(e.value).splitlines()[1] == (
      f"  disc.ndf: checkpoint {2 * config.disc.ndf} vs config "
      f"{config.disc.ndf}")
  assert "dtype" not in str(e.value)
