"""Resuming a sampling run: which setting changes are refused (no model runs)."""

import json

import numpy as np
import pytest

from genvis_jax.sample import driver


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
  driver.check_settings(d, _settings(init_from="/copy/rar", **{
      "tokenizer.checkpoint": "/copy/tok", "sample.num_samples": 200}))
  with pytest.raises(driver.SampleSettingsError,
                     match=r"weights.generator: 'step 480 committed 1' -> "
                           r"'step 600 committed 3'"):
    driver.check_settings(d, _settings(**{
        "weights.generator": "step 600 committed 3"}))


def test_parts_from_before_weights_were_recorded_compare_paths(tmp_path):
  old = {k: v for k, v in _settings().items() if not k.startswith("weights.")}
  driver.check_settings(_parts_dir(tmp_path, old), _settings())  # same paths
  with pytest.raises(driver.SampleSettingsError, match="init_from: '/runs/rar'"):
    driver.check_settings(_parts_dir(tmp_path, old, "other"),
                          _settings(init_from="/runs/other"))
