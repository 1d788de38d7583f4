"""Equivariant modeling through the paper configs with ``runlocal``, every
mode as the CLI runs it: eq_tokenizer train -> eq_s train (latents encoded on
the fly) -> sample 8x the training width. The evaluation sees only the
sampled images; the paper's protocol evaluates the training-width set, which
has the format of RAR's samples, and the RAR pipeline evaluates those, so it
is not repeated here (its two 2048-d matrix square roots cost about 45 s)."""

import os

import pytest

from tests import pipeline_common as pc

pytestmark = pytest.mark.slow


def test_equivariant_paper_pipeline(tmp_path):
  w = str(tmp_path)
  tok = os.path.join(w, "tokenizer")
  # The DINO discriminator (adaptive weight) switches on at step 2.
  pc.run_mode("eq_tokenizer.py:runlocal", tok,
              **{"train.num_steps": 4, "loss.disc_start": 2})

  gen = os.path.join(w, "generator")
  pc.run_mode("eq_s.py:runlocal", gen, **{"tokenizer.checkpoint": tok,
                                          "train.num_steps": 4})
  cfg = pc.load_config("eq_s.py:runlocal")
  assert os.listdir(os.path.join(gen, "images"))   # grids at 1x and 8x width

  wide = 8 * cfg.sample.num_columns                 # 8x the training width
  out = pc.run_mode("eq_s.py:runlocal", os.path.join(w, "samples"), **{
      "mode": "sample", "init_from": gen, "tokenizer.checkpoint": tok,
      "sample.num_columns": wide})
  column = cfg.data.image_width // cfg.sample.num_columns
  pc.check_samples(out, (16, cfg.data.image_size, wide * column, 3))
