"""The demo chain end to end (every stage, a few steps each) through main's modes."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo
from genvis_jax import modes
from genvis_jax.data import pretokenize


def test_demo_smoke_runs_every_stage(tmp_path):
  wd = str(tmp_path)
  results = modes.run(demo.get_config("smoke"), wd)
  assert list(results) == list(demo.get_config().stage_order)
  # Reconstructions next to originals, with metrics.
  grid = np.asarray(Image.open(os.path.join(wd, "reconstructions", "reconstructions.png")))
  assert grid.ndim == 3 and grid.shape[-1] == 3
  metrics = json.load(open(os.path.join(wd, "reconstructions", "metrics.json")))
  assert metrics["psnr"] > 0 and 0 < metrics["codebook_usage"] <= 1
  assert os.listdir(os.path.join(wd, "tokenizer", "images"))
  assert any("samples" in f for f in os.listdir(os.path.join(wd, "rar", "images")))
  # Tokens -> generator -> ADM-format samples -> score.
  assert results["pretokenize"]["records"] == 10000
  with np.load(os.path.join(wd, "samples", "samples.npz")) as d:
    assert d["arr_0"].shape == (16, 32, 32, 3) and d["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(d["labels"], np.arange(16) % 10)
  assert 0.0 <= results["score"]["conditioning_accuracy"] <= 1.0
  assert results["fid"]["demo_fid"] > 0.0
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
  meta = json.load(open(meta_path))
  meta["commit_timestamp_nsecs"] += 1
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match=r"weights.generator: 'step \d+ committed"):
    modes.run(cfg, wd)


def test_ten_crop_order_and_content():
  x = np.arange(2 * 6 * 6 * 1).reshape(2, 6, 6, 1)
  crops = pretokenize.ten_crop(x, 4)
  assert crops.shape == (2, 10, 4, 4, 1)
  np.testing.assert_array_equal(crops[:, 0], x[:, :4, :4])        # top-left
  np.testing.assert_array_equal(crops[:, 3], x[:, 2:, 2:])        # bottom-right
  np.testing.assert_array_equal(crops[:, 4], x[:, 1:5, 1:5])      # centre
  # torchvision TenCrop: the last five are cut from the flipped image, so the
  # first of them is the mirrored top-right corner.
  np.testing.assert_array_equal(crops[:, 5], x[:, :4, 2:][:, :, ::-1])
  np.testing.assert_array_equal(crops[:, 9], x[:, 1:5, 1:5][:, :, ::-1])

