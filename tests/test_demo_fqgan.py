"""The FQGAN / FAR demo chain end to end (a few steps per stage)."""

import os

import numpy as np
import pytest

from genvis_jax import modes


@pytest.mark.slow
def test_fqgan_demo_smoke(tmp_path):
  from configs import demo, demo_fqgan  # pylint: disable=import-outside-toplevel
  results = modes.run(demo_fqgan.get_config("smoke"), str(tmp_path))
  rec = results["reconstructions"]
  # Usage is reported per sub-codebook (vis, sem).
  assert 0 < rec["codebook_usage_0"] <= 1 and 0 < rec["codebook_usage_1"] <= 1
  # Each centre crop and its mirror image, as RAR's script writes.
  assert results["pretokenize"]["records"] == 2 * demo.SMOKE_TOKEN_IMAGES
  with np.load(os.path.join(str(tmp_path), "samples", "samples.npz")) as d:
    assert d["arr_0"].shape == (16, 32, 32, 3)
