"""Equivariant modeling through the paper configs with ``runlocal``, every
mode as the CLI runs it: eq_tokenizer train -> eq_s train (latents encoded on
the fly) -> sample 8x the training width. The evaluation sees only the
sampled images; the paper's protocol evaluates the training-width set, which
has the format of RAR's samples, and the RAR pipeline evaluates those, so it
is not repeated here (its two 2048-d matrix square roots cost about 45 s)."""

import glob
import json
import os
import shutil

import pytest

from tests import pipeline_common as pc

pytestmark = pytest.mark.slow


def test_equivariant_paper_pipeline(tmp_path, monkeypatch):
  w = str(tmp_path)
  tok = os.path.join(w, "tokenizer")
  # GAN off (a step without the DINO discriminator's passes and the
  # adaptive weight's extra backward: 74 -> 32 s of compile on 2 cores);
  # that step runs in tests/test_eq_tokenizer_task.py, and the RAR pipeline
  # switches its tokenizer's GAN on mid-run. A 2-step warm-up (runlocal's
  # is a quarter of the steps: 1, whose step decay plateau is a learning
  # rate of 0).
  stage1 = pc.run_mode("eq_tokenizer.py:runlocal", tok, **pc.steps(4),
                       **{"loss.disc_start": 10**9,
                          "optimizer.warmup_steps": 2})
  _check_stage2_goes_on_from_stage1(tok, stage1)

  gen = os.path.join(w, "generator")
  pc.run_mode("eq_s.py:runlocal", gen, **{"tokenizer.checkpoint": tok},
              **pc.steps(4))
  cfg = pc.load_config("eq_s.py:runlocal")
  # Grids at 1x and 8x width.
  assert sorted(os.listdir(os.path.join(gen, "images"))) == [
      "samples_0000004.png", "samples_wide_0000004.png"]
  _check_tokenizer_origin(w, tok, gen)

  wide = 8 * cfg.sample.num_columns                 # 8x the training width
  out = pc.run_mode("eq_s.py:runlocal", os.path.join(w, "samples"), **{
      "mode": "sample", "init_from": gen, "tokenizer.checkpoint": tok,
      "sample.num_columns": wide})
  column = cfg.data.image_width // cfg.sample.num_columns
  pc.check_samples(out, (16, cfg.data.image_size, wide * column, 3))
  _check_notebook(monkeypatch, gen, tok, cfg, column)


def _check_notebook(monkeypatch, gen, tok, cfg, column):
  """colabs/equivariant_wide.ipynb with these runs as its weights (the path
  a user with converted weights takes): four images at the training width
  and four 8x wider, shown as two grids."""
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  from tests.test_colabs import notebook_images, notebook_text, run_notebook
  for var, value in (("EQ_CKPT", gen), ("EQ_TOKENIZER_CKPT", tok),
                     ("EQ_CONFIG", "eq_s:runlocal"), ("EQ_NUM_CLASSES", "")):
    monkeypatch.setenv(var, value)
  nb = run_notebook("equivariant_wide.ipynb")
  h, w = cfg.data.image_size, cfg.sample.num_columns * column
  assert (f"training width: (4, {h}, {w}, 3) | wider: (4, {h}, {8 * w}, 3)"
          in notebook_text(nb)), notebook_text(nb)
  narrow, wide = notebook_images(nb)
  assert narrow.shape[1] > narrow.shape[0] and wide.shape[0] > wide.shape[1] / 8


def _check_stage2_goes_on_from_stage1(tok, stage1):
  """Stage 2 (``eq_tokenizer.py:stage2`` as the CLI parses it) starts from
  stage 1's EMA weights (also its EMA's start) and discriminator, as the
  official ckpt_path does. (A step from init_from: test_checkpoint_resume.)"""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from tests.small_run import leaves  # pylint: disable=import-outside-toplevel
  config = pc.load_config("eq_tokenizer.py:stage2,runlocal", init_from=tok)
  trainer = trainer_lib.Trainer(config)
  # Every group it checks is loaded: an abstract start state skips compiling
  # the initialiser (the trainer's call passes the initialised one).
  abstract = trainer.abstract_state()
  state = state_lib.from_weights(abstract, config, abstract.params,
                                 trainer.task.ema_group)
  for want, got in ((stage1.params["disc"], state.params["disc"]),
                    (stage1.ema, state.params["model"]), (stage1.ema, state.ema)):
    for a, b in zip(leaves(want), leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)


def _check_tokenizer_origin(w, tok, gen):
  """The generator records the tokenizer weights it encoded its images with:
  resuming with other weights (a copy whose newest step was committed anew,
  as a tokenizer trained further) is refused before any state is read, and
  so is sampling with them."""
  from genvis_jax.core import weights as weights_lib
  from genvis_jax.data import run_origin
  from genvis_jax.errors import ConfigError
  from genvis_jax.sample import trained_with
  assert run_origin.run_token_weights(gen) == [weights_lib.params_source(tok)]
  other = os.path.join(w, "other_tokenizer")
  shutil.copytree(tok, other)
  meta = max(glob.glob(os.path.join(other, "checkpoints", "[0-9]*",
                                    "_CHECKPOINT_METADATA")))
  with open(meta) as f:
    m = json.load(f)
  m["commit_timestamp_nsecs"] += 1
  with open(meta, "w") as f:
    json.dump(m, f)
  source = weights_lib.params_source(other)
  assert source and source != weights_lib.params_source(tok)
  with pytest.raises(ConfigError, match=r"trained to step 4 on latents of "
                     r"tokenizer weights .* now holds"):
    pc.run_mode("eq_s.py:runlocal", gen, **{"tokenizer.checkpoint": other},
                **pc.steps(6))
  config = pc.load_config("eq_s.py:runlocal")
  with pytest.raises(trained_with.TrainedWithError,
                     match="would be decoded by another tokenizer"):
    trained_with.check_tokenizer_origin(config, gen, source)
