"""The Equivariant demo chain's wiring, without compiling it.

Its stages run the code the Equivariant paper pipeline runs end to end
(tests/test_pipeline_eq.py, on the same 1.7M-parameter tokenizer model and
the 32 x 64 landscapes); a full smoke run of this chain cost the suite 110 s
of compiling, so here each stage is built as the demo runner builds it: the
configs parse, both trainers lay out their states on the test mesh, and the
stages hand each other the right paths and shapes."""

import jax
import numpy as np

from configs import demo_eq
from genvis_jax import demo as demo_lib
from genvis_jax.core import weights as weights_lib
from genvis_jax.train import trainer as trainer_lib


def test_eq_demo_stages_fit_together(tmp_path):
  config = demo_eq.get_config()
  wd = str(tmp_path)
  assert list(config.stage_order) == ["eq_tokenizer", "eq_generator",
                                      "samples_wide"]
  tok, gen, wide = (demo_lib.stage_config(config, s, wd)
                    for s in config.stage_order)
  assert (tok.mode, gen.mode, wide.mode) == ("train", "train", "sample")
  # The generator encodes with the tokenizer stage's model and weights; the
  # wide stage samples the generator's weights 8x wider than it trained.
  assert gen.tokenizer.model.to_dict() == tok.model.to_dict()
  assert gen.tokenizer.checkpoint == wide.tokenizer.checkpoint == (
      f"{wd}/eq_tokenizer")
  assert wide.init_from == f"{wd}/eq_generator"
  assert wide.model.to_dict() == gen.model.to_dict()
  columns = tok.data.image_width // 16          # one token per 16-px column
  assert gen.sample.num_columns == columns == 4
  assert wide.sample.num_columns == 8 * columns
  model = trainer_lib.Trainer(tok).abstract_state().params["model"]
  # The runlocal tokenizer of the paper pipeline, trained there end to end.
  assert sum(x.size for x in jax.tree_util.tree_leaves(model)) == 1_687_027
  # The generator stage loads the tokenizer stage's weights (here zeros).
  weights_lib.save_params(gen.tokenizer.checkpoint, jax.tree_util.tree_map(
      lambda a: np.zeros(a.shape, a.dtype), model))
  trainer = trainer_lib.Trainer(gen)
  assert set(trainer.frozen) >= {"tokenizer"}
  assert sum(x.size for x in jax.tree_util.tree_leaves(
      trainer.abstract_state().params["model"])) > 0


def test_eq_demo_smoke_config_is_small():
  """``:smoke`` (a hand run's quick check) keeps the stages and shrinks them."""
  smoke, full = demo_eq.get_config("smoke"), demo_eq.get_config()
  assert list(smoke.stage_order) == list(full.stage_order)
  for name in ("eq_tokenizer", "eq_generator"):
    assert smoke.stages[name].train.num_steps < full.stages[name].train.num_steps
  assert smoke.stages.samples_wide.sample.num_columns == 32
