"""Sample parts (``genvis_jax.sample.parts``): the settings record a
sampling run resumes by, which changes it refuses, the weights it samples
and their training settings, and joining the parts (no model runs)."""

import json
import os
import re
import shutil
import zipfile

import numpy as np
import pytest

from genvis_jax import models
from genvis_jax.sample import driver
from genvis_jax.sample import parts
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.sample import trained_with


def _settings(**over):
  s = {"init_from": "/runs/rar", "tokenizer.checkpoint": "/runs/tok",
       "sample.num_samples": 100, "sample.guidance_scale": 3.0,
       "weights.generator": "step 480 committed 1",
       "weights.tokenizer": "params committed 2"}
  return {**s, **over}


def _parts_dir(tmp_path, old: dict, name: str = "sample_parts"):
  d = tmp_path / name
  d.mkdir()
  np.savez(d / "000000000.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
  (d / "settings.json").write_text(json.dumps(old))
  return str(d)


def test_resume_follows_the_weights_not_the_paths(tmp_path):
  d = _parts_dir(tmp_path, _settings())
  # Moved folders holding the same weights, and a bigger set: resumed.
  parts.check_settings(d, _settings(init_from="/copy/rar", **{
      "tokenizer.checkpoint": "/copy/tok", "sample.num_samples": 200}))
  with pytest.raises(parts.SampleSettingsError,
                     match=r"weights.generator: 'step 480 committed 1' -> "
                           r"'step 600 committed 3'"):
    parts.check_settings(d, _settings(**{
        "weights.generator": "step 600 committed 3"}))


def test_settings_that_leave_the_images_alone_resume(tmp_path):
  """How the models compute (remat, the attention kernel, the generator's
  dtype while sample.dtype replaces it) and the training grids' width
  decide no image: a resume with other values goes on. The generator's
  dtype decides them where sample.dtype is '' (the model's own)."""
  old = _settings(**{"sample.dtype": "float32", "model.remat": "none",
                     "model.attn_impl": "pallas_tpu", "model.dtype": "bfloat16",
                     "tokenizer.model.remat": "none",
                     "sample.wide_columns": 32})
  d = _parts_dir(tmp_path, old)
  parts.check_settings(d, {**old, "model.remat": "full",
                           "model.attn_impl": "auto", "model.dtype": "float32",
                           "tokenizer.model.remat": "full",
                           "sample.wide_columns": 0})
  own = _parts_dir(tmp_path, {**old, "sample.dtype": ""}, "own_dtype")
  with pytest.raises(parts.SampleSettingsError,
                     match=r"model.dtype: 'bfloat16' -> 'float32'"):
    parts.check_settings(own, {**old, "sample.dtype": "",
                               "model.dtype": "float32"})
  with pytest.raises(parts.SampleSettingsError, match=r"model.window: \(absent\) -> 4"):
    parts.check_settings(d, {**old, "model.window": 4})
  # The weights are loaded in param_dtype: bf16-rounded ones draw others.
  with pytest.raises(parts.SampleSettingsError,
                     match=r"model.param_dtype: 'float32' -> 'bfloat16'"):
    parts.check_settings(_parts_dir(tmp_path, {
        **old, "model.param_dtype": "float32"}, "param_dtype"),
        {**old, "model.param_dtype": "bfloat16"})


def test_parts_recorded_before_every_model_setting_was_listed_go_on(tmp_path):
  """Parts recorded when the config listed only some model settings (and
  recorded dropout rates, which decide no image) go on with a config that
  lists every setting; a setting at another value than its default is
  refused, named."""
  now = parts._model_settings(_settings(**{   # pylint: disable=protected-access
      "model.name": "rar", "model.depth": 2}))   # as sample_settings records
  assert "model.num_timesteps" in now and "model.dropout" not in now
  old = _settings(**{"model.name": "rar", "model.depth": 2,
                     "model.dropout": 0.3})
  parts.check_settings(_parts_dir(tmp_path, old), now)
  with pytest.raises(parts.SampleSettingsError,
                     match=r"model.num_timesteps: 7 -> \d+"):
    parts.check_settings(_parts_dir(tmp_path, {
        **old, "model.num_timesteps": 7}, "other"), now)


def test_a_damaged_settings_record_is_refused_beside_parts(tmp_path):
  """A settings.json cut short cannot vouch for the parts beside it: one
  clear error; with no parts, a fresh start writes it again."""
  d = _parts_dir(tmp_path, _settings())
  path = os.path.join(d, "settings.json")
  with open(path, "r+") as f:
    f.truncate(30)
  with pytest.raises(parts.SampleSettingsError,
                     match=r"settings.json cannot be read .*1 sample parts "
                           r"beside it .*new workdir"):
    parts.check_settings(d, _settings())
  os.remove(os.path.join(d, "000000000.npz"))
  parts.check_settings(d, _settings())
  with open(path) as f:
    assert json.load(f)["init_from"] == "/runs/rar"


def test_parts_from_before_weights_were_recorded_compare_paths(tmp_path):
  old = {k: v for k, v in _settings().items() if not k.startswith("weights.")}
  parts.check_settings(_parts_dir(tmp_path, old), _settings())  # same paths
  with pytest.raises(parts.SampleSettingsError, match="init_from: '/runs/rar'"):
    parts.check_settings(_parts_dir(tmp_path, old, "other"),
                          _settings(init_from="/runs/other"))


def test_parts_from_before_the_seed_was_a_setting_were_drawn_with_seed_0(
    tmp_path):
  d = _parts_dir(tmp_path, _settings())
  parts.check_settings(d, _settings(**{"sample.seed": 0}))
  with pytest.raises(parts.SampleSettingsError, match=r"sample.seed: 0 -> 7"):
    parts.check_settings(d, _settings(**{"sample.seed": 7}))
  # Nor were the label draw and classes: balanced labels of every class.
  parts.check_settings(d, _settings(**{"sample.labels": "balanced",
                                       "sample.classes": []}))
  with pytest.raises(parts.SampleSettingsError,
                     match=r"sample.labels: 'balanced' -> 'uniform'"):
    parts.check_settings(d, _settings(**{"sample.labels": "uniform"}))


def test_pinned_weights_are_recorded_and_shared(tmp_path, monkeypatch):
  """A run's newest step is pinned to its folder, the record names that step
  (not what the run holds later), and the paths pass between processes intact."""
  import ml_collections
  paths = ["/runs/rar/checkpoints/480", "gs://b/tok/ünï", ""]
  from genvis_jax.core import multihost
  assert multihost.broadcast_strings(paths) == paths
  newest = {"/runs/rar": "/runs/rar/checkpoints/480"}
  monkeypatch.setattr(trained_with.weights_lib, "resolve", lambda d: newest.get(d, d))
  monkeypatch.setattr(trained_with.weights_lib, "params_source",
                      lambda d: f"source of {d}" if d else "")
  config = ml_collections.ConfigDict(dict(
      init_from="/runs/rar", tokenizer=dict(checkpoint="/tok")))
  pinned = trained_with.pin_weights(config)
  assert (pinned.init_from, pinned.tokenizer.checkpoint) == (
      "/runs/rar/checkpoints/480", "/tok")
  assert config.init_from == "/runs/rar"          # the user's config is kept
  newest["/runs/rar"] = "/runs/rar/checkpoints/600"  # saved meanwhile
  assert trained_with.pinned_sources(pinned) == {
      "weights.generator": "source of /runs/rar/checkpoints/480",
      "weights.tokenizer": "source of /tok"}


def _sample_config():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  c = base.add_tokenizer(
      base.get_config(),
      ml_collections.ConfigDict({"name": "maskgit_vqgan", "dtype": "float32"}),
      config_file="configs/maskgit_vqgan.py")
  c.model = ml_collections.ConfigDict({"name": "rar"})
  c.sample = ml_collections.ConfigDict({"num_samples": 8})
  return c


def test_tokenizer_config_file_is_not_a_setting(tmp_path):
  """``config.tokenizer.config_file`` is named by messages only: parts drawn
  before configs recorded it, or with another file name, still resume."""
  c = _sample_config()
  now = parts.sample_settings(c)
  del c.tokenizer["config_file"]
  before = parts.sample_settings(c)
  assert now == before
  d = _parts_dir(tmp_path, before)
  parts.check_settings(d, now)
  # The sampler's dtype is recorded as it resolves: fp32 when unset. Parts
  # recorded before it was (drawn in fp32 then) still resume.
  assert now["sample.dtype"] == "float32"
  older = {k: v for k, v in before.items() if k != "sample.dtype"}
  parts.check_settings(_parts_dir(tmp_path, older, "older"), now)
  with c.sample.unlocked():
    c.sample.dtype = "bfloat16"
  with pytest.raises(parts.SampleSettingsError,
                     match=r"sample.dtype: 'float32' -> 'bfloat16'"):
    parts.check_settings(d, parts.sample_settings(c))


def test_the_precision_and_bf16_rounding_are_settings(tmp_path, monkeypatch,
                                                      caplog):
  """Parts drawn at another matmul precision, or by a 16-bit model that
  rounded each op (before bf16 rounded as torch autocast), are other images:
  a resume was not refused (a set mixed both). float32 parts recorded before
  either was recorded resume (they draw the same images)."""
  import logging
  c = _sample_config()
  now = parts.sample_settings(c)
  assert now["precision"] == "tensorfloat32" and "bf16_rounding" not in now
  older = {k: v for k, v in now.items() if k != "precision"}
  parts.check_settings(_parts_dir(tmp_path, older, "fp32"), now)
  c.matmul_precision = "float32"
  with pytest.raises(parts.SampleSettingsError,
                     match=r"precision: 'tensorfloat32' -> 'float32'"):
    parts.check_settings(_parts_dir(tmp_path, now, "tf32"),
                         parts.sample_settings(c))
  c.matmul_precision = ""
  with c.sample.unlocked():
    c.sample.dtype = "bfloat16"
  bf16 = parts.sample_settings(c)
  assert bf16["bf16_rounding"] == "autocast"
  before = {k: v for k, v in bf16.items()
            if k not in ("precision", "bf16_rounding")}
  with pytest.raises(parts.SampleSettingsError,
                     match=r"bf16_rounding: \(absent\) -> 'autocast'; "
                           r"bf16_rounding: this version's 16-bit models "
                           r"round as torch autocast and record it; those "
                           r"outputs record no rounding, so an earlier "
                           r"version may have written them rounding each op"):
    parts.check_settings(_parts_dir(tmp_path, before, "bf16"), bf16)
  parts.check_settings(_parts_dir(tmp_path, bf16, "bf16_now"), bf16)
  # A bf16 tokenizer decode alone records it too.
  with c.sample.unlocked():
    c.sample.dtype = "float32"
  c.tokenizer.dtype = "bfloat16"
  assert parts.sample_settings(c)["bf16_rounding"] == "autocast"
  # On a TPU, parts recorded before the precision was may have been drawn
  # at XLA's default there (one bf16 pass): said.
  monkeypatch.setattr(parts.jax, "default_backend", lambda: "tpu")
  with caplog.at_level(logging.WARNING):
    parts.check_settings(_parts_dir(tmp_path, older, "tpu"), now)
  assert "recorded before their matmul precision was" in caplog.text
  # A config that sets the precision (the Equivariant ones: float32) drew
  # at it before it was recorded too: its parts resume, without a word.
  caplog.clear()
  c.matmul_precision = "float32"
  c.tokenizer.dtype = "float32"
  fp32 = parts.sample_settings(c)
  unrecorded = {k: v for k, v in fp32.items() if k != "precision"}
  with caplog.at_level(logging.WARNING):
    parts.check_settings(_parts_dir(tmp_path, unrecorded, "eq"), fp32)
  assert "matmul precision" not in caplog.text


def test_another_device_count_resumes_with_a_warning(tmp_path, caplog):
  import logging
  d = _parts_dir(tmp_path, _settings(devices=8))
  with caplog.at_level(logging.WARNING):
    parts.check_settings(d, _settings(devices=8))
    assert "devices" not in caplog.text
    parts.check_settings(d, _settings(devices=4))
  assert "drawn on 8 device(s) and this run has 4" in caplog.text
  # Parts from before the count was recorded resume silently.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    parts.check_settings(_parts_dir(tmp_path, _settings(), "old"),
                          _settings(devices=4))
  assert "devices" not in caplog.text


