"""The FQGAN / FAR demo chain's wiring, without compiling it.

Its stages run code that runs end to end elsewhere: the FQGAN tokenizer's
training, pre-tokenizing and FAR's training and sampling in the FQGAN paper
pipelines (tests/test_pipeline_fqgan.py), the stage runner, centre-crop +
mirror pre-tokenizing, the judge, its score and sampling's resume in the RAR
demo (tests/test_demo.py), evaluating an FQ tokenizer per sub-codebook in
tests/test_evaluate_tokenizer.py. A full smoke run of this chain cost the
suite 50-90 s of compiling, so here each stage is built as the demo runner
builds it: the configs parse, both trainers lay out their states on the test
mesh, and the stages hand each other the right models, paths and shapes."""

import jax
import numpy as np

from configs import demo_fqgan
from genvis_jax import demo as demo_lib
from genvis_jax import models
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import trainer as trainer_lib


def test_fqgan_demo_stages_fit_together(tmp_path):
  config = demo_fqgan.get_config()
  wd = str(tmp_path)
  order = list(config.stage_order)
  assert order == ["fq_tokenizer", "reconstructions", "classifier",
                   "pretokenize", "far", "samples", "score"]
  s = {name: demo_lib.stage_config(config, name, wd) for name in order}
  assert [s[n].mode for n in order] == [
      "train", "evaluate", "train", "pretokenize", "train", "sample",
      "evaluate"]
  tok_model = s["fq_tokenizer"].model.to_dict()
  ckpt = f"{wd}/fq_tokenizer"
  # Reconstructions, token files and FAR's decoded samples all come from the
  # tokenizer stage's model and weights.
  assert s["reconstructions"].model.to_dict() == tok_model
  assert s["reconstructions"].evaluate.checkpoint == ckpt
  for name in ("pretokenize", "far", "samples"):
    assert s[name].tokenizer.model.to_dict() == tok_model, name
    assert s[name].tokenizer.checkpoint == ckpt, name
  # FAR reads the files pre-tokenizing writes: centre crops with their mirror
  # images, a batch's mirrors after its originals, so every record is an
  # example (crops_per_epoch='one' needs ten-crop files and refuses these).
  pre = s["pretokenize"].pretokenize
  assert not pre.ten_crop
  assert s["far"].data.path == f"{pre.output}-*.array_record"
  assert s["far"].data.crops_per_epoch == "all"
  # One sub-codebook of FAR's head per sub-codebook of the tokenizer, over
  # the tokenizer's code grid; the demo's classes throughout.
  tok = s["fq_tokenizer"].model
  far = s["far"].model
  assert far.codebook_size == tok.num_codes == 64
  assert far.num_codebooks == len(tok.branches) == 2
  assert far.grid == pre.data.image_size // 2 ** (len(tok.channel_mult) - 1)
  assert (s["far"].data.num_classes == pre.data.num_classes
          == s["classifier"].model.num_classes == 10)
  # Samples come from FAR's weights with FAR's model, and the score judges
  # them with the classifier stage's weights.
  assert s["samples"].init_from == f"{wd}/far"
  assert s["samples"].model.to_dict() == far.to_dict()
  assert s["score"].evaluate.samples == f"{wd}/samples/samples.npz"
  assert s["score"].evaluate.classifier_checkpoint == f"{wd}/classifier"

  tok_trainer = trainer_lib.Trainer(s["fq_tokenizer"])
  model = tok_trainer.abstract_state().params["model"]
  # Two sub-codebooks (vis, sem) of 64 codes, as the README's demo says.
  assert {k: v["embedding"].shape for k, v in model.items()
          if k.startswith("quantize_")} == {"quantize_vis": (64, 8),
                                            "quantize_sem": (64, 8)}
  trainer = trainer_lib.Trainer(s["far"])
  assert sum(x.size for x in jax.tree_util.tree_leaves(
      trainer.abstract_state().params["model"])) > 0
  assert not trainer.frozen        # no sample grids while FAR trains
  # Sampling decodes with the tokenizer stage's weights (here ones).
  weights_lib.save_params(ckpt, jax.tree_util.tree_map(
      lambda a: np.ones(a.shape, a.dtype), model))
  decoder = s["samples"].tokenizer
  loaded = models.load_params(decoder.model, decoder.checkpoint)
  assert jax.tree_util.tree_structure(loaded) == (
      jax.tree_util.tree_structure(model))
  assert all(np.all(x == 1) for x in jax.tree_util.tree_leaves(loaded))


def test_fqgan_demo_smoke_config_is_small():
  """``:smoke`` (a hand run's quick check) keeps the stages and shrinks them."""
  smoke, full = demo_fqgan.get_config("smoke"), demo_fqgan.get_config()
  assert list(smoke.stage_order) == list(full.stage_order)
  for name in ("fq_tokenizer", "classifier", "far"):
    assert smoke.stages[name].train.num_steps < full.stages[name].train.num_steps
  assert smoke.stages.samples.sample.num_samples < full.stages.samples.sample.num_samples
