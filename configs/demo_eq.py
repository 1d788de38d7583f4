"""Equivariant-modeling CPU demo: column tokenizer -> windowed causal generator
-> images 8x wider than the training images.

  python -m genvis_jax.main --config=configs/demo_eq.py --workdir=/tmp/eq_demo

Data: generated horizontally stationary 32x64 "landscapes" (5 palettes).
  eq_tokenizer  column tokenizer (one 16-d token per 16-px column)
  eq_generator  windowed causal generator + rectified-flow head on its latents
  samples_wide  column-by-column synthesis with the rolling KV cache at 32
                columns (512 px wide, 8x the training width), saved as PNG
"""

import ml_collections

from configs import base
from configs import eq_demo


def get_config(arg=None):
  arg = base.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.mode = "demo"
  c.only = ""
  c.stages = ml_collections.ConfigDict()
  c.stages.eq_tokenizer = eq_demo.eq_tokenizer_demo_config()
  c.stages.eq_generator = eq_demo.eq_generator_demo_config("{workdir}/eq_tokenizer")
  wide = eq_demo.eq_generator_demo_config("{workdir}/eq_tokenizer")
  wide.mode = "sample"
  wide.init_from = "{workdir}/eq_generator"
  wide.sample.num_columns = wide.sample.wide_columns
  wide.sample.num_samples = 10
  wide.sample.batch_size = 16   # a multiple of 8 devices (a TPU v2-8)
  c.stages.samples_wide = wide
  c.stage_order = ("eq_tokenizer", "eq_generator", "samples_wide")
  if arg.smoke:
    for name in ("eq_tokenizer", "eq_generator"):
      t = c.stages[name].train
      t.num_steps, t.log_every, t.checkpoint_every, t.image_every = 2, 1, 2, 0
    # GAN off in 2 steps (its step is tested in tests/test_eq_tokenizer_task.py).
    c.stages.eq_tokenizer.loss.disc_start = 10**9
    c.stages.eq_generator.sample.num_steps = 2
    c.stages.eq_generator.sample.wide_columns = 8
    c.stages.samples_wide.sample.num_samples = 8   # one per test device
    c.stages.samples_wide.sample.batch_size = 8
    c.stages.samples_wide.sample.num_steps = 2
  return base.finish(c)