def test_a_batch_the_devices_do_not_divide_says_how_parts_resume():
  """Parts drawn at batch 8, resumed on 16 devices: the message asked for
  another batch size, which the parts then refused."""
  from configs import rar_b   # pylint: disable=import-outside-toplevel
  from genvis_jax.errors import ConfigError   # pylint: disable=import-outside-toplevel
  config = rar_b.get_config("runlocal")
  config.sample.batch_size = 4
  with pytest.raises(ConfigError, match=(
      r"batch_size=4 must be a multiple of the 8 devices; .* resume those of "
      r"batch 4 on a device count that divides it, or draw into a new "
      r"workdir")):
    driver.check_config(config)


def test_assemble_joins_the_parts_or_writes_nothing(tmp_path):
  """``samples.npz`` holds the first ``num_samples`` images of the parts in
  order, written part by part; a gap, too few images or a part that cannot
  be joined (here: images of another size) leave no ``samples.npz`` and no
  temporary file behind."""
  wd = tmp_path / "wd"
  (wd / "sample_parts").mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 4, 6, 3), np.uint8)
  for start in (0, 8, 16):
    np.savez(parts.path(str(wd / "sample_parts"), start),
             images=images[start:start + 8],
             labels=np.arange(start, min(start + 8, 20)) % 3)
  out = parts.assemble(str(wd), 18)
  with np.load(out["npz"]) as d:
    np.testing.assert_array_equal(d["arr_0"], images[:18])
    np.testing.assert_array_equal(d["labels"], np.arange(18) % 3)
  os.remove(out["npz"])
  os.remove(out["png"])
  with pytest.raises(RuntimeError, match="20 of 21 samples present"):
    parts.assemble(str(wd), 21)
  # Which parts a run of 21 draws again: the short last one (4 of the 5 it
  # now needs), so that the set can grow; a smaller set keeps every part.
  d = str(wd / "sample_parts")
  assert parts.complete_parts(d, 21, 8) == {0, 8}
  assert parts.complete_parts(d, 20, 8) == parts.complete_parts(d, 18, 8) == {0, 8, 16}
  np.savez(parts.path(str(wd / "sample_parts"), 16),
           images=np.zeros((4, 5, 6, 3), np.uint8), labels=np.arange(4))
  with pytest.raises(ValueError, match=r"images of shape \(5, 6, 3\), the "
                     r"others \(4, 6, 3\)"):
    parts.assemble(str(wd), 20)
  os.remove(parts.path(str(wd / "sample_parts"), 8))
  with pytest.raises(RuntimeError, match="gap at index 8"):
    parts.assemble(str(wd), 20)
  assert sorted(os.listdir(wd)) == ["sample_parts"]


