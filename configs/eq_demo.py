"""Tiny equivariant tokenizer + generator for the CPU demo on ``demo_landscapes``
(32 x 64 horizontally stationary landscapes, 5 palette classes).

``eq_tokenizer_demo_config()``: 32-px-high images -> one 16-d token per 16-px
column (4 tokens per image), PatchGAN, no LPIPS / teacher (no weights files).
``eq_generator_demo_config(tokenizer_checkpoint)``: a 4-block windowed
generator trained on tokenizer latents encoded on the fly; samples at the
training width (4 columns) and 8x wider (32 columns = 512 px).

  python -m genvis_jax.main --config=configs/eq_demo.py:tokenizer --workdir=W/tok
  python -m genvis_jax.main --config=configs/eq_demo.py:generator \\
      --workdir=W/gen --config.tokenizer.checkpoint=W/tok
  python -m genvis_jax.main --config=configs/eq_demo.py:tokenizer \\
      --workdir=W/tok_eval --config.mode=evaluate --config.evaluate.checkpoint=W/tok
"""

import ml_collections

from configs import base
from configs import eq_common
from configs import eq_tokenizer


def _data(c):
  d = c.data
  d.source = "demo_landscapes"
  d.name = "landscapes"
  d.image_size = 32          # height
  d.image_width = 64
  d.num_classes = 5
  d.random_crop = False
  d.random_flip = True


def tokenizer_model():
  # The paper tokenizer's runlocal shrink (32 x 64 images -> 4 columns).
  return eq_tokenizer.runlocal_model()


def eq_tokenizer_demo_config():
  # Unlocked: the sub-configs swapped in below are locked with the whole
  # (ml_collections' lock() stops at a config already locked).
  c = eq_tokenizer.get_config().unlock()
  c.model = tokenizer_model()
  _data(c)
  lo = c.loss
  lo.perceptual_weight = 0.0
  lo.semantic_weight = 0.0
  lo.disc_start = 400
  opt = c.disc.optimizer
  c.disc = ml_collections.ConfigDict(dict(
      name="patchgan", image_size=32, image_width=64, ndf=16, n_layers=2,
      norm="group", dtype="float32", param_dtype="float32"))
  c.disc.optimizer = opt
  c.disc.optimizer.lr = 2e-4
  o = c.optimizer
  o.lr = 1e-3
  o.schedule = "constant"
  o.warmup_steps = 100
  t = c.train
  t.global_batch_size = 8
  t.num_steps = 600          # ~1 s/step on 2 busy CPU cores
  t.log_every = 50
  t.checkpoint_every = 300
  t.image_every = 300
  t.ema_decay = 0.99
  # --config.mode=evaluate (--config.evaluate.checkpoint=DIR): the demo's
  # size, not the paper's 50k.
  c.evaluate.num_images = 256
  c.evaluate.batch_size = 64
  return c


def eq_generator_demo_config(tokenizer_checkpoint: str = ""):
  c = eq_common.get_config("s")
  c.model = eq_common.generator_model(
      "s", hidden_size=64, depth=4, num_heads=4, head_width=64, head_depth=3,
      token_dim=16, num_classes=5, num_cond_tokens=4, window=2, seq_len=4,
      attn_dropout=0.0, proj_dropout=0.0)
  _data(c)
  c.tokenizer.model = tokenizer_model()
  c.tokenizer.checkpoint = tokenizer_checkpoint
  c.tokenizer.config_file = "configs/eq_demo.py:tokenizer"
  # ~ 1 / std of the demo tokenizer's posterior samples (the task logs
  # latent_std; official 0.05493 is the paper tokenizer's value).
  c.latents.scale = 0.2
  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 100
  t = c.train
  t.global_batch_size = 32
  t.num_steps = 1500         # ~3-4 steps/s on 2 CPU cores
  t.log_every = 100
  t.checkpoint_every = 500
  t.image_every = 500
  t.ema_decay = 0.995
  sp = c.sample
  sp.guidance_scale = 3.0
  sp.num_steps = 25
  sp.num_columns = 4
  sp.wide_columns = 32       # 8x the training width
  sp.batch_size = 16
  return c


def get_config(arg=None):
  if arg in (None, "", "tokenizer"):
    return base.finish(eq_tokenizer_demo_config())
  if arg == "generator":
    return base.finish(eq_generator_demo_config())
  raise ValueError(f"configs/eq_demo.py takes 'tokenizer' or 'generator', got "
                   f"{arg!r}.")
