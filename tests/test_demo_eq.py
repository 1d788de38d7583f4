"""The Equivariant demo chain end to end (a few steps per stage)."""

import os

import numpy as np
import pytest

from genvis_jax import modes


@pytest.mark.slow
def test_eq_demo_smoke(tmp_path):
  from configs import demo_eq  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path)
  results = modes.run(demo_eq.get_config("smoke"), wd)
  assert list(results) == ["eq_tokenizer", "eq_generator", "samples_wide"]
  # (Training-time grids at 1x and 8x width: tests/test_pipeline_eq.py.)
  # 8x-wide synthesis with the rolling cache: 32 columns of 16 px.
  with np.load(os.path.join(wd, "samples_wide", "samples.npz")) as d:
    assert d["arr_0"].shape == (8, 32, 512, 3) and d["arr_0"].dtype == np.uint8