def test_a_part_with_damaged_images_is_drawn_again(tmp_path):
  """A part whose labels read but whose images do not (a member cut short
  inside an intact zip; a flipped byte the zip's CRC catches) counted as
  drawn, and joining the parts then failed with numpy's bare ``ValueError``
  / ``BadZipFile`` while the advice to run again drew nothing. The header
  check finds the first kind on resume; the second, found only by reading
  every byte, moves the part aside (kept) so the next run draws it."""
  wd = tmp_path / "wd"
  d = wd / "sample_parts"
  d.mkdir(parents=True)
  # 6 kB a part: the header read does not buffer the last image (zipfile
  # reads 4 kB ahead; a flip there would be found on resume).
  images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3),
                                             np.uint8)
  for start in (0, 8):
    np.savez(parts.path(str(d), start), images=images[start:start + 8],
             labels=np.arange(8))
  assert parts.complete_parts(str(d), 16, 8) == {0, 8}
  eight = parts.path(str(d), 8)
  with zipfile.ZipFile(eight, "w") as z:   # the header says 8, 4 are there
    with z.open("images.npy", "w") as f:
      np.lib.format.write_array_header_1_0(
          f, np.lib.format.header_data_from_array_1_0(images[8:16]))
      f.write(images[8:12].tobytes())
    with z.open("labels.npy", "w") as f:
      np.lib.format.write_array(f, np.arange(8))
  with pytest.raises(parts.PartUnreadableError,
                     match=r"images are uint8 \(8, 16, 16, 3\) in \d+ bytes"):
    parts.assemble(str(wd), 16)
  assert parts.complete_parts(str(d), 16, 8) == {0}
  np.savez(eight, images=images[8:16], labels=np.arange(8))
  data = bytearray(open(eight, "rb").read())
  at = data.index(images[15].tobytes())
  data[at] ^= 0xFF
  open(eight, "wb").write(bytes(data))
  assert parts.complete_parts(str(d), 16, 8) == {0, 8}   # header intact
  with pytest.raises(parts.PartUnreadableError,
                     match=r"BadZipFile: Bad CRC-32.*; moved to "
                           r".*000000008.npz.unreadable; run the same sample "
                           r"command: it draws that batch again"):
    parts.assemble(str(wd), 16)
  assert parts.complete_parts(str(d), 16, 8) == {0}
  assert sorted(os.listdir(d)) == ["000000000.npz", "000000008.npz.unreadable"]
  assert sorted(os.listdir(wd)) == ["sample_parts"]


