"""RAR through the paper configs with ``runlocal``, every mode as the CLI runs it:
MaskGIT VQGAN train -> rar_b ten-crop pretokenize -> train, killed and resumed
-> sample (npz + grid) -> evaluate (FID, sFID, IS, precision, recall).
Tokenizer evaluation, pre-tokenizing and sampling also run as on a pod, on 2
processes x 4 devices, and give what 1 process x 8 devices gives (the
processes that finish first wait for process 0's last write); training
resumes on 2 processes from their token files."""

import glob
import json
import pathlib
import os

import jax
import numpy as np
import pytest

from genvis_jax import models
from genvis_jax.core import weights as weights_lib
from genvis_jax.data import tokens as tokens_lib
from genvis_jax.sample import labels as sample_labels
from genvis_jax.sample import sampler as sampler_lib
from tests import pipeline_common as pc

pytestmark = pytest.mark.slow


def test_rar_paper_pipeline(tmp_path):
  w = str(tmp_path)
  tok = os.path.join(w, "tokenizer")
  # A few steps with the GAN (adaptive weight) switched on from step 2.
  # Workdirs given as pathlib.Path here and there, as notebooks pass them.
  pc.run_mode("maskgit_vqgan.py:runlocal", pathlib.Path(tok),
              **pc.steps(4), **{"loss.disc_start": 2})
  assert pc.latest_step(os.path.join(tok, "checkpoints")) == 4
  # Tokenizer evaluation: every process evaluates the whole split on its
  # own devices; on 2 processes (host batches sent to the devices first)
  # as on 1.
  one = pc.run_mode("maskgit_vqgan.py:runlocal", tmp_path / "tok_eval",
                    **{"mode": "evaluate", "evaluate.checkpoint": tok})
  pc.run_mode_on_processes(
      "maskgit_vqgan.py:runlocal", os.path.join(w, "tok_eval_2p"),
      **{"mode": "evaluate", "evaluate.checkpoint": tok})
  with open(os.path.join(w, "tok_eval_2p", "metrics.json")) as f:
    two = json.load(f)
  for key in ("psnr", "ssim", "mse", "codebook_usage"):
    assert two[key] == pytest.approx(one[key], rel=1e-5), key

  pre = pc.run_mode("rar_b.py:runlocal", tmp_path / "pretokenize",
                    **{"mode": "pretokenize", "tokenizer.checkpoint": tok})
  cfg = pc.load_config("rar_b.py:runlocal")
  num_images = cfg.pretokenize.data.num_examples
  assert pre["records"] == 10 * num_images       # ten crops per image
  src = tokens_lib.TokenSource(pre["pattern"])
  first = src[0]
  assert first["tokens"].shape == (64,)
  assert first["tokens"].max() < cfg.model.codebook_size
  # On 2 processes each encodes its share of the split into its own file;
  # together they hold the same records.
  pre2 = os.path.join(w, "pretokenize_2p")
  pc.run_mode_on_processes("rar_b.py:runlocal", pre2, **{
      "mode": "pretokenize", "tokenizer.checkpoint": tok})
  shards = sorted(glob.glob(os.path.join(pre2, "tokens", "*.array_record")))
  assert [os.path.basename(f) for f in shards] == [
      "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
  assert [tokens_lib.count_records(f) for f in shards] == [5 * num_images] * 2
  assert pc.token_records(os.path.join(
      pre2, "tokens", "train-*-of-00002.array_record")) == (
          pc.token_records(pre["pattern"]))
  # Shard 0 written again while process 1 reuses its own: process 1 waits
  # for it (it left at once, and was stopped at the shutdown barrier of a
  # job whose slowest shard took 5 minutes longer).
  for f in glob.glob(os.path.join(pre2, "tokens", "train-00000-of-00002*")):
    os.remove(f)
  pc.run_mode_on_processes(
      "rar_b.py:runlocal", pre2, late_output=shards[0] + ".json",
      **{"mode": "pretokenize", "tokenizer.checkpoint": tok})
  assert pc.token_records(os.path.join(
      pre2, "tokens", "train-*-of-00002.array_record")) == (
          pc.token_records(pre["pattern"]))

  rar = os.path.join(w, "rar")
  train = {"data.path": pre["pattern"], "tokenizer.checkpoint": tok,
           **pc.steps(8), "train.checkpoint_every": 4}
  # A sample grid at step 4, drawn before that step's save: the killed run
  # leaves it. The resumed run draws none (each of its 2 processes would
  # compile the sampler again: 11 s); the sampler on 2 processes runs in
  # mode=sample below, a grid's inputs on 2 processes in test_multihost.py.
  killed_at = pc.train_killed_after_checkpoint(
      "rar_b.py:runlocal", rar, **dict(train, **{"train.image_every": 4}))
  assert killed_at == 4
  assert os.listdir(os.path.join(rar, "images")) == ["samples_0000004.png"]
  # Resumed as on a pod of another shape: 2 processes x 4 devices training on
  # the files the 2 processes wrote. The state is resharded; the 1-process
  # input position does not fit 2 shards, so the data order is drawn afresh.
  logs = pc.run_mode_on_processes("rar_b.py:runlocal", rar, **dict(
      train, **{"data.path": os.path.join(pre2, "tokens",
                                          "train-*-of-00002.array_record"),
                "train.image_every": 0}))
  assert "Resumed from" in logs[0] and "step 4" in logs[0], logs[0][-3000:]
  assert "written by 1 process(es) and this job has 2" in logs[0]
  assert pc.latest_step(os.path.join(rar, "checkpoints")) == 8
  assert os.path.exists(os.path.join(rar, "checkpoints", "8", "data",
                                     "process_1-of-2.json"))

  out = pc.run_mode("rar_b.py:runlocal", tmp_path / "samples", **{
      "mode": "sample", "init_from": rar, "tokenizer.checkpoint": tok})
  images = pc.check_samples(out, (16, 32, 32, 3))
  assert images.std() > 0
  # From Python with the mesh typed by hand: jax.make_mesh's default
  # Explicit axes failed in the model's label gather; the first batch again.
  config = pc.load_config("rar_b.py:runlocal", **{
      "mode": "sample", "init_from": rar, "tokenizer.checkpoint": tok})
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  assert mesh.axis_types[0] == jax.sharding.AxisType.Explicit
  sample_fn, rows = sampler_lib.make_sample_fn(config, mesh)
  s = config.sample
  labels = sample_labels.class_labels(s.num_samples, config.model.num_classes,
                               s.get("classes", ()), s.get("labels", "balanced"),
                               s.seed)
  first = sample_fn(sample_labels.global_labels(labels[:s.batch_size], rows),
                    jax.random.fold_in(jax.random.key(s.seed), 0))
  np.testing.assert_array_equal(np.asarray(first), images[:s.batch_size])
  # On 2 processes x 4 devices (the batch split over both, process 0
  # writing): the same images as on this process's 8 devices, bit for bit.
  assert jax.device_count() == 8
  two = os.path.join(w, "samples_2p")
  # Process 1 waits while process 0 writes samples.npz.
  pc.run_mode_on_processes("rar_b.py:runlocal", two, late_output=os.path.join(
      two, "samples.npz"), **{"mode": "sample", "init_from": rar,
                              "tokenizer.checkpoint": tok})
  np.testing.assert_array_equal(pc.check_samples({
      "npz": os.path.join(two, "samples.npz"),
      "png": os.path.join(two, "samples.png")}, (16, 32, 32, 3)), images)
  # The set grows (a short last batch is drawn again) and shrinks in place.
  for n in (20, 12):
    more = pc.run_mode("rar_b.py:runlocal", os.path.join(w, "samples"), **{
        "mode": "sample", "init_from": rar, "tokenizer.checkpoint": tok,
        "sample.num_samples": n})
    grown = pc.check_samples(more, (n, 32, 32, 3))
    np.testing.assert_array_equal(grown[:min(n, 16)], images[:min(n, 16)])
  pc.evaluate_generation("rar_b.py:runlocal", os.path.join(w, "evaluate"),
                         out["npz"], "maskgit_vqgan.py:runlocal")
  # Weights diverged to NaN: NaN logits would draw code 0 everywhere and give
  # plausible files; the first batch stops sampling, named, with no part.
  params = models.load_params(cfg.model, rar)
  nan = os.path.join(w, "rar_nan")
  weights_lib.save_params(nan, jax.tree_util.tree_map(
      lambda x: np.full_like(x, np.nan), params))
  with pytest.raises(sampler_lib.NonFiniteSamplesError,
                     match=r"NaN or Inf .*config.init_from.* Nothing of the "
                           r"batch of images 0\.\.\d+ was written"):
    pc.run_mode("rar_b.py:runlocal", os.path.join(w, "samples_nan"), **{
        "mode": "sample", "init_from": nan, "tokenizer.checkpoint": tok})
  assert not glob.glob(os.path.join(w, "samples_nan", "sample_parts", "*.npz"))
