"""The RAR demo chain, trained once (every stage, a few steps each, through
main's modes): what each stage wrote, sampling's resume and refusals, and the
two notebooks (colabs/) run top to bottom over that trained demo."""

import glob
import json
import logging
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from configs import demo
from genvis_jax import modes
from genvis_jax.data import ten_crop
from tests.test_colabs import notebook_images, notebook_text, run_notebook


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
  """(workdir, results) of one smoke demo run. Tests leave the workdir's
  finished stages as they found them."""
  wd = str(tmp_path_factory.mktemp("demo"))
  return wd, modes.run(demo.get_config("smoke"), wd)


def test_demo_smoke_runs_every_stage(trained_demo, capsys):
  wd, results = trained_demo
  assert list(results) == list(demo.get_config().stage_order)
  # Reconstructions next to originals, with metrics.
  grid = np.asarray(Image.open(os.path.join(wd, "reconstructions", "reconstructions.png")))
  assert grid.ndim == 3 and grid.shape[-1] == 3
  metrics = json.load(open(os.path.join(wd, "reconstructions", "metrics.json")))
  assert metrics["psnr"] > 0 and 0 < metrics["codebook_usage"] <= 1
  assert os.listdir(os.path.join(wd, "tokenizer", "images"))
  assert any("samples" in f for f in os.listdir(os.path.join(wd, "rar", "images")))
  # Tokens -> generator -> ADM-format samples -> score.
  # Each centre crop and its mirror image, as RAR's script writes.
  assert results["pretokenize"]["records"] == 2 * demo.SMOKE_TOKEN_IMAGES
  # The token files record their largest label (checked against the model's
  # classes before training): the demo's 10 classes, 0..9.
  from genvis_jax.data import token_origin
  assert token_origin.recorded_num_classes(
      results["pretokenize"]["pattern"]) == 10
  with np.load(os.path.join(wd, "samples", "samples.npz")) as d:
    assert d["arr_0"].shape == (16, 32, 32, 3) and d["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(d["labels"], np.arange(16) % 10)
  assert 0.0 <= results["score"]["conditioning_accuracy"] <= 1.0
  assert results["fid"]["demo_fid"] > 0.0
  # The demo's last line says where its outputs are (a stage run alone too).
  config = demo.get_config("smoke")
  config.only = "score"
  capsys.readouterr()
  modes.run(config, wd)
  last = capsys.readouterr().out.splitlines()[-1]
  assert last.startswith("[demo] done in ") and (
      f"outputs are in {wd}/<stage> (score); logs: tensorboard --logdir {wd}"
      in last), last


def test_sampling_resumes_and_refuses_other_settings_or_weights(trained_demo):
  wd, _ = trained_demo
  # Sampling resumes: drop a finished part, re-run; the same images come back.
  first = np.load(os.path.join(wd, "samples", "samples.npz"))["arr_0"]
  os.remove(os.path.join(wd, "samples", "sample_parts", "000000008.npz"))
  cfg = demo.get_config("smoke")
  cfg.only = "score, samples"          # a subset, run in the demo's order
  assert list(modes.run(cfg, wd)) == ["samples", "score"]
  np.testing.assert_array_equal(
      np.load(os.path.join(wd, "samples", "samples.npz"))["arr_0"], first)
  cfg.only = "samples,sampels"
  with pytest.raises(ValueError, match="sampels"):
    modes.run(cfg, wd)
  # A stage's error names the demo's flags, not the stage config's.
  cfg.only = "samples"
  cfg.stages.samples.sample.num_samples = 0
  with pytest.raises(ValueError, match=r"^config\.stages\.samples\.sample\."
                     r"num_samples=0: "):
    modes.run(cfg, wd)
  cfg.stages.samples.sample.num_samples = 16
  # Resuming with other sampler settings is refused, naming the change.
  cfg.only = "samples"
  cfg.stages.samples.sample.guidance_scale = 5.0
  with pytest.raises(ValueError, match=r"sample.guidance_scale: 3.0 -> 5.0"):
    modes.run(cfg, wd)
  # So is a generator trained further since (its newest step committed anew):
  # the parts are not mixed with images of other weights.
  cfg.stages.samples.sample.guidance_scale = 3.0
  step_dir = max(glob.glob(os.path.join(wd, "rar", "checkpoints", "[0-9]*")),
                 key=lambda p: int(os.path.basename(p)))
  meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  with open(meta_path) as f:
    original = f.read()
  meta = json.loads(original)
  meta["commit_timestamp_nsecs"] += 1
  try:
    with open(meta_path, "w") as f:
      json.dump(meta, f)
    with pytest.raises(ValueError, match=r"weights.generator: 'step \d+ committed"):
      modes.run(cfg, wd)
  finally:
    with open(meta_path, "w") as f:
      f.write(original)


def test_a_stages_warnings_name_the_demos_flags(trained_demo, caplog):
  """A re-run's "Training already finished ... Raise
  --config.train.num_steps" named a flag the demo refuses."""
  wd, _ = trained_demo
  cfg = demo.get_config("smoke")
  cfg.only = "rar"
  with caplog.at_level(logging.WARNING):
    modes.run(cfg, wd)
  finished = [r.getMessage() for r in caplog.records
              if "Training already finished" in r.getMessage()]
  assert len(finished) == 1, caplog.text
  assert "Raise --config.stages.rar.train.num_steps to train" in finished[0]
  # Said once, when the stage runs: not also by the start-up checks of every
  # stage before the first runs (in the stage's own flags).
  warmup = [r.getMessage() for r in caplog.records
            if "warmup_steps=100 is not below" in r.getMessage()]
  assert len(warmup) == 1, caplog.text
  assert "--config.stages.rar.optimizer.warmup_steps=1" in warmup[0]


def test_stage_errors_name_the_demos_flags():
  from genvis_jax import demo as demo_run
  cfg = demo.get_config("smoke")
  # A damaged token file found by the generator's stage: the fix is the
  # pretokenize stage's flag, which the message sends the user to.
  msg = ("re-run --config.mode=pretokenize with "
         "--config.pretokenize.overwrite=True. File: /x/config.json.")
  assert demo_run.as_demo_fields(msg, "rar", cfg) == (
      "re-run --config.only=pretokenize with --config.stages.pretokenize."
      "pretokenize.overwrite=True. File: /x/config.json.")
  # A stage's own fields (the generator's sample grids read its sample
  # section); a mode several stages run, or a field no stage has, stays.
  msg = ("config.sample.batch_size=3 in --config.data.path='p' "
         "(--config.mode=train, see configs/demo.py, config.nope)")
  assert demo_run.as_demo_fields(msg, "rar", cfg) == (
      "config.stages.rar.sample.batch_size=3 in --config.stages.rar.data.path="
      "'p' (--config.mode=train, see configs/demo.py, config.nope)")
  assert demo_run.as_demo_fields("lower config.evaluate.num_reference", "fid",
                                 cfg) == (
      "lower config.stages.fid.evaluate.num_reference")
  # Not another stage's field of that name (the fid stage has no num_images),
  # which the stage's errors say it lacks (fields of sections it has only).
  assert demo_run.as_demo_fields("config.evaluate.num_images", "fid", cfg) == (
      "config.evaluate.num_images")
  assert demo_run.unheld_fields(
      "config.evaluate.num_images, --config.evaluate.batch_size=0, "
      "--config.evaluate.a=1, config.nope, config.sample.x, config.json",
      "fid", cfg) == ["evaluate.a", "evaluate.num_images"]
  # A stage's config, as a notebook edits it, is locked as the config files'
  # (a misspelt key was added silently).
  stage = demo_run.stage_config(cfg, "samples", "/tmp/demo_wd")
  assert stage.init_from == "/tmp/demo_wd/rar"
  with pytest.raises(AttributeError, match="guidance_scael"):
    stage.sample.guidance_scael = 1.0


@pytest.mark.slow
def test_notebooks_run_top_to_bottom(trained_demo, monkeypatch):
  """train_demo.ipynb over the trained demo (each stage finds its work done:
  the training itself is the same ``modes.run`` checked above), then
  quickstart.ipynb finds that demo and only samples from it."""
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  wd = pathlib.Path(trained_demo[0])
  monkeypatch.setenv("GENVIS_COLAB_SMOKE", "1")
  monkeypatch.setenv("GENVIS_COLAB_WORKDIR", str(wd))
  for var in ("RAR_CKPT", "TOKENIZER_CKPT"):
    monkeypatch.delenv(var, raising=False)
  tokens = sorted((wd / "pretokenize" / "tokens").glob("*.array_record"))
  mtimes = [t.stat().st_mtime_ns for t in tokens]

  nb = run_notebook("train_demo.ipynb")
  # No cell ends on a trained state (hundreds of KB of printed arrays).
  assert max(len(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
             for c in nb.cells for o in c.get("outputs", [])) < 20_000
  with np.load(wd / "samples" / "samples.npz") as d:
    assert d["arr_0"].shape == (16, 32, 32, 3)
  images = notebook_images(nb)
  # data grid, tokenizer grid, reconstructions, samples
  assert len(images) == 4 and all(i.ndim == 3 and i.shape[-1] in (3, 4) for i in images)
  assert f"{2 * demo.SMOKE_TOKEN_IMAGES} records" in notebook_text(nb)

  nb = run_notebook("quickstart.ipynb")
  # The trained demo was reused: tokens were not rewritten.
  assert [t.stat().st_mtime_ns for t in tokens] == mtimes
  [grid] = notebook_images(nb)
  # 10 classes x 2 samples of 32 px, enlarged 8x, 4 per row -> 5 rows.
  assert grid.shape[0] > grid.shape[1] > 4 * 32 * 8
  text = notebook_text(nb)
  assert "(20, 32, 32, 3) uint8" in text and "0 circle" in text


def test_ten_crop_order_and_content():
  x = np.arange(2 * 6 * 6 * 1).reshape(2, 6, 6, 1)
  crops = ten_crop.ten_crop(x, 4)
  assert crops.shape == (2, 10, 4, 4, 1)
  np.testing.assert_array_equal(crops[:, 0], x[:, :4, :4])        # top-left
  np.testing.assert_array_equal(crops[:, 3], x[:, 2:, 2:])        # bottom-right
  np.testing.assert_array_equal(crops[:, 4], x[:, 1:5, 1:5])      # centre
  # torchvision TenCrop: the last five are cut from the flipped image, so the
  # first of them is the mirrored top-right corner.
  np.testing.assert_array_equal(crops[:, 5], x[:, :4, 2:][:, :, ::-1])
  np.testing.assert_array_equal(crops[:, 9], x[:, 1:5, 1:5][:, :, ::-1])



def test_a_stage_run_alone_names_the_earlier_stages_it_needs(tmp_path):
  """--config.only=rar in a fresh workdir: its token files are missing, and
  the stages that write them were left out; the message says to run them."""
  from genvis_jax import demo as demo_run
  from genvis_jax.data import DataNotFoundError
  cfg = demo.get_config("smoke")
  cfg.only = "rar"
  with pytest.raises(DataNotFoundError,
                     match=r"No pre-tokenized files match .*\nThe demo's "
                           r"earlier stages tokenizer, reconstructions, "
                           r"classifier, pretokenize were left out by "
                           r"--config.only, .* run them first \(--config.only=tokenizer,"
                           r"reconstructions,classifier,pretokenize,rar\)"):
    demo_run.run(cfg, str(tmp_path))


def test_a_stage_model_override_not_repeated_is_refused_before_training(tmp_path):
  """``--config.stages.tokenizer.model.num_codes=128`` alone: the tokenizer
  trained, then the stages reading it failed on its weights. Named up front,
  with every stage that reads the model."""
  from genvis_jax import demo as demo_run
  from genvis_jax.errors import ConfigError
  cfg = demo.get_config("smoke")
  cfg.stages.tokenizer.model.num_codes = 128
  cfg.only = "tokenizer"
  with pytest.raises(ConfigError, match=r"describe one model two ways") as e:
    demo_run.run(cfg, str(tmp_path))
  assert str(e.value).count("--config.stages.tokenizer.model.num_codes=128 but "
                            "--config.stages.") == 4
  assert "--config.stages.rar.tokenizer.model.num_codes=256" in str(e.value)
  assert not os.listdir(tmp_path)    # nothing trained
  # Settings that leave the weights and images alone pass, as sampling has it.
  cfg.stages.tokenizer.model.num_codes = 256
  cfg.stages.samples.model.adaln_table = False
  demo_run.check_stage_models(cfg, ["samples"])
  # So do dropout rates (training only), and what sampling is allowed to
  # change (config.sample.allow_model_changes).
  cfg.stages.rar.model.dropout = 0.3
  cfg.stages.samples.model.num_timesteps = 70
  cfg.stages.samples.sample.allow_model_changes = "model.num_timesteps"
  demo_run.check_stage_models(cfg, ["rar", "samples"])


@pytest.mark.parametrize("config_name,key,value,expected", [
    # Each found by its stage's own start-up checks, after the stages
    # before it had trained (49 s into the FQGAN smoke demo; minutes at
    # full size).
    ("demo_fqgan", "pretokenize.pretokenize.data.image_size", 48,
     r"config.stages.pretokenize.pretokenize.data.image_size=48, but the "
     r"tokenizer .* takes 32x32 images"),
    ("demo", "samples.sample.num_samples", 0,
     r"config.stages.samples.sample.num_samples=0"),
    ("demo", "rar.train.micro_batches", 3, r"micro"),
    ("demo", "reconstructions.evaluate.batch_size", 0,
     r"config.stages.reconstructions.evaluate.batch_size=0 must be a whole"),
    ("demo", "fid.evaluate.batch_size", 0,
     r"config.stages.fid.evaluate.batch_size=0 must be a whole"),
    ("demo", "fid.evaluate.num_reference", -1,
     r"config.stages.fid.evaluate.num_reference=-1 must be >= 0"),
    ("demo", "samples.tokenizer.dtype", "int8",
     r"config.stages.samples.tokenizer.dtype='int8' is not a supported"),
    ("demo_fqgan", "samples.model.codebook_size", 128,
     r"config.stages.samples.model.codebook_size=128 is larger than the "
     r"tokenizer's config.stages.samples.tokenizer.model.num_codes=64"),
    ("demo_eq", "samples_wide.sample.num_steps", 0,
     r"config.stages.samples_wide.sample.num_steps=0 must be at least 1"),
    # Another evaluation kind needs settings the stage's locked config has
    # no key for: the advice to set them cannot be followed in the demo.
    ("demo", "fid.evaluate.kind", "generation",
     r"(?s)config.evaluate.reference and config.evaluate.inception are not "
     r"set.*\nThe demo's fid stage has no evaluate.inception or "
     r"evaluate.reference setting .*its own python -m genvis_jax.main"),
])
def test_a_later_stages_bad_setting_is_refused_before_any_stage_runs(
    tmp_path, config_name, key, value, expected):
  """Every stage's own config checks run before the first stage starts:
  nothing is trained or written for a demo a later stage would refuse."""
  import importlib
  from genvis_jax import demo as demo_run
  from genvis_jax.errors import UserError
  cfg = importlib.import_module(f"configs.{config_name}").get_config("smoke")
  stage, *path = key.split(".")
  node = cfg.stages[stage]
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  if key == "samples.model.codebook_size":   # the generator trained so too
    cfg.stages.far.model.codebook_size = value
  with pytest.raises(UserError, match=expected):
    demo_run.run(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_demo_stages_name_no_next_command(tmp_path, monkeypatch):
  """A mode's last line names its next command as a plain config's flags
  (the demo's are --config.stages.<stage>.*, and it runs the next stage
  itself): inside the demo's stages, none is named."""
  from genvis_jax import demo as demo_run
  from genvis_jax.core import hints
  seen = []
  monkeypatch.setattr(demo_run, "resolve", lambda mode: lambda c, wd: (
      seen.append(hints.next_step("; sample with ...")) or {}))
  config = demo.get_config("smoke")
  config.only = "score"
  modes.run(config, str(tmp_path))
  assert seen == [""]
  assert hints.next_step("; sample with ...") == "; sample with ..."