def test_a_run_is_sampled_with_the_model_settings_it_trained_with(tmp_path):
  """A window or latent scale other than the run's loads without an error
  (the weights' shapes are the same) and changes every image: refused,
  naming the setting and the run's value, unless named on purpose. Compute
  settings, dropout rates, keys one side does not record (a model setting
  at its default), and weights with no record pass; converted weights are held to the config they were converted with."""
  import copy
  from configs import eq_l
  config = eq_l.get_config("runlocal")
  run = json.loads(config.to_json_best_effort())
  step = tmp_path / "run" / "checkpoints" / "20"
  (step / "config").mkdir(parents=True)

  def check(init_from=step, **changes):
    c = copy.deepcopy(config)
    with c.unlocked():
      for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
      c.init_from = str(init_from)
    trained_with.check_trained_with(c, c, sampler_lib.sampler_module("eq_generator")
                             .RUN_KEYS)

  (step / "config" / "metadata").write_text(json.dumps(run))
  check(model__dtype="bfloat16", model__remat="full")
  check(model__attn_impl="pallas_gpu")   # trained with another kernel
  check(model__attn_dropout=0.5, model__proj_dropout=0.5)   # training only
  with pytest.raises(trained_with.TrainedWithError,
                     match=r"trained with other settings .*\n  model.window: "
                           r"run 2 vs config 4\n.*allow_model_changes="
                           r"model.window"):
    check(model__window=4)
  check(model__window=4, sample__allow_model_changes="model.window")
  # A setting that changes the shapes gets no such hint: it would not load.
  with pytest.raises(trained_with.TrainedWithError) as e:
    check(model__window=4, model__hidden_size=2 * config.model.hidden_size)
  assert re.search(r"These change the weights' shapes \(they would not "
                   r"load\):\n  model.hidden_size: run \d+ vs config \d+\n"
                   r"These leave the weights' shapes alone.*\n  model.window: "
                   r"run 2 vs config 4\n.*allow_model_changes=model.window\.$",
                   str(e.value), re.S), str(e.value)
  check(model__name="rar")   # another model: the weight loader names both
  with pytest.raises(trained_with.TrainedWithError,
                     match=r"sample.latent_scale: run 0.2 vs config 0.05"):
    check(sample__latent_scale=0.05)
  # A run recorded before its config listed the setting: the class default.
  del run["model"]["window"]
  (step / "config" / "metadata").write_text(json.dumps(run))
  default = models.config_defaults("eq_generator")["window"]
  check(model__window=default)
  with pytest.raises(trained_with.TrainedWithError,
                     match=rf"model.window: run {default} vs config 2"):
    check(model__window=2)
  shutil.rmtree(step / "config")       # no record (an older version)
  check(model__window=4)
  # A parameter checkpoint records the config it was converted with.
  converted = tmp_path / "converted"
  converted.mkdir()
  (converted / "config.json").write_text(
      json.dumps({**run, "model": {**run["model"], "window": 2}}))
  with pytest.raises(trained_with.TrainedWithError,
                     match=r"converted with other settings .*\n  model.window: "
                           r"weights 2 vs config 4"):
    check(model__window=4, init_from=converted)
  (converted / "config.json").unlink()     # converted without --config
  check(model__window=4, init_from=converted)
  # RAR's adaLN table computes the same values once: not a change of images.
  from configs import rar_b
  rar = rar_b.get_config("runlocal")
  (step / "config").mkdir()
  recorded = json.loads(rar.to_json_best_effort())
  recorded["model"]["adaln_table"] = False
  (step / "config" / "metadata").write_text(json.dumps(recorded))
  with rar.unlocked():
    rar.model.adaln_table, rar.init_from = True, str(step)
  trained_with.check_trained_with(rar, rar, {})
